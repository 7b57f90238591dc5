"""GPU figures of issue 11, written to ONE JSON file (rewritten after every measurement, so a run
cut short keeps what it had):

  pretrain_step   the paper's preset (`model.cavmae_sync()`: ViT-B, L=416, 224 px, 75% masking), one optimizer step
                  (forward, backward, AdamW) at batch 64 / 128 / 256, bf16 and fp16 autocast (fp16
                  with a GradScaler, as the
                  released code), eager and `torch.compile`d: samples/s, FLOPs, MFU, peak memory;
  encode          `model.encode` on whole clips (T = 16 frame-window pairs per clip): clips/s, bf16 and fp16;
  loop_on_shards  the pretraining loop fed from tar shards: DataLoader workers read raw samples
  (`ShardDataset(raw=True)`),
                  `batch_decode.BatchDecoder` decodes JPEGs (nvJPEG) and fbank windows on the GPU,
                  then the step; for each
                  number of loader workers: samples/s and the fraction of the time the GPU is busy;
                  and the loader workers needed.

FLOPs: counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device (forward +
backward of one step: matmuls,
attention, convolutions; elementwise ops, norms and the optimizer are not counted), as bench/pretrain_step.py does.
MFU = counted FLOPs / step time / the GPU's dense tensor-core peak (`PEAK_TFLOPS` below; bf16 and
fp16 peaks are equal on
those GPUs). On a CPU there is no meaningful peak: MFU is null.

    bench/gpu.sh                                   # on a GPU machine: everything, into bench/results/gpu-HOST-DATE.json
    python bench/gpu.py --out FILE [--smoke] [--sections pretrain_step encode loop_on_shards] [--batches 64 128 256]
           [--precisions bf16 fp16] [--compile {none,eager,inductor}...] [--workers 1 2 4 8] [--loop-steps 30]

`--smoke` runs every section at tiny sizes on whatever device there is (a CPU in CI, tests/test_bench_gpu.py), with
`torch.compile(backend='eager')` (traces the model with dynamo, no code generation) so the compiled path runs too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _model_bench import GPU_PEAK_BF16, count_flops, sync  # noqa: E402

from cavmae_sync.batch_decode import BatchDecoder, collate_raw  # noqa: E402
from cavmae_sync.config import PreprocessConfig  # noqa: E402
from cavmae_sync.model import CAVMAESync, cavmae_sync, tiny  # noqa: E402
from cavmae_sync.shards import ShardDataset, write_shards  # noqa: E402

PEAK_TFLOPS = {
    k: v / 1e12 for k, v in GPU_PEAK_BF16.items()
}  # dense bf16 = fp16 tensor-core peak, TFLOP/s
GPU_DEMAND = 3000  # samples/s: the estimate for the paper's model at 40% MFU on one H100 (issue 11)


def smoke_model():
    return tiny(
        embed_dim=64,
        num_heads=2,
        modality_depth=1,
        joint_depth=1,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        image_size=32,
        audio_length=64,
        num_frames=4,
        num_registers=2,
    )


def peak_tflops(device: torch.device):
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if all(part in name for part in key.split()):
            return PEAK_TFLOPS[key]
    return None


def load() -> str:
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True, timeout=5).stdout.strip()
    except OSError:
        return f"loadavg {os.getloadavg()}"


def memory(device: torch.device) -> dict:
    if device.type == 'cuda':
        return {'peak_memory_gib': round(torch.cuda.max_memory_allocated(device) / 2**30, 2)}
    import resource

    return {
        'peak_rss_gib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    }  # Linux: KiB


def autocast(device: torch.device, precision: str):
    return torch.autocast(
        device.type, dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[precision]
    )


def step_flops(config, batch: int) -> int:
    "Forward + backward FLOPs of one training step, counted on the meta device (no memory, no compute)."
    with torch.device('meta'):
        model = CAVMAESync(config)
        audio = torch.empty(batch, config.audio_length, config.num_mel_bins)  # (B, L, 128)
        frames = torch.empty(batch, 3, config.image_size, config.image_size)  # (B, 3, H, W)
    return count_flops(lambda: model(audio, frames).loss.backward())


class Trainer:
    "One pretraining optimizer step as `train.fit` takes it: autocast forward, (scaled) backward, AdamW, scaler update."

    def __init__(self, config, device: torch.device, precision: str, compile_backend: str | None):
        torch.manual_seed(0)
        self.device, self.precision = device, precision
        self.model = CAVMAESync(config).to(device).train()
        self.forward = (
            torch.compile(self.model, backend=compile_backend) if compile_backend else self.model
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=1e-4, weight_decay=5e-7, betas=(0.95, 0.999)
        )
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
        self.last_loss = None

    def step(self, audio: torch.Tensor, frames: torch.Tensor):  # (B, L, 128), (B, 3, H, W)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            loss = self.forward(audio, frames).loss
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.last_loss = loss.detach()


def timed(fn, device, warmup: int, iters: int) -> list:
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


def oom_safe(fn):
    "Run a measurement; an out-of-memory error becomes a recorded result instead of ending the run."
    try:
        return fn()
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {'error': f'out of memory: {str(e).splitlines()[0][:200]}'}


def bench_pretrain_step(config, device, batch, precision, compile_backend, iters, warmup) -> dict:
    def run():
        torch._dynamo.reset()  # static shapes: compile each size afresh
        if device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(config, device, precision, compile_backend)
        audio = torch.randn(
            batch, config.audio_length, config.num_mel_bins, device=device
        )  # (B, L, 128)
        frames = torch.randn(
            batch, 3, config.image_size, config.image_size, device=device
        )  # (B, 3, H, W)
        start = time.perf_counter()
        trainer.step(audio, frames)
        sync(device)
        first = time.perf_counter() - start  # includes compilation
        times = timed(lambda: trainer.step(audio, frames), device, warmup=warmup, iters=iters)
        seconds, flops, peak = (
            statistics.median(times),
            step_flops(config, batch),
            peak_tflops(device),
        )
        if not torch.isfinite(trainer.last_loss):
            raise RuntimeError(f'non-finite loss {trainer.last_loss} in the benchmark step')
        return {
            'batch': batch,
            'precision': f'{precision} autocast',
            'compile': compile_backend or 'none',
            'first_step_seconds': round(first, 3),
            'seconds_per_step': round(seconds, 5),
            'samples_per_s': round(batch / seconds, 2),
            'tflop_per_step': round(flops / 1e12, 5),
            'achieved_tflops': round(flops / seconds / 1e12, 4),
            'mfu': round(flops / seconds / 1e12 / peak, 4) if peak else None,
            **memory(device),
        }

    return oom_safe(run)


def bench_encode(config, device, clips, precision, compile_backend, iters, warmup) -> dict:
    def run():
        torch._dynamo.reset()
        if device.type == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        torch.manual_seed(0)
        model, T = CAVMAESync(config).to(device).eval(), config.num_frames
        encode = (
            torch.compile(model.encode, backend=compile_backend)
            if compile_backend
            else model.encode
        )
        audio = torch.randn(
            clips * T, config.audio_length, config.num_mel_bins, device=device
        )  # (clips*T, L, 128)
        frames = torch.randn(
            clips * T, 3, config.image_size, config.image_size, device=device
        )  # (clips*T, 3, H, W)

        def call():
            with torch.inference_mode(), autocast(device, precision):
                encode(audio, frames)

        seconds = statistics.median(timed(call, device, warmup=warmup, iters=iters))
        return {
            'clips_per_batch': clips,
            'frames_per_clip': T,
            'precision': f'{precision} autocast',
            'compile': compile_backend or 'none',
            'clips_per_s': round(clips / seconds, 2),
            'seconds_per_batch': round(seconds, 5),
            **memory(device),
        }

    return oom_safe(run)


def make_shards(
    folder: Path, preprocess: PreprocessConfig, clips: int, seconds: float, size, parts: int
) -> list:
    "`clips` upload-like clips written as shards of one clip each, by `parts` processes (as `--part I/N` jobs would)."
    from _media import write_upload_like_clips

    write_upload_like_clips(folder / 'videos', clips, seconds=seconds, size=size)
    if parts <= 1:
        write_shards(
            folder / 'videos', folder / 'shards', config=preprocess, shard_bytes=1, progress=False
        )
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(parts) as pool:
            list(
                pool.map(_write_part, [(folder, preprocess, part, parts) for part in range(parts)])
            )
    return sorted((folder / 'shards').glob('*.tar'))


def _write_part(task):
    folder, preprocess, part, parts = task
    torch.set_num_threads(1)
    write_shards(
        folder / 'videos',
        folder / 'shards',
        part=part,
        parts=parts,
        config=preprocess,
        shard_bytes=1,
        progress=False,
    )


def reader_rate(shards, preprocess, raw: bool, count: int) -> float:
    "Samples/s of one reader on one core: raw (the loader's share when the GPU decodes) or decoded per sample."
    torch.set_num_threads(1)
    try:
        data = ShardDataset(shards, 'train', preprocess, shuffle_buffer=1, raw=raw)
        items = (s for _ in itertools.count() for s in data)
        next(items)
        start = time.perf_counter()
        for _ in range(count):
            next(items)
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def bench_loop(
    config, preprocess, device, shards, batch, precision, workers, steps, warmup
) -> dict:
    "`steps` pretraining steps fed from shards by `workers` loader processes, decoding on the device."

    def run():
        trainer, decoder = (
            Trainer(config, device, precision, None),
            BatchDecoder(preprocess, device),
        )
        repeats = math.ceil((warmup + steps + 2) * batch / len(shards)) * max(1, workers)
        data = ShardDataset(
            shards * repeats, 'train', preprocess, shuffle_buffer=min(64, batch), seed=0, raw=True
        )
        loader = DataLoader(
            data,
            batch_size=batch,
            num_workers=workers,
            pin_memory=device.type == 'cuda',
            drop_last=True,
            collate_fn=collate_raw,
            prefetch_factor=4 if workers else None,
        )
        batches, waited, busy, decoding = iter(loader), 0.0, 0.0, 0.0
        for i in range(warmup + steps):
            start = time.perf_counter()
            raw = next(batches)  # the GPU idles while this waits
            arrived = time.perf_counter()
            inputs = decoder(raw)  # nvJPEG + fbank on the device
            if i == warmup:
                sync(device)
                decoded = time.perf_counter()
                decoding = decoded - arrived
            trainer.step(inputs['audio'], inputs['frames'])
            sync(device)
            if i >= warmup:
                waited += arrived - start
                busy += time.perf_counter() - arrived
        del batches
        total = waited + busy
        return {
            'loader_workers': workers,
            'batch': batch,
            'precision': f'{precision} autocast',
            'steps': steps,
            'samples_per_s': round(steps * batch / total, 2),
            'device_busy_fraction': round(busy / total, 4),
            'data_wait_fraction': round(waited / total, 4),
            'decode_seconds_one_batch': round(decoding, 5),
            **memory(device),
        }

    return oom_safe(run)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument('--out', required=True, help='the JSON file to write')
    parser.add_argument('--smoke', action='store_true', help='tiny sizes, any device (CI)')
    parser.add_argument('--device', default='auto')
    parser.add_argument(
        '--sections', nargs='+', default=['pretrain_step', 'encode', 'loop_on_shards']
    )
    parser.add_argument('--batches', type=int, nargs='+')
    parser.add_argument(
        '--precisions', nargs='+', default=['bf16', 'fp16'], choices=['bf16', 'fp16']
    )
    parser.add_argument(
        '--compile',
        nargs='+',
        dest='compile_modes',
        help="'none', 'inductor' (torch.compile default), 'eager'",
    )
    parser.add_argument('--iters', type=int)
    parser.add_argument('--encode-clips', type=int)
    parser.add_argument(
        '--workers', type=int, nargs='+', help='loader worker counts to try in the loop on shards'
    )
    parser.add_argument('--loop-batch', type=int)
    parser.add_argument('--loop-steps', type=int)
    parser.add_argument(
        '--loop-clips', type=int, help='distinct clips in the shards (read again and again)'
    )
    args = parser.parse_args(argv)
    device = torch.device(
        ('cuda' if torch.cuda.is_available() else 'cpu') if args.device == 'auto' else args.device
    )
    smoke = args.smoke
    if not smoke and device.type != 'cuda':
        parser.error(
            'without a GPU only --smoke runs (the paper-size figures would take hours on a CPU)'
        )
    config = smoke_model() if smoke else cavmae_sync()
    preprocess = PreprocessConfig(
        num_frames=config.num_frames,
        window=config.audio_length,
        image_size=config.image_size,
        frame_preset='released',
    )
    batches = args.batches or ([2, 4] if smoke else [64, 128, 256])
    compile_modes = args.compile_modes or (['none', 'eager'] if smoke else ['none', 'inductor'])
    iters, warmup = args.iters or (1 if smoke else 10), 1 if smoke else 3
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        'benchmark': 'gpu',
        'smoke': smoke,
        'device': device.type,
        'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        'cpu': platform.processor() or platform.machine(),
        'cpu_count': os.cpu_count(),
        'torch': torch.__version__,
        'load_at_start': load(),
        'preset': 'smoke (tiny)'
        if smoke
        else 'cavmae_sync (the paper: ViT-B, L=416, 224 px, T=16, 75% masking)',
        'model_config': config.to_dict() if hasattr(config, 'to_dict') else str(config),
        'flop_method': 'torch.utils.flop_counter.FlopCounterMode on the meta device: forward + backward of one step '
        '(matmul, attention, convolution FLOPs; elementwise, norms and the optimizer not counted)',
        'peak_tflops_dense_bf16_fp16': PEAK_TFLOPS,
        'peak_tflops_used': peak_tflops(device),
        'pretrain_step': [],
        'encode': [],
        'loop_on_shards': {},
    }

    def save():
        out.write_text(json.dumps(report, indent=1))

    save()
    if 'pretrain_step' in args.sections:
        for mode, precision, batch in itertools.product(compile_modes, args.precisions, batches):
            backend = None if mode == 'none' else mode
            report['pretrain_step'].append(
                bench_pretrain_step(config, device, batch, precision, backend, iters, warmup)
            )
            save()
    if 'encode' in args.sections:
        clips = args.encode_clips or (2 if smoke else 32)
        for mode, precision in itertools.product(compile_modes, args.precisions):
            report['encode'].append(
                bench_encode(
                    config,
                    device,
                    clips,
                    precision,
                    None if mode == 'none' else mode,
                    iters,
                    warmup,
                )
            )
            save()
    if 'loop_on_shards' in args.sections:
        loop = report['loop_on_shards']
        clips = args.loop_clips or (4 if smoke else 32)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            shards = make_shards(
                Path(folder),
                preprocess,
                clips,
                2.0 if smoke else 10.0,
                (64, 48) if smoke else (640, 360),
                1 if smoke else max(1, (os.cpu_count() or 2) - 1),
            )
            loop['clips'], loop['clip'] = (
                clips,
                '2 s 64x48'
                if smoke
                else '10 s 640x360 25 fps H.264 + AAC, written as released-preset shards',
            )
            loop['write_seconds'] = round(time.perf_counter() - start, 2)
            count = 8 if smoke else 400
            loop['reader_samples_per_s_per_core'] = {
                'raw (decoding on the device)': round(
                    reader_rate(shards, preprocess, True, count), 1
                ),
                'decoded per sample in the loader (CPU)': round(
                    reader_rate(shards, preprocess, False, count // 4), 1
                ),
            }
            save()
            batch = args.loop_batch or (4 if smoke else 128)
            workers_list = args.workers or (
                [1] if smoke else [1, 2, 4, 8, max(1, (os.cpu_count() or 2) - 2)]
            )
            loop['runs'] = []
            for workers in sorted(set(workers_list)):
                loop['runs'].append(
                    bench_loop(
                        config,
                        preprocess,
                        device,
                        shards,
                        batch,
                        args.precisions[0],
                        workers,
                        args.loop_steps or (3 if smoke else 30),
                        1 if smoke else 5,
                    )
                )
                save()
            ok = [r for r in loop['runs'] if 'error' not in r]
            if ok:
                best = max(r['device_busy_fraction'] for r in ok)
                enough = [
                    r['loader_workers'] for r in ok if r['device_busy_fraction'] >= 0.95 * best
                ]
                loop['loader_workers_needed'] = {
                    'observed': min(enough),
                    'rule': 'fewest workers whose device-busy fraction is within 5% of the best one measured',
                    'estimate_from_reader_rate': math.ceil(
                        max(r['samples_per_s'] / max(r['device_busy_fraction'], 1e-9) for r in ok)
                        / loop['reader_samples_per_s_per_core']['raw (decoding on the device)']
                    ),
                    'estimate_rule': 'the step rate of an unstarved device (samples/s / busy '
                    'fraction) over one raw reader core',
                    f'for_{GPU_DEMAND}_samples_per_s': math.ceil(
                        GPU_DEMAND
                        / loop['reader_samples_per_s_per_core']['raw (decoding on the device)']
                    ),
                }
            loop['busy_method'] = (
                'per step: time blocked in next(loader) = data wait; time from the batch arriving to the end of '
                'decode + step (torch.cuda.synchronize) = busy; fraction = busy / (busy + wait)'
            )
    report['load_at_end'] = load()
    save()
    print(
        json.dumps(
            {
                'out': str(out),
                'pretrain_step': len(report['pretrain_step']),
                'encode': len(report['encode']),
            }
        )
    )


if __name__ == '__main__':
    main()
