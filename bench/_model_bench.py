"Shared helpers of bench/encode.py and bench/pretrain_step.py: device description, FLOP counting, peak FLOP/s."

from __future__ import annotations

import os
import platform
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s
GPU_PEAK_BF16 = {
    'H100 SXM': 989e12,
    'H100 NVL': 835e12,
    'H100 PCIe': 756e12,
    'H100': 989e12,
    'H200': 989e12,
    'GH200': 989e12,
    'A100': 312e12,
    'L40S': 362e12,
    'A10G': 70e12,
    'RTX 4090': 165e12,
}


def pick_device(requested: str) -> torch.device:
    if requested == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(requested)


def describe(device: torch.device) -> dict:
    info = {'device': device.type, 'torch': torch.__version__}
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    else:
        info['cpu'] = platform.processor() or platform.machine()
        info['threads'] = torch.get_num_threads()
        info['cpu_count'] = os.cpu_count()
    return info


def peak_bf16_flops(device: torch.device):
    "Peak dense bf16 FLOP/s of a known GPU, else None (no meaningful peak for a CPU)."
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return GPU_PEAK_BF16[key]
    return None


def count_flops(fn) -> int:
    "FLOPs of the matmuls / convolutions / attention that `fn()` runs (forward and, if it calls it, backward)."
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, iters: int) -> list:
    "Seconds per call of `fn` after `warmup` calls."
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mb(device: torch.device) -> dict:
    if device.type == 'cuda':
        return {'peak_gpu_memory_mb': round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
    return {
        'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    }  # Linux: KiB
