"""Pretraining throughput with data loading: samples/s of the tiny preset on the CPU (synthetic
testbed, decoded-clip cache);
on a GPU also the paper's preset in bf16 with MFU and peak memory at the largest batch that fits.
Prints one JSON object."""

import argparse
import json
import os
import platform
import time

import torch

from cavmae_sync.model import CAVMAESync
from cavmae_sync.synthetic import default_synthetic
from cavmae_sync.train_config import model_preset
from cavmae_sync.testbed import measure_pretraining, tiny_pretrain_config


def model_flops_per_sample(config) -> float:
    """Training FLOPs of one sample (forward + backward = 3x forward), counting matmuls of the
    visible tokens (MAE masking)."""
    model = CAVMAESync(config)
    from torch.utils.flop_counter import FlopCounterMode

    audio = torch.randn(1, config.audio_length, config.num_mel_bins)
    frames = torch.randn(1, 3, config.image_size, config.image_size)
    with FlopCounterMode(display=False) as counter:
        model(audio, frames).loss.backward()
    return float(counter.get_total_flops())


def gpu_preset(steps: int) -> dict:
    "The paper's model in bf16 at the largest power-of-two batch that fits (synthetic tensors; the model's cost only)."
    config = model_preset('cavmae_sync')
    model = CAVMAESync(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    best = None
    for batch in (16, 32, 64, 128, 256, 512):
        try:
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.empty_cache()
            audio = torch.randn(batch, config.audio_length, config.num_mel_bins, device='cuda')
            frames = torch.randn(batch, 3, config.image_size, config.image_size, device='cuda')
            for i in range(steps + 2):
                if i == 2:
                    torch.cuda.synchronize()
                    start = time.time()
                with torch.autocast('cuda', dtype=torch.bfloat16):
                    loss = model(audio, frames).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            best = {
                'batch_size': batch,
                'samples_per_s': batch * steps / (time.time() - start),
                'peak_memory_gib': torch.cuda.max_memory_allocated() / 2**30,
            }
        except torch.cuda.OutOfMemoryError:
            break
    flops = model_flops_per_sample(config)
    peak = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12}.get(
        next((k for k in ('H100', 'H200', 'A100') if k in torch.cuda.get_device_name()), ''), None
    )
    best.update(
        device=torch.cuda.get_device_name(),
        precision='bf16',
        train_flops_per_sample=flops,
        mfu=best['samples_per_s'] * flops / peak if peak else None,
    )
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--steps', type=int, default=8, help='timed steps per measurement')
    parser.add_argument(
        '--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)'
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = default_synthetic()
    result = {
        'cpu': platform.processor() or platform.machine(),
        'cpu_cores': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
    }
    for kind in ('sync', 'cavmae'):
        config = tiny_pretrain_config(kind, root, progress=False, device='cpu')
        start = time.time()
        speed = measure_pretraining(config, steps=args.steps)
        result[f'tiny_{kind}_cpu'] = {
            'batch_size': config.batch_size,
            **speed,
            'with_setup_seconds': time.time() - start,
            'train_flops_per_sample': model_flops_per_sample(config.model),
        }
    if torch.cuda.is_available():
        result['cavmae_sync_gpu'] = gpu_preset(args.steps)
    print(json.dumps(result))


if __name__ == '__main__':
    main()
