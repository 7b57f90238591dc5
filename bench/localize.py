"""Cost of a localization video (`cavmae_sync.localization_video`, `cavmae-sync-localize`) for a 10 s clip on CPU.

Rendered: a testbed clip (10 s, 112 px, 8 fps, mono AAC: made in a temporary folder) and the real clips in
../shared/media (10 s, stereo AAC 44.1 kHz; one of them 1280 x 720 at 29.97 fps), each whole, at the source's size,
with the tiny testbed model shipped in checkpoints/testbed (CAV-MAE Sync with registers; the cost depends on the
architecture, not on the weights). With --vitb also with an untrained model of the released architecture (ViT-B,
416-frame windows, 224 px), the cost of `--checkpoint cav-mae-sync.pth`. Each clip is rendered --repeats times and
the best wall-clock run reported (the least disturbed on a shared machine), split into the first pass (decoding and
the model: `seconds_maps`) and the second (drawing and H.264 encoding: `seconds_render`); `realtime` is the clip's
duration over the wall-clock time. The machine's load average is printed beside them: on a busy machine every number
is slower.

    python bench/localize.py [--threads 2] [--repeats 2] [--vitb]
Prints one JSON object.
"""

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path


def render(clip, model, out, repeats):
    "The best of `repeats` renderings of `clip`: its wall-clock split and what was written."
    from cavmae_sync.localization_video import localization_video

    runs = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = localization_video(clip, model, out, progress=False)
        runs.append((time.perf_counter() - began, result))
    wall, result = min(runs, key=lambda run: run[0])
    return {
        'clip': Path(clip).name,
        'frames': result.frames,
        'fps': round(float(result.fps), 3),
        'seconds': round(result.seconds, 3),
        'output_size': list(result.size),
        'sound': result.sound,
        'wall_s': round(wall, 2),
        'seconds_maps': round(result.seconds_maps, 2),
        'seconds_render': round(result.seconds_render, 2),
        'ms_per_frame': round(1000 * wall / result.frames, 1),
        'realtime': round(result.seconds / wall, 3),
        'wall_runs_s': [round(w, 2) for w, _ in runs],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument(
        '--vitb', action='store_true', help='also the released architecture (ViT-B), untrained'
    )
    args = parser.parse_args()
    warnings.simplefilter('ignore')
    import torch
    from cavmae_sync.checkpoint import load_model_file
    from cavmae_sync.config import shared_dir
    from cavmae_sync.localization_video import TESTBED_MODEL
    from cavmae_sync.model import CAVMAESync, cavmae_sync
    from cavmae_sync.synthetic import generate_clip
    from cavmae_sync.synthetic_scenes import SyntheticConfig
    from cavmae_sync.testbed import SHIPPED_DIR

    torch.set_num_threads(args.threads)
    models = {'tiny_testbed': load_model_file(SHIPPED_DIR / TESTBED_MODEL / 'model.pt')}
    if args.vitb:
        torch.manual_seed(0)
        models['vitb_released_architecture'] = CAVMAESync(cavmae_sync()).eval()
    load_before = os.getloadavg()
    out = {
        'machine': f'{platform.machine()}, {os.cpu_count()} CPUs',
        'threads': args.threads,
        'load_average_1_5_15_min': [round(x, 2) for x in load_before],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for sub in ('videos', 'ground_truth'):
            (Path(tmp) / sub).mkdir()
        generate_clip(tmp, SyntheticConfig(), 'test', 0)
        clips = [Path(tmp) / 'videos' / 'test_00000.mp4']
        shared = shared_dir(required=False)
        if shared is not None:
            clips += sorted((shared / 'media').glob('*.mp4'))
        for name, model in models.items():
            out[name] = [render(clip, model, Path(tmp) / 'out.mp4', args.repeats) for clip in clips]
    out['load_average_after'] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(out, indent=1))


if __name__ == '__main__':
    main()
