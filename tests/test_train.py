"""Training: exact resume after a kill (streaming data, DataLoader workers), the NaN guard, config
handling and fine-tuning (torchrun: test_distributed.py)."""

import dataclasses
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from cavmae_sync import (
    clip_cache,
    finetuning,
    pretraining,
    testbed,
    train,
    train_config,
    training_data,
)
from cavmae_sync.checkpoint import load_checkpoint
from cavmae_sync.model import CAVMAESync
from killed_training import killed_cli
from training_setup import MINI_MODEL, cli, RUN_FLAGS


def pretrain_args(clips: Path, out: Path, *extra) -> list[str]:
    return [
        *MINI_MODEL,
        '--train_data',
        str(clips / 'train.json'),
        '--eval_data',
        str(clips / 'test.json'),
        '--output_dir',
        str(out),
        *RUN_FLAGS,
        *extra,
    ]


def subprocess_env() -> dict:
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def step_losses(out: Path) -> pd.Series:
    return pd.read_csv(out / 'train_log.csv').set_index('step')['loss']


def test_killed_streaming_run_resumes_bit_for_bit(clips, tmp_path):
    """Kill (tests/killed_training.py: right after the mid-epoch checkpoint of step 6) a run that decodes every clip in
    2 DataLoader workers; resume it."""
    common = [
        '--epochs',
        '3',
        '--checkpoint_every',
        '3',
        '--eval_every',
        '4',
        '--cache',
        'none',
        '--num_workers',
        '2',
    ]
    runs = {}
    for name, program in (('full', cli('cavmae-sync-pretrain')), ('killed', killed_cli(6))):
        with open(
            tmp_path / f'{name}.err', 'w'
        ) as err:  # files, not pipes: orphaned workers may hold them a moment
            runs[name] = subprocess.run(
                program + pretrain_args(clips, tmp_path / name, *common),
                env=subprocess_env(),
                stdout=subprocess.DEVNULL,
                stderr=err,
                timeout=300,
            ).returncode
    assert runs['full'] == 0, (tmp_path / 'full.err').read_text()[-3000:]
    reference = step_losses(tmp_path / 'full')
    assert list(reference.index) == list(range(1, 13))  # 16 clips / 4 = 4 steps x 3 epochs
    killed = tmp_path / 'killed'
    assert runs['killed'] == 137, (
        f"the run was not killed: {(tmp_path / 'killed.err').read_text()[-2000:]}"
    )
    assert not (killed / 'model.pt').exists()
    assert not list(killed.rglob('*.partial')) and not list(
        killed.glob('.*tmp*')
    )  # no temporary file left behind
    saved = load_checkpoint(killed / 'last.pt')
    assert saved.training_state['step'] == 6 and 6 % 4 != 0  # the checkpoint of step 6, mid-epoch 2
    assert (
        saved.training_state['train_config']['cache'] == 'none'
        and saved.training_state['train_config']['num_workers'] == 2
    )
    assert int(pd.read_csv(killed / 'train_log.csv')['step'].max()) == 6

    resumed = subprocess.run(
        cli('cavmae-sync-pretrain') + ['--config', str(killed / 'config.json'), '--resume'],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    # every step the resumed run logged is compared before its exit status: a resume that reads other batches (one
    # batch skipped, say) differs at step 7, even when it later runs out of batches at the epoch's end
    losses = step_losses(killed)
    assert (
        losses.index.max() > 6 and losses.tolist() == reference.loc[losses.index].tolist()
    )  # bit for bit
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(losses.index) == list(range(1, 13))
    assert losses.tolist() == reference.tolist()
    final_a, final_b = (
        load_checkpoint(tmp_path / 'full' / 'model.pt').state_dict,
        load_checkpoint(killed / 'model.pt').state_dict,
    )
    assert final_a.keys() == final_b.keys() and all(
        torch.equal(final_a[k], final_b[k]) for k in final_a
    )
    assert list(pd.read_csv(killed / 'eval_log.csv')['step']) == [4, 8, 12]
    assert not list(killed.rglob('*.partial'))


def mini_config(clips: Path, out: Path, cls=train_config.PretrainConfig, **overrides):
    return train_config.config_from_args(
        cls, pretrain_args(clips, out) + [f'--set={k}={v}' for k, v in overrides.items()]
    )


def test_nan_loss_stops_the_run(clips, tmp_path, monkeypatch):
    original, calls = CAVMAESync.forward, {'n': 0}

    def forward_with_nan(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls['n'] += 1
        if calls['n'] == 5:
            out.loss = out.loss * float('nan')  # the 5th training step
        return out

    monkeypatch.setattr(CAVMAESync, 'forward', forward_with_nan)
    config = mini_config(clips, tmp_path / 'nan', epochs=3, checkpoint_every=2, eval_data='')
    with pytest.raises(
        train.NonFiniteLossError, match=r'non-finite loss at step 5: loss=nan'
    ) as caught:
        pretraining.pretrain(config)
    assert caught.value.step == 5 and 'mae_loss_audio' in caught.value.losses
    state = load_checkpoint(tmp_path / 'nan' / 'last.pt')
    assert state.training_state['step'] == 4  # the last good checkpoint
    assert all(torch.isfinite(v).all() for v in state.state_dict.values() if v.is_floating_point())


def test_cli_reports_nan_and_refuses_to_overwrite(clips, tmp_path):
    out = tmp_path / 'run'
    args = pretrain_args(clips, out, '--max_steps', '2', '--eval_data', '')
    assert (
        subprocess.run(
            cli('cavmae-sync-pretrain') + args,
            env=subprocess_env(),
            capture_output=True,
            timeout=300,
        ).returncode
        == 0
    )
    again = subprocess.run(
        cli('cavmae-sync-pretrain') + args,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        again.returncode == 1
        and 'already holds a run' in again.stderr
        and 'Traceback' not in again.stderr
    )
    changed = subprocess.run(
        cli('cavmae-sync-pretrain') + args + ['--resume', '--lr', '5e-4'],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert changed.returncode != 0 and 'cannot resume' in changed.stderr and 'lr' in changed.stderr
    typo = subprocess.run(
        cli('cavmae-sync-pretrain') + args + ['--set', 'learning_rate=1'],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert typo.returncode == 2 and "unknown setting 'learning_rate'" in typo.stderr


def test_cached_items_equal_decoded_items(clips):
    config = mini_config(clips, Path('unused'))
    plain = training_data.clip_dataset(
        dataclasses.replace(config, cache='none'), config.train_data, 'train'
    )
    cached = training_data.clip_dataset(
        dataclasses.replace(config, cache='memory'), config.train_data, 'train'
    )
    assert isinstance(cached, clip_cache.DecodedClips) and not isinstance(
        plain, clip_cache.DecodedClips
    )
    for index in range(3):
        with train.seeded_global_rngs(index):
            a = plain[index]
        with train.seeded_global_rngs(index):
            b = cached[index]
        assert a['frame_index'] == b['frame_index']
        assert (
            torch.equal(a['frames'], b['frames'])
            and torch.equal(a['audio'], b['audio'])
            and torch.equal(a['labels'], b['labels'])
        )


def test_finetune_and_linear_probe(clips, tmp_path):
    pretrained = pretraining.pretrain(
        mini_config(clips, tmp_path / 'pre', max_steps=4, eval_data='')
    )
    common = pretrain_args(
        clips,
        tmp_path / 'ft',
        '--pretrained',
        str(pretrained.checkpoint_path),
        '--epochs',
        '2',
        '--head_lr_multiplier',
        '10',
        '--freqm',
        '8',
        '--timem',
        '8',
        '--mixup',
        '0.5',
        '--label_smoothing',
        '0.1',
        '--balanced_sampling',
        '--average_from_epoch',
        '1',
    )
    result = finetuning.finetune(train_config.config_from_args(train_config.FinetuneConfig, common))
    assert (
        result.metric_name == 'mAP' and 0 <= result.metric <= 100
    )  # the synthetic set is multi-label
    model = load_checkpoint(result.checkpoint_path).build_model()
    assert model.num_classes == 10
    evaluations = pd.read_csv(tmp_path / 'ft' / 'eval_log.csv')
    assert evaluations['averaged_epochs'].dropna().iloc[-1] == 2
    probe_args = [a if a != str(tmp_path / 'ft') else str(tmp_path / 'probe') for a in common] + [
        '--method',
        'linear_probe',
        '--probe_epochs',
        '5',
    ]
    probe = finetuning.finetune(
        train_config.config_from_args(train_config.FinetuneConfig, probe_args)
    )
    assert probe.metric_name == 'mAP' and len(probe.history) == 5


def mini_model():
    "The few-thousand-parameter model of training_setup.MINI_MODEL, as a ModelConfig."
    return train_config.config_from_args(train_config.PretrainConfig, MINI_MODEL).model


def tiny_run(clips: Path, data: Path, monkeypatch, **kwargs) -> Path:
    """`testbed.pretrained_tiny` of the mini model for a handful of steps on the CPU, caching under
    `data`; its run folder."""
    return testbed.pretrained_tiny(
        'sync', clips, **{**tiny_kwargs(data, monkeypatch), **kwargs}
    ).parent


def test_pretrained_tiny_same_seed_same_losses(clips, tmp_path, monkeypatch):
    """Everything is seeded from `seed`: two runs of the same arguments log the same losses step for
    step; another seed, other losses."""
    first = tiny_run(clips, tmp_path / 'a', monkeypatch, seed=0)
    again = tiny_run(
        clips, tmp_path / 'b', monkeypatch, seed=0
    )  # another cache folder: trained again, not read back
    other = tiny_run(clips, tmp_path / 'a', monkeypatch, seed=1)
    assert first.name == again.name and first.name != other.name  # the key holds the seed
    assert first != again and (first / 'model.pt').is_file() and (again / 'model.pt').is_file()
    losses = {
        name: step_losses(run)
        for name, run in (('first', first), ('again', again), ('other', other))
    }
    assert list(losses['first'].index) == list(range(1, 7))
    assert losses['first'].tolist() == losses['again'].tolist()  # identical, not close
    assert losses['first'].tolist() != losses['other'].tolist()
    saved = (
        load_checkpoint(first / 'model.pt').state_dict,
        load_checkpoint(again / 'model.pt').state_dict,
    )
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    config = train_config.load_config(first / 'config.json')
    assert (config.max_steps, config.batch_size, config.seed, config.eval_every) == (6, 4, 0, 6)
    # a cached model is returned without training: same path, same file
    stamp = (first / 'model.pt').stat().st_mtime_ns
    assert (
        tiny_run(clips, tmp_path / 'a', monkeypatch, seed=0) == first
        and (first / 'model.pt').stat().st_mtime_ns == stamp
    )


def test_pretrained_tiny_time_guard_stops_and_a_later_call_finishes(clips, tmp_path, monkeypatch):
    """`max_minutes` only guards: past it the run stops with a warning naming the step; the next
    call resumes to the same losses."""
    with pytest.warns(UserWarning, match=r'stopped by max_minutes=1e-09 at step 1 of 6'):
        stopped = testbed.pretrained_tiny(
            'sync', clips, **tiny_kwargs(tmp_path / 'guarded', monkeypatch), max_minutes=1e-9
        )
    assert stopped.name == 'last.pt' and not (stopped.parent / 'model.pt').exists()
    finished = testbed.pretrained_tiny(
        'sync', clips, **tiny_kwargs(tmp_path / 'guarded', monkeypatch)
    )  # the guard is not in the key
    assert finished == stopped.parent / 'model.pt' and finished.is_file()
    reference = tiny_run(clips, tmp_path / 'reference', monkeypatch)
    assert step_losses(finished.parent).tolist() == step_losses(reference).tolist()


def tiny_kwargs(data: Path, monkeypatch) -> dict:
    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(data))
    return dict(
        steps=6,
        batch_size=4,
        evaluations=1,
        progress=False,
        model=mini_model(),
        device='cpu',
        tensorboard=False,
        eval_clips=4,
        log_every=1,
    )


def test_pretrained_tiny_refuses_a_time_budget_and_bad_sizes(clips):
    """The budget is steps and batch size: `minutes=` (the old time budget) and impossible sizes are
    refused before anything runs."""
    with pytest.raises(ValueError, match='steps= and batch_size='):
        testbed.pretrained_tiny('sync', clips, minutes=8)
    with pytest.raises(ValueError, match='evaluations=7 is more than steps=6'):
        testbed.pretrained_tiny('sync', clips, steps=6, evaluations=7)
    with pytest.raises(ValueError, match='batch_size must be a positive int'):
        testbed.pretrained_tiny('sync', clips, batch_size=0)
    with pytest.raises(ValueError, match='sets max_steps itself'):
        testbed.pretrained_tiny('sync', clips, max_steps=5)


def test_stop_after_steps_stops_there_and_a_resume_matches_an_unbroken_run(clips, tmp_path):
    """`stop_after_steps` stops at that step of an unchanged schedule, with a log row and a
    checkpoint; `--resume` finishes with the same losses."""
    full = pretraining.pretrain(mini_config(clips, tmp_path / 'full', max_steps=6, eval_data=''))
    part = pretraining.pretrain(
        mini_config(clips, tmp_path / 'part', max_steps=6, eval_data='', stop_after_steps=4)
    )
    assert (part.steps, part.total_steps, part.completed) == (4, 6, False) and full.completed
    assert list(step_losses(tmp_path / 'part').index) == [1, 2, 3, 4]
    assert load_checkpoint(tmp_path / 'part' / 'last.pt').training_state['step'] == 4
    rest = pretraining.pretrain(
        mini_config(clips, tmp_path / 'part', max_steps=6, eval_data='', resume='last')
    )  # the stop is not part of the run
    assert (
        rest.completed
        and step_losses(tmp_path / 'part').tolist() == step_losses(tmp_path / 'full').tolist()
    )
