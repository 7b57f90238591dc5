"""Benchmark: loading a clip into 16 frames + 16 audio windows vs. just decoding it.

On each clip of ../shared/media (or the folder given as the first argument), on one core
(torch.set_num_threads(1), one decoder thread), median seconds over interleaved repeats (each round runs
every measurement once, so load from other processes hits them alike) of:
  (a) decord fetching the 16 frames load_clip uses (VideoReader + get_batch),
  (b) PyAV decoding the audio track and resampling it to 16 kHz mono (`load_audio`); the decode alone is
      reported too (`audio_decode_only_s`),
  (c) `load_clip` (frames + audio + fbank + windows + transforms), with its parts timed separately.
  (d) `load_clip` under the released preset (`frame_preset='released'`: the released extraction's frame indices,
      BT.601, PIL bilinear resize, JPEG round trip, 16-bit audio), what a released checkpoint is fed.
Prints one JSON object: per-clip seconds, ratio = c / (a + b) (target <= 1.3; also from the best times),
clips/s per core for each preset and released / on_screen (target <= 1.5).
"""

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import av
import decord
import torch

from cavmae_sync.audio import load_audio
from cavmae_sync.config import PreprocessConfig
from cavmae_sync.data import load_clip, audio_windows, frame_transform, FBANK_SHIFT_SECONDS
from cavmae_sync.video import read_frames

ROOT = Path(__file__).resolve().parents[1]


def interleaved_times(functions, repeats):
    "Run each function once (warm-up), then `repeats` rounds of all of them in turn; seconds per function."
    for fn in functions.values():
        fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def decode_audio_only(path):
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream))


def bench_clip(path, repeats):
    config = PreprocessConfig()
    video = read_frames(
        path, config.num_frames, max_duration=config.target_length * FBANK_SHIFT_SECONDS
    )
    indices = video.indices.tolist()

    def decord_frames():
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
        return reader.get_batch(indices).asnumpy()

    frames = video.frames.permute(0, 3, 1, 2)
    waveform = load_audio(path)
    positions = list(range(config.num_frames))
    times = interleaved_times(
        {
            'decord': decord_frames,
            'audio': lambda: load_audio(path),
            'audio_decode_only': lambda: decode_audio_only(path),
            'load_clip': lambda: load_clip(path),
            'load_clip_released': lambda: load_clip(
                path, config=PreprocessConfig(frame_preset='released')
            ),
            'read_frames': lambda: read_frames(
                path, config.num_frames, max_duration=config.target_length * FBANK_SHIFT_SECONDS
            ),
            'spectrogram_windows': lambda: audio_windows(waveform, path, config, positions),
            'frame_transform': lambda: frame_transform(config.image_size, False)(frames),
        },
        repeats,
    )
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    decord_s, audio_s, audio_decode_s, load_clip_s = (
        median[k] for k in ('decord', 'audio', 'audio_decode_only', 'load_clip')
    )
    parts = {
        f'{k}_s': round(median[k], 4)
        for k in ('read_frames', 'spectrogram_windows', 'frame_transform')
    }
    parts['load_audio_s'] = round(audio_s, 4)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        size = f'{stream.codec_context.width}x{stream.codec_context.height}'
    return {
        'clip': path.name,
        'size': size,
        'frame_backend': video.backend,
        'decord_16_frames_s': round(decord_s, 4),
        'pyav_audio_s': round(audio_s, 4),
        'audio_decode_only_s': round(audio_decode_s, 4),
        'load_clip_s': round(load_clip_s, 4),
        'ratio': round(load_clip_s / (decord_s + audio_s), 3),
        'ratio_vs_decode_only': round(load_clip_s / (decord_s + audio_decode_s), 3),
        'ratio_of_best_times': round(best['load_clip'] / (best['decord'] + best['audio']), 3),
        'clips_per_s_per_core': round(1 / load_clip_s, 2),
        'clips_per_s_per_core_by_preset': {
            'on_screen': round(1 / load_clip_s, 2),
            'released': round(1 / median['load_clip_released'], 2),
        },
        'released_over_on_screen': round(median['load_clip_released'] / load_clip_s, 3),
        'load_clip_parts_s': {k: round(v, 4) for k, v in parts.items()},
    }


def main():
    torch.set_num_threads(1)
    warnings.simplefilter(
        'ignore'
    )  # the released preset names clips the released extractor misread, at every call
    media = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(os.environ.get('CAVMAE_SYNC_SHARED', ROOT.parent / 'shared')) / 'media'
    )
    clips = sorted(media.glob('*.mp4'))
    if not clips:
        sys.exit(f'bench/data.py: no .mp4 clips in {media}')
    results = [
        bench_clip(path, repeats=21 if path.stat().st_size < 1_000_000 else 5) for path in clips
    ]
    print(
        json.dumps(
            {
                'benchmark': 'data',
                'threads': 1,
                'target_ratio': 1.3,
                'target_released_over_on_screen': 1.5,
                'clips': results,
                'max_ratio': max(r['ratio'] for r in results),
                'max_released_over_on_screen': max(r['released_over_on_screen'] for r in results),
            },
            indent=1,
        )
    )


if __name__ == '__main__':
    main()
