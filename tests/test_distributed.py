"""Distributed training checked for what it promises: 2 `torchrun` processes on CPU (gloo) end with identical weights,
each trained on its own disjoint half of every global batch, together on the same samples as a 1-process run, and a
killed 2-process run resumes with each rank's RNG state (its losses and weights equal the uninterrupted run's)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from cavmae_sync.checkpoint import load_checkpoint
from distributed_driver import recorded_run
from killed_training import killed_cli
from training_setup import MINI_MODEL, cli, RUN_FLAGS

HERE = Path(__file__).resolve().parent
DRIVER = HERE / 'distributed_driver.py'
STEPS = 6  # 16 clips / batch 4 = 4 steps per epoch: the run crosses an epoch end, the kill (step 3) is mid-epoch


def settings(clips: Path, out: Path, *extra) -> list[str]:
    return [
        *MINI_MODEL,
        '--train_data',
        str(clips / 'train.json'),
        '--eval_data',
        str(clips / 'test.json'),
        '--output_dir',
        str(out),
        *RUN_FLAGS,
        '--max_steps',
        str(STEPS),
        '--checkpoint_every',
        '3',
        *extra,
    ]


def torchrun(program: list[str], argv: list[str], **env) -> subprocess.CompletedProcess:
    "2 processes of `program` (an executable and its first arguments) on the CPU, through torchrun."
    command = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node',
        '2',
        '--no-python',
        *program,
        *argv,
    ]
    environment = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', **env}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def driver(kind: str, record: Path) -> list[str]:
    "The recording driver: every rank writes its samples and final weights to `record`."
    return [sys.executable, str(DRIVER), kind, str(record)]


def records(record: Path) -> list[dict]:
    return [
        {**json.loads((record / f'rank{r}.json').read_text()), **torch.load(record / f'rank{r}.pt')}
        for r in (0, 1)
    ]


@pytest.fixture(scope='module')
def ddp_run(clips, tmp_path_factory):
    "An uninterrupted 2-process pretraining run: (output folder, per-rank records, the launch)."
    tmp = tmp_path_factory.mktemp('ddp_run')
    out, record = tmp / 'run', tmp / 'record'
    done = torchrun(driver('pretrain', record), settings(clips, out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out, records(record), done


def test_torchrun_two_processes_on_cpu(ddp_run, clips, tmp_path):
    out, ranks, done = ddp_run
    assert sorted(p.name for p in out.glob('*.pt')) == [
        'last.pt',
        'model.pt',
    ]  # written once (rank 0), no stray files
    assert not list(out.rglob('*.partial')) and not list(out.glob('.*tmp*'))
    state = load_checkpoint(out / 'last.pt').training_state
    assert state['step'] == STEPS and len(state['rng_states']) == 2  # both ranks' RNG states
    assert not torch.equal(
        state['rng_states'][0]['torch'], state['rng_states'][1]['torch']
    )  # each its own
    derived = json.loads((out / 'config.json').read_text())['derived']
    assert derived['world_size'] == 2 and derived['micro_batch'] == 2
    assert list(pd.read_csv(out / 'train_log.csv')['step']) == list(
        range(1, STEPS + 1)
    )  # one log, from rank 0

    # both ranks hold the same weights, which changed, and model.pt is them
    model = load_checkpoint(out / 'model.pt').build_model()
    saved = model.state_dict()
    for name, weight in ranks[0]['weights'].items():
        assert torch.equal(weight, ranks[1]['weights'][name]), (
            f'{name} differs between the ranks: gradients were not synchronized'
        )
        assert torch.equal(weight, saved[name]), name
    unchanged = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and torch.equal(ranks[0]['weights'][n], ranks[0]['initial'][n])
    ]
    assert not unchanged, f'trainable parameters that never changed: {unchanged}'

    # every global batch of 4 is split into two disjoint halves, one per rank; together they are the
    # 1-process run's samples
    recorded_run(
        'pretrain', tmp_path / 'record', settings(clips, tmp_path / 'single', '--eval_data', '')
    )
    single = json.loads((tmp_path / 'record' / 'rank0.json').read_text())
    assert single['world_size'] == 1 and len(single['steps']) == STEPS
    assert [len(r['steps']) for r in ranks] == [STEPS, STEPS]
    for step in range(STEPS):
        halves = [[tuple(s) for s in r['steps'][step]] for r in ranks]
        assert [len(h) for h in halves] == [2, 2]
        assert not {i for i, _ in halves[0]} & {i for i, _ in halves[1]}, (
            f'step {step + 1}: both ranks trained on the same clip'
        )
        assert sorted(halves[0] + halves[1]) == sorted(tuple(s) for s in single['steps'][step]), (
            f'step {step + 1}'
        )  # clips and frames
    assert (
        len({i for r in ranks for step in r['steps'][:4] for i, _ in step}) == 16
    )  # the first epoch covers every clip once


def test_killed_torchrun_run_resumes_with_each_ranks_rng_state(ddp_run, clips, tmp_path):
    reference = ddp_run[0]
    out = tmp_path / 'run'
    killed = torchrun(
        killed_cli(3), settings(clips, out)
    )  # both ranks die after step 3's checkpoint
    assert killed.returncode != 0, 'the run was not killed'
    assert not (out / 'model.pt').exists() and not list(out.rglob('*.partial'))
    state = load_checkpoint(out / 'last.pt').training_state
    assert state['step'] == 3 and len(state['rng_states']) == 2  # mid-epoch (4 steps per epoch)
    assert int(pd.read_csv(out / 'train_log.csv')['step'].max()) == 3

    resumed = torchrun(
        cli('cavmae-sync-pretrain'), ['--config', str(out / 'config.json'), '--resume']
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summaries = [line for line in resumed.stdout.splitlines() if line.startswith('{')]
    assert len(summaries) == 1  # rank 0 reports
    assert json.loads(summaries[0])['steps'] == STEPS and json.loads(summaries[0])['completed']
    losses, expected = (
        pd.read_csv(p / 'train_log.csv').set_index('step') for p in (out, reference)
    )
    assert list(losses.index) == list(range(1, STEPS + 1))
    for column in ('loss', 'mae_loss_audio', 'mae_loss_video', 'contrastive_loss'):
        assert losses[column].tolist() == expected[column].tolist(), column  # bit for bit
    final, wanted = (
        load_checkpoint(out / 'model.pt').state_dict,
        load_checkpoint(reference / 'model.pt').state_dict,
    )
    assert all(torch.equal(final[k], wanted[k]) for k in wanted)
    evaluations = pd.read_csv(out / 'eval_log.csv')
    assert evaluations['step'].is_monotonic_increasing and evaluations['step'].is_unique
