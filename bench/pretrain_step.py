"""Speed of one pretraining optimizer step (forward + backward + AdamW) at batch 64.

Always measures the tiny preset on CPU (fp32, eager); when CUDA is available also the paper's model (ViT-B, L=416,
224 px, 75% masking) with bf16 autocast, torch.compile and fused AdamW. Reports samples/s, peak memory and model
FLOPs utilization (FLOPs of forward + backward counted by torch.utils.flop_counter; MFU against the GPU's dense
bf16 peak). Prints one JSON object.

    python bench/pretrain_step.py [--batch 64] [--iters 5] [--threads 2] [--compile-cpu] [--grad-checkpointing]
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


def step_flops(config, batch: int) -> int:
    "Forward + backward FLOPs of one training step, counted on the meta device (no memory, no compute)."
    with torch.device('meta'):
        model = CAVMAESync(config)
        audio = torch.empty(batch, config.audio_length, config.num_mel_bins)
        frames = torch.empty(batch, 3, config.image_size, config.image_size)
    return count_flops(lambda: model(audio, frames).loss.backward())


def bench_step(
    config,
    device: torch.device,
    batch: int,
    iters: int,
    bf16: bool,
    compile_model: bool,
    grad_ckpt: bool,
) -> dict:
    torch.manual_seed(0)
    model = CAVMAESync(config).to(device).train()
    model.set_grad_checkpointing(grad_ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type == 'cuda'
    optimizer = torch.optim.AdamW(
        params, lr=1e-4, weight_decay=5e-7, betas=(0.95, 0.999), fused=fused
    )
    forward = torch.compile(model) if compile_model else model
    audio = torch.randn(
        batch, config.audio_length, config.num_mel_bins, device=device
    )  # (B, L, 128)
    frames = torch.randn(
        batch, 3, config.image_size, config.image_size, device=device
    )  # (B, 3, H, W)
    losses = []

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(audio, frames)
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.detach())

    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    times = timed(step, device, warmup=3 if compile_model else 2, iters=iters)
    seconds = statistics.median(times)
    flops = step_flops(config, batch)
    peak = peak_bf16_flops(device)
    result = {
        **describe(device),
        'preset': 'tiny' if config.embed_dim < 768 else 'cavmae_sync',
        'batch': batch,
        'dtype': 'bf16-autocast' if bf16 else 'fp32',
        'compiled': compile_model,
        'grad_checkpointing': grad_ckpt,
        'params_m': round(sum(p.numel() for p in params) / 1e6, 2),
        'samples_per_s': round(batch / seconds, 2),
        'seconds_per_step': round(seconds, 4),
        'step_seconds_all': [round(t, 4) for t in times],
        'tflop_per_step': round(flops / 1e12, 4),
        'achieved_tflops': round(flops / seconds / 1e12, 4),
        'final_loss': round(float(losses[-1]), 4),
        **peak_memory_mb(device),
    }
    result['mfu'] = round(flops / seconds / peak, 4) if peak else None
    if not torch.isfinite(losses[-1]):
        raise RuntimeError(f'non-finite loss {losses[-1]} in the benchmark step')
    return result


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--iters', type=int, default=5)
    parser.add_argument('--threads', type=int, default=0, help='CPU threads (0: torch default)')
    parser.add_argument(
        '--compile-cpu',
        action='store_true',
        help='also torch.compile the CPU run (minutes to compile)',
    )
    parser.add_argument(
        '--grad-checkpointing', action='store_true', help='GPU run with gradient checkpointing'
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device('cpu')
    results = [
        bench_step(
            tiny(), cpu, args.batch, args.iters, bf16=False, compile_model=False, grad_ckpt=False
        )
    ]
    if args.compile_cpu:
        results.append(
            bench_step(
                tiny(), cpu, args.batch, args.iters, bf16=False, compile_model=True, grad_ckpt=False
            )
        )
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        results.append(
            bench_step(
                cavmae_sync(),
                torch.device('cuda'),
                args.batch,
                max(args.iters, 10),
                bf16=True,
                compile_model=True,
                grad_ckpt=args.grad_checkpointing,
            )
        )
    print(json.dumps({'benchmark': 'pretrain_step', 'results': results}))


if __name__ == '__main__':
    main()
