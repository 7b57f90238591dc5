"""bench/gpu.sh (bench/gpu.py) is not dead code: its --smoke run measures every section at tiny
sizes on a CPU (the compiled
path with dynamo's 'eager' backend) and writes one JSON file with the fields the GPU run fills."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_smoke_writes_one_json_with_every_section(tmp_path):
    out = tmp_path / 'gpu.json'
    done = subprocess.run(
        [
            'bash',
            str(ROOT / 'bench' / 'gpu.sh'),
            str(out),
            '--smoke',
            '--device',
            'cpu',
            '--batches',
            '2',
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'wrote {out}' in done.stdout
    report = json.loads(out.read_text())
    assert (
        report['device'] == 'cpu'
        and report['smoke']
        and report['peak_tflops_used'] is None
        and report['load_at_end']
    )
    steps = report['pretrain_step']
    assert {(r['precision'], r['compile']) for r in steps} == {
        (p, c) for p in ('bf16 autocast', 'fp16 autocast') for c in ('none', 'eager')
    }
    for r in steps:
        assert 'error' not in r, r
        assert (
            r['samples_per_s'] > 0 and r['tflop_per_step'] > 0 and r['mfu'] is None
        )  # no peak for a CPU
        assert r['samples_per_s'] == pytest.approx(r['batch'] / r['seconds_per_step'], rel=1e-2)
    assert (
        len({r['tflop_per_step'] for r in steps}) == 1
    )  # the same step counted, whatever precision or compile
    assert len(report['encode']) == 4 and all(r['clips_per_s'] > 0 for r in report['encode'])
    loop = report['loop_on_shards']
    assert loop['reader_samples_per_s_per_core']['raw (decoding on the device)'] > 0
    (run,) = loop['runs']
    assert 'error' not in run and run['loader_workers'] == 1 and run['samples_per_s'] > 0
    assert 0 < run['device_busy_fraction'] <= 1 and run['device_busy_fraction'] + run[
        'data_wait_fraction'
    ] == pytest.approx(1, abs=1e-3)
    assert (
        loop['loader_workers_needed']['observed'] == 1
        and loop['loader_workers_needed']['estimate_from_reader_rate'] >= 1
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is present: the full run is allowed')
def test_gpu_bench_without_a_gpu_refuses_the_full_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / 'bench' / 'gpu.py'), '--out', str(tmp_path / 'x.json')],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        done.returncode == 2
        and 'only --smoke runs' in done.stderr
        and not (tmp_path / 'x.json').exists()
    )
