"""Retrieval similarity at the size of the paper's VGGSound subset: 1,545 clips x 16 frames x 768 dims, on CPU.

Each strategy runs in its own process with 2 torch threads. Time is wall-clock for `similarity` plus
`recall_metrics` in both directions (R@k as the expectation over random tie orders; the median of `--repeats`
runs); extra memory is the peak resident set size during the run minus the resident size just before it (the
kernel's peak counter is reset first, so the allocations made to create the inputs do not count). Targets
(issue 6): diagonal_* < 3 s, mean / max < 60 s, extra memory < 2 GB. Prints one JSON object.

    python bench/retrieval.py [--clips 1545] [--frames 16] [--dim 768] [--threads 2] [--repeats 3]
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import statistics
import time

TARGET_SECONDS = {'diagonal_mean': 3.0, 'diagonal_max': 3.0, 'mean': 60.0, 'max': 60.0}
TARGET_EXTRA_MB = 2048


def _status_kb(field):
    match = re.search(rf'{field}:\s+(\d+) kB', open('/proc/self/status').read())
    return int(match.group(1)) if match else None


def _reset_peak():
    "Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _run(strategy, clips, frames, dim, threads, repeats, queue):
    import torch
    import torch.nn.functional as F
    from cavmae_sync.retrieval import similarity
    from cavmae_sync.metrics import recall_metrics

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    audio = F.normalize(torch.randn(clips, frames, dim, generator=gen), dim=-1)  # (N, T, D) float32
    video = F.normalize(torch.randn(clips, frames, dim, generator=gen), dim=-1)
    similarity(audio[:8], video[:8], strategy)  # warm-up (thread pool, kernels)
    seconds, extra_mb, metrics = [], [], None
    for _ in range(repeats):
        exact = _reset_peak()
        before_kb = (
            _status_kb('VmRSS') if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        start = time.perf_counter()
        scores = similarity(audio, video, strategy)  # (N, N)
        metrics = {
            'audio_to_video': recall_metrics(scores),
            'video_to_audio': recall_metrics(scores.T),
        }
        seconds.append(time.perf_counter() - start)
        peak_kb = (
            _status_kb('VmHWM') if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        )
        extra_mb.append(max(0, peak_kb - before_kb) / 1024)
        del scores
    queue.put(
        {
            'seconds': round(statistics.median(seconds), 3),
            'seconds_all': [round(s, 3) for s in seconds],
            'extra_memory_mb': round(max(extra_mb), 1),
            'peak_counter': 'VmHWM (reset)' if exact else 'ru_maxrss',
            'R@1_audio_to_video': round(metrics['audio_to_video']['R@1'], 3),
            'ties_audio_to_video': metrics['audio_to_video']['ties'],
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--clips', type=int, default=1545)
    parser.add_argument('--frames', type=int, default=16)
    parser.add_argument('--dim', type=int, default=768)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--strategies', nargs='+', default=list(TARGET_SECONDS))
    args = parser.parse_args()
    context = mp.get_context('spawn')
    results = {}
    for strategy in args.strategies:
        queue = context.Queue()
        process = context.Process(
            target=_run,
            args=(
                strategy,
                args.clips,
                args.frames,
                args.dim,
                args.threads,
                1 if strategy == 'max' else args.repeats,
                queue,
            ),
        )
        process.start()
        result = queue.get()
        process.join()
        result['target_seconds'] = TARGET_SECONDS[strategy]
        result['ok'] = (
            result['seconds'] < TARGET_SECONDS[strategy]
            and result['extra_memory_mb'] < TARGET_EXTRA_MB
        )
        results[strategy] = result
    print(
        json.dumps(
            {
                'benchmark': 'retrieval_similarity',
                'clips': args.clips,
                'frames': args.frames,
                'dim': args.dim,
                'torch_threads': args.threads,
                'cpu_count': os.cpu_count(),
                'machine': platform.machine(),
                'target_extra_memory_mb': TARGET_EXTRA_MB,
                'strategies': results,
                'all_ok': all(r['ok'] for r in results.values()),
            }
        )
    )


if __name__ == '__main__':
    main()
