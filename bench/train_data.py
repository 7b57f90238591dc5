"""Benchmark: training samples per second that one loader core delivers, from each storage format.

Writes 10-s 640x360 H.264 + AAC clips, then, on one core (torch.set_num_threads(1), no DataLoader workers), draws
training items (one random frame and its 416-frame window, 224 px) from:
  (a) the mp4 files, our preset (`ClipDataset`, decode by timestamps);
  (b) the mp4 files, the released preset (what a released checkpoint is fed: JPEG round trip included);
  (c) the released jpg + wav layout (`cavmae-sync-prepare --extract`);
  (d) WebDataset tar shards (`cavmae-sync-prepare --shards`, `shards.ShardDataset`), decoded per sample in the loader;
  (e) shards, batch decode: the loader only reads (`ShardDataset(raw=True)`, `batch_decode.collate_raw`) and
      `batch_decode.BatchDecoder` decodes batches of 32 where the model is. Reported as the loader core's rate (what one
      core delivers when the decoding runs on a GPU), the CPU fallback's rate (reading + decoding on the same one core),
      and, when CUDA is present, the decoder's rate on the GPU (else "not measured: no device").
Prints one JSON object: samples/s per loader core for each, the cores needed to feed 3,000 samples/s (the estimate for
the paper's model at 40% MFU on one H100), and the issue's 1,000 samples/s per core target.
Usage: python bench/train_data.py [NUM_CLIPS]
"""

import itertools
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from _media import write_upload_like_clips
from cavmae_sync.config import PreprocessConfig
from cavmae_sync.data import DatafileDataset, VideoDataset, prepare_dataset
from cavmae_sync.shards import ShardDataset, write_shards
from cavmae_sync.batch_decode import BatchDecoder, collate_raw

GPU_DEMAND = 3000  # samples/s: the paper's model at 40% MFU on one H100 (estimate from its FLOPs)


def samples_per_second(dataset, count: int) -> float:
    "Items per second over `count` training items (after one warm-up item)."
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = (item for _ in itertools.count() for item in dataset)  # pass after pass
    else:
        items = (dataset[i % len(dataset)] for i in itertools.count())
    next(items)
    start = time.perf_counter()
    for _ in range(count):
        next(items)
    return count / (time.perf_counter() - start)


def batch_decode_rates(shards, config, count: int, batch: int = 32) -> dict:
    """Samples/s of the raw reader alone, of reader + `BatchDecoder` on this CPU core, and of the
    decoder on CUDA if present."""
    raw = ShardDataset(shards, 'train', config, shuffle_buffer=1, raw=True)
    samples = (s for _ in itertools.count() for s in raw)  # pass after pass
    reader = samples_per_second(raw, max(count, batch * 4))
    cpu = BatchDecoder(config, 'cpu')
    cpu(collate_raw([next(samples) for _ in range(batch)]))  # warm-up
    start, batches = time.perf_counter(), 4
    for _ in range(batches):
        cpu(collate_raw([next(samples) for _ in range(batch)]))
    rates = {
        'shards_batch_decode_loader_core': reader,
        'shards_batch_decode_cpu_fallback': batches * batch / (time.perf_counter() - start),
    }
    if torch.cuda.is_available():
        gpu, packed = (
            BatchDecoder(config, 'cuda'),
            collate_raw([next(samples) for _ in range(batch)]).pin_memory(),
        )
        gpu(packed)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            gpu(packed)
        torch.cuda.synchronize()
        rates['shards_batch_decode_gpu_decoder'] = 20 * batch / (time.perf_counter() - start)
    return rates


def main():
    torch.set_num_threads(1)
    warnings.simplefilter('ignore')
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    ours, released = PreprocessConfig(), PreprocessConfig(frame_preset='released')
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        write_upload_like_clips(folder / 'videos', count)
        prepared = prepare_dataset(
            folder / 'videos', out=folder / 'layout', extract=True, workers=1, progress=False
        )
        write_shards(folder / 'videos', folder / 'shards', config=released, progress=False)
        formats = {
            'mp4_on_screen': VideoDataset(folder / 'videos', mode='train', config=ours),
            'mp4_released': VideoDataset(folder / 'videos', mode='train', config=released),
            'released_layout': DatafileDataset(prepared.datafile, mode='train', config=released),
            'shards': ShardDataset(folder / 'shards', 'train', released, shuffle_buffer=1),
        }
        rates = {name: samples_per_second(dataset, 2 * count) for name, dataset in formats.items()}
        rates.update(batch_decode_rates(folder / 'shards', released, 2 * count))
    print(
        json.dumps(
            {
                'benchmark': 'train_data',
                'threads': 1,
                'clips': count,
                'clip': '10 s, 640x360, 25 fps H.264 + AAC',
                'samples_per_s_per_loader_core': {k: round(v, 1) for k, v in rates.items()},
                'loader_cores_for_3000_samples_per_s': {
                    k: round(GPU_DEMAND / v) for k, v in rates.items() if 'gpu' not in k
                },
                'target_samples_per_s_per_loader_core': 1000,
                'notes': {
                    'shards_batch_decode_loader_core': 'the loader core reads tar files and draws frames/crops only; '
                    'the JPEG and fbank work runs on the training device',
                    'shards_batch_decode_cpu_fallback': 'reading + BatchDecoder (batches of 32) on '
                    'the same single CPU core',
                    'shards_batch_decode_gpu_decoder': 'BatchDecoder on CUDA, batches of 32'
                    if torch.cuda.is_available()
                    else 'not measured: no device',
                },
            },
            indent=1,
        )
    )


if __name__ == '__main__':
    main()
