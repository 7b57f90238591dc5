"""Throughput of `model.encode` on whole clips: T=16 frame-window pairs per clip, all frames of a clip in one batch.

Always measures the tiny preset on CPU; when CUDA is available also the paper's model (ViT-B, L=416, 224 px) in bf16
autocast, compiled. Prints one JSON object.

    python bench/encode.py [--clips 4] [--gpu-clips 32] [--iters 5] [--threads 2] [--compile-cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model_bench import count_flops, describe, peak_bf16_flops, peak_memory_mb, timed  # noqa: E402

from cavmae_sync.model import CAVMAESync, cavmae_sync, tiny  # noqa: E402


def bench_encode(
    config, device: torch.device, clips: int, iters: int, bf16: bool, compile_model: bool
) -> dict:
    T = config.num_frames
    torch.manual_seed(0)
    model = CAVMAESync(config).to(device).eval()
    audio = torch.randn(
        clips * T, config.audio_length, config.num_mel_bins, device=device
    )  # (clips*T, L, 128)
    frames = torch.randn(
        clips * T, 3, config.image_size, config.image_size, device=device
    )  # (clips*T, 3, H, W)
    encode = torch.compile(model.encode) if compile_model else model.encode

    def run():
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
        ):
            return encode(audio, frames)

    with torch.device('meta'):
        meta_model = CAVMAESync(config)
        flops = count_flops(
            lambda: meta_model.encode(
                torch.empty(clips * T, config.audio_length, config.num_mel_bins),
                torch.empty(clips * T, 3, config.image_size, config.image_size),
            )
        )
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(run, device, warmup=3 if compile_model else 2, iters=iters)
    seconds = statistics.median(times)
    peak = peak_bf16_flops(device)
    result = {
        **describe(device),
        'preset': 'tiny' if config.embed_dim < 768 else 'cavmae_sync',
        'frames_per_clip': T,
        'batch_clips': clips,
        'dtype': 'bf16-autocast' if bf16 else 'fp32',
        'compiled': compile_model,
        'clips_per_s': round(clips / seconds, 3),
        'pairs_per_s': round(clips * T / seconds, 2),
        'seconds_per_batch': round(seconds, 4),
        'gflop_per_clip': round(flops / clips / 1e9, 2),
        'achieved_tflops': round(flops / seconds / 1e12, 3),
        **peak_memory_mb(device),
    }
    if peak:
        result['mfu'] = round(flops / seconds / peak, 4)
    return result


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        '--clips', type=int, default=4, help='clips per batch on CPU (x16 frame-window pairs)'
    )
    parser.add_argument('--gpu-clips', type=int, default=32, help='clips per batch on GPU')
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    parser.add_argument(
        '--compile-cpu',
        action='store_true',
        help='also torch.compile the CPU run (slow to compile)',
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [
        bench_encode(
            tiny(), torch.device('cpu'), args.clips, args.iters, bf16=False, compile_model=False
        )
    ]
    if args.compile_cpu:
        results.append(
            bench_encode(
                tiny(), torch.device('cpu'), args.clips, args.iters, bf16=False, compile_model=True
            )
        )
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        gpu = torch.device('cuda')
        results.append(
            bench_encode(
                cavmae_sync(), gpu, args.gpu_clips, args.iters, bf16=True, compile_model=True
            )
        )
    print(
        json.dumps(
            {
                'benchmark': 'encode',
                'unit': 'clips/s (16 frame-window pairs per clip)',
                'results': results,
            }
        )
    )


if __name__ == '__main__':
    main()
