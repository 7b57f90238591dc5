"""Why the tiny models' maps are inverted (issue 24): the map of a *natural* test clip (frame t's patch tokens against
the embedding of its own audio window t, the map `localization.similarity_maps` draws), on frames where the sounding
object is the only lit object, compared with the same map under another clip's audio and with common components
removed. A diagnosis only: no map used by a notebook is redefined here.

Per definition, over those frames: `object_contrast` (mean map on the sounding object minus that on the frame's other
objects, in units of the map's spatial standard deviation; > 0 follows the sound) and `own_share` (% of the peaks that
land on an object that land on the sounding one; about 25% by chance with four objects).

    python bench/localization_inversion.py CHECKPOINT TESTBED_ROOT [--max-clips 60]
Prints one JSON object.
"""

import argparse
import json
import platform
from pathlib import Path

DEFINITIONS = (
    'own audio',  # the map as drawn
    'another clip audio',  # the same patches under the audio of another clip (a different class set)
    'audio centred',  # the own audio minus the mean audio embedding of the clips
    'patches centred per frame',  # patch tokens minus their frame's mean token
)


def maps_of(audio, tokens, definition, audio_mean):
    "(T, S, S) cosine maps of audio (T, D) against patch tokens (T, N, D) under one definition."
    import torch
    import torch.nn.functional as F

    if definition == 'audio centred':
        audio = audio - audio_mean
    if definition == 'patches centred per frame':
        tokens = tokens - tokens.mean(1, keepdim=True)  # (T, N, D)
    maps = torch.einsum(
        'td,tnd->tn', F.normalize(audio, dim=-1), F.normalize(tokens, dim=-1)
    )  # (T, N)
    side = int(maps.shape[1] ** 0.5)
    return maps.reshape(-1, side, side)  # (T, S, S)


def scored_frames(maps, truth):
    """The maps (F, S, S) of the frames whose sounding object is the only lit one and which show another object,
    with the sounding object's masks and every object's (F, S, S) bool."""
    import torch
    import torch.nn.functional as F

    side = maps.shape[-1]
    masks = torch.from_numpy(truth.object_masks).float()  # (O, T, H, W)
    masks = F.interpolate(masks, size=(side, side), mode='nearest').bool()  # (O, T, S, S)
    frames = []
    for t in range(maps.shape[0]):
        sounding = int(truth.sounding_object[t])
        if sounding < 0 or truth.object_active[:, t].sum() != 1:
            continue
        own, any_object = masks[sounding, t], masks[:, t].any(0)  # (S, S), (S, S)
        if own.any() and (any_object & ~own).any():
            frames.append((t, own, any_object))
    if not frames:
        return maps[:0], masks[0, :0], masks[0, :0]
    times, own, any_object = zip(*frames)
    return maps[list(times)], torch.stack(own), torch.stack(any_object)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoint', type=Path)
    parser.add_argument(
        'testbed',
        type=Path,
        help='a synthetic testbed folder (test.json, labels.csv, ground truth)',
    )
    parser.add_argument('--max-clips', type=int, default=60)
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F
    from cavmae_sync.checkpoint import load_model_file
    from cavmae_sync.data import DatafileDataset
    from cavmae_sync.embeddings import model_preprocess_config
    from cavmae_sync.synthetic import SyntheticDataset
    from cavmae_sync.testbed_localization import PeakCounts, pointing_hits
    from localization_search import object_contrast  # the same statistic the search records

    torch.set_num_threads(1)
    model = load_model_file(args.checkpoint).eval()
    testbed = SyntheticDataset.from_root(args.testbed)
    clips = DatafileDataset(
        args.testbed / 'test.json',
        args.testbed / 'labels.csv',
        mode='eval',
        config=model_preprocess_config(model),
    )
    encoded = []
    with torch.no_grad():
        for k in range(min(args.max_clips, len(clips))):
            item = clips[k]
            out = model.encode(item['audio'], item['frames'])
            encoded.append(
                (item['video_id'], out.audio_embedding.float(), out.video_tokens.float())
            )
    audio = torch.cat([a for _, a, _ in encoded])  # (clips * T, D)
    audio_mean = audio.mean(0)  # (D,)
    found = {name: [] for name in DEFINITIONS}
    for k, (video_id, own_audio, tokens) in enumerate(encoded):
        truth = testbed.ground_truth(video_id)
        other_audio = encoded[(k + 7) % len(encoded)][1]
        for name in DEFINITIONS:
            query = other_audio if name == 'another clip audio' else own_audio
            definition = 'own audio' if name == 'another clip audio' else name
            maps = maps_of(query, tokens, definition, audio_mean)  # (T, S, S)
            found[name].append(scored_frames(maps, truth))
    if not sum(len(maps) for maps, _, _ in found['own audio']):
        raise SystemExit(
            f"{args.testbed}: no test frame shows its sounding object as the only lit one (decoys drawn with their "
            "sources, decoy_coupling 1?): use a loosely coupled testbed"
        )
    result = {
        'checkpoint': str(args.checkpoint),
        'testbed': args.testbed.name,
        'clips': len(encoded),
        'frames': sum(len(maps) for maps, _, _ in found['own audio']),
        'audio_cos_with_mean': round(float(F.cosine_similarity(audio, audio_mean[None]).mean()), 3),
        'machine': f'{platform.machine()}, {__import__("os").cpu_count()} cores',
    }
    for name, parts in found.items():
        maps, own, any_object = (torch.cat(tensors) for tensors in zip(*parts))
        peaks = PeakCounts(pointing_hits(maps, own), pointing_hits(maps, any_object))
        result[name] = {
            'object_contrast': round(object_contrast(maps, own, any_object), 3),
            'own_share': round(peaks.prompted_share, 1),
        }
    print(json.dumps(result))


if __name__ == '__main__':
    main()
