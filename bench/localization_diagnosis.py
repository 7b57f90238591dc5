"""What a shipped tiny model's localization maps are made of, on the testbed's prompted frames (issue 24): how narrow
the cone of its audio embeddings is, whether its patch tokens have high-norm outliers ("Vision Transformers Need
Registers"), and how pointing and the share of on-object peaks on the played object change when the audio queries or
the patch tokens are centred on their training means, or the map is negated. A diagnosis only: no map definition of the
notebooks depends on it (a map's sign is never flipped after looking at the masks).

    python bench/localization_diagnosis.py [--checkpoint FILE ...] [--train-clips 48]
Prints one JSON object per model.
"""

import argparse
import json
from pathlib import Path


def diagnose(path, root, train_clips):
    import torch
    import torch.nn.functional as F
    from cavmae_sync.checkpoint import load_model_file
    from cavmae_sync.data import DatafileDataset
    from cavmae_sync.embeddings import model_preprocess_config
    from cavmae_sync.localization import similarity_maps
    from cavmae_sync.testbed_localization import common_share, peak_counts, prompted_set

    model = load_model_file(path).eval()
    config = model_preprocess_config(model)
    prompted = prompted_set(root, config)
    prompts = prompted.for_model(config)
    with torch.no_grad():
        train = DatafileDataset(
            root / 'train.json', root / 'labels.csv', mode='eval', config=config
        )
        audio, patches = [], []
        for i in range(train_clips):  # training statistics: all T windows and frames
            item = train[i]
            audio.append(F.normalize(model.encode_audio(item['audio']).embedding, dim=-1))  # (T, D)
            patches.append(model.encode_video(item['frames']).tokens.flatten(0, 1))  # (T * Nv, D)
        audio_mean, patch_mean = torch.cat(audio).mean(0), torch.cat(patches).mean(0)  # (D,), (D,)
        sounds = {}
        for i in range(len(prompts)):
            sound = str(prompts.audio_path(i))
            if sound not in sounds:
                windows = prompts.load_audio_windows(i)  # (T, L, mel)
                sounds[sound] = F.normalize(model.encode_audio(windows).embedding, dim=-1).mean(0)
        queries = torch.stack(
            [sounds[str(prompts.audio_path(i))] for i in range(len(prompts))]
        )  # (M, D)
        tokens = model.encode_video(prompted.frames).tokens  # (I, Nv, D)
        per_prompt = tokens[torch.from_numpy(prompted.images)]  # (M, Nv, D)
        norms = tokens.norm(dim=-1)  # (I, Nv)
        variants = {
            'as defined': (queries, per_prompt),
            'negated': (-queries, per_prompt),
            'audio centred': (queries - audio_mean, per_prompt),
            'patches centred': (queries, per_prompt - patch_mean),
            'both centred': (queries - audio_mean, per_prompt - patch_mean),
        }
        maps = {}
        for name, (q, t) in variants.items():
            m = similarity_maps(q, t, size=tuple(prompted.masks.shape[-2:]))  # (M, S, S)
            peaks = peak_counts(m, prompted)
            maps[name] = {
                'pointing': round(peaks.pointing, 1),
                'prompted_share': round(peaks.prompted_share, 1),
                'common_share': round(common_share(m, prompted.images), 1),
            }
    return {
        'checkpoint': str(path),
        'prompts': len(prompted),
        'audio_cone_cosine': round(float(F.cosine_similarity(queries, audio_mean[None]).mean()), 3),
        'audio_mean_norm': round(float(audio_mean.norm()), 3),
        'patch_norm_max_over_median': round(
            float((norms.max(1).values / norms.median(1).values).mean()), 4
        ),
        'maps': maps,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    repository = Path(__file__).resolve().parents[1]
    shipped = sorted(str(p) for p in repository.glob('checkpoints/testbed/tiny_sync_*/model.pt'))
    parser.add_argument('--checkpoint', nargs='+', default=shipped)
    parser.add_argument(
        '--train-clips', type=int, default=48, help='training clips the means are taken over'
    )
    args = parser.parse_args()
    from cavmae_sync.synthetic import default_synthetic

    root = default_synthetic()
    for path in args.checkpoint:
        print(json.dumps(diagnose(path, root, args.train_clips)))


if __name__ == '__main__':
    main()
