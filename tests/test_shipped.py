"""The testbed models shipped in checkpoints/testbed: how `pretrained_tiny` finds them, that each is
complete and is what the
notebooks ask for by default, and (slow) that retraining one reproduces its logged loss curve."""

import json
import hashlib
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from cavmae_sync import testbed
from cavmae_sync.checkpoint import load_checkpoint
from cavmae_sync.train_config import load_config, PretrainConfig, RUN_ONLY_SETTINGS
from test_train import tiny_kwargs, step_losses

NOTEBOOK_DEFAULTS = dict(
    steps=1500, batch_size=32, seed=0, evaluations=5
)  # the reproduction notebooks' train_steps, train_batch_size, seed
SHIPPED_MODELS = {
    'sync': {},
    'cavmae': {},
    'sync no registers': {'num_registers': 0},
}  # what retrieval / localization / classification use
MAX_SHIPPED_BYTES = 30_000_000


def shipped_runs() -> list[Path]:
    return (
        sorted(
            p for p in testbed.SHIPPED_DIR.iterdir() if p.is_dir() and not p.name.startswith('.')
        )
        if testbed.SHIPPED_DIR.is_dir()
        else []
    )


def recorded_paths(settings: dict) -> list[str]:
    "Every path setting recorded at any depth of a run's settings."
    found = []
    for key, value in settings.items():
        if isinstance(value, dict):
            found += recorded_paths(value)
        elif key in testbed.PATH_SETTINGS and value:
            found.append(value)
    return found


@pytest.mark.parametrize('run', shipped_runs(), ids=lambda p: p.name)
def test_shipped_models_record_no_machine_s_folders(run):
    "config.json and the config inside model.pt name their data relative to the data root, never a machine's folders."
    in_file = recorded_paths(json.loads((run / 'config.json').read_text()))
    in_model = recorded_paths(load_checkpoint(run / 'model.pt').training_state['train_config'])
    assert in_file and in_model
    assert not [p for p in in_file + in_model if Path(p).is_absolute()], (in_file, in_model)
    assert load_config(run / 'config.json', PretrainConfig).train_data == 'synthetic_v2/train.json'


def test_a_shipped_run_is_returned_and_retrain_trains_here(clips, tmp_path, monkeypatch):
    """A shipped run with the asked identity is returned without training; `retrain=True` trains
    here and logs the same losses; other settings miss it."""
    monkeypatch.setattr(testbed, 'SHIPPED_DIR', tmp_path / 'shipped')
    trained = testbed.pretrained_tiny('sync', clips, **tiny_kwargs(tmp_path / 'made', monkeypatch))
    shipped = testbed.ship_checkpoint(
        trained, 'sync', data_root=os.path.commonpath([clips, trained])
    )
    assert shipped.parent.name == trained.parent.name and sorted(
        p.name for p in shipped.parent.iterdir()
    ) == sorted(testbed.SHIPPED_FILES)
    assert all(
        v.dtype == torch.float16
        for v in load_checkpoint(shipped).state_dict.values()
        if v.is_floating_point()
    )
    identity = json.loads((shipped.parent / 'identity.json').read_text())
    assert (
        'tiny_sync_'
        + hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[
            :12
        ]
        == shipped.parent.name
    )
    # a fresh machine: no local models; the shipped one comes back, nothing trains
    found = testbed.pretrained_tiny('sync', clips, **tiny_kwargs(tmp_path / 'fresh', monkeypatch))
    assert found == shipped and not (tmp_path / 'fresh' / 'models').exists()
    rebuilt = testbed.pretrained_tiny(
        'sync', clips, retrain=True, **tiny_kwargs(tmp_path / 'fresh', monkeypatch)
    )
    assert rebuilt == tmp_path / 'fresh' / 'models' / shipped.parent.name / 'model.pt'
    assert (
        step_losses(rebuilt.parent).tolist() == step_losses(shipped.parent).tolist()
    )  # the shipped log is the run's own
    for key, weight in load_checkpoint(rebuilt).state_dict.items():  # and its weights, rounded once
        torch.testing.assert_close(
            load_checkpoint(shipped).state_dict[key].to(weight.dtype),
            weight.half().to(weight.dtype),
            rtol=0,
            atol=0,
        )
    other = testbed.pretrained_tiny(
        'sync',
        clips,
        seed=1,
        **{k: v for k, v in tiny_kwargs(tmp_path / 'fresh', monkeypatch).items()},
    )
    assert (
        other.parent.parent == tmp_path / 'fresh' / 'models'
        and other.parent.name != shipped.parent.name
    )


def test_the_run_name_does_not_depend_on_where_the_data_set_lies(clips, tmp_path):
    """The identity holds the datafile's clips relative to its folder: a copy of the data set
    elsewhere gives the same name; other clips another."""
    moved = tmp_path / 'elsewhere' / 'synthetic'
    shutil.copytree(clips, moved)
    for split in ('train.json', 'test.json'):
        datafile = json.loads((moved / split).read_text())
        for entry in datafile['data']:
            for key in ('wav', 'video_path'):
                entry[key] = str(moved / Path(entry[key]).relative_to(clips))
        (moved / split).write_text(json.dumps(datafile))
    names = [
        testbed.run_name('sync', testbed.tiny_pretrain_config('sync', root, max_steps=6))
        for root in (clips, moved)
    ]
    assert names[0] == names[1]
    datafile = json.loads((moved / 'train.json').read_text())
    datafile['data'] = datafile['data'][:-1]
    (moved / 'train.json').write_text(json.dumps(datafile))
    assert (
        testbed.run_name('sync', testbed.tiny_pretrain_config('sync', moved, max_steps=6))
        != names[0]
    )


def test_the_shipped_models_are_complete_and_are_the_notebooks_defaults(tmp_path):
    """Every shipped run: all files, compact weights that build, a finished schedule, a name that
    hashes its identity; 30 MB in all; the notebooks' defaults."""
    runs = shipped_runs()
    assert sum(f.stat().st_size for run in runs for f in run.iterdir()) <= MAX_SHIPPED_BYTES
    recipes = {}
    for run in runs:
        assert sorted(p.name for p in run.iterdir()) == sorted(testbed.SHIPPED_FILES), run
        identity = json.loads((run / 'identity.json').read_text())
        kind = run.name.split('_')[1]
        assert (
            f'tiny_{kind}_'
            + hashlib.sha256(
                json.dumps(identity, sort_keys=True, default=str).encode()
            ).hexdigest()[:12]
            == run.name
        )
        config = load_config(run / 'config.json', PretrainConfig)
        assert {
            k: v for k, v in json.loads(json.dumps(config.to_dict())).items() if k in identity
        } == {k: v for k, v in identity.items() if k in config.to_dict()}
        checkpoint = load_checkpoint(run / 'model.pt')
        assert (
            checkpoint.training_state['step'] == config.max_steps
            and checkpoint.config == config.model
        )
        assert checkpoint.training_state['stored_precision'] == 'float16'
        checkpoint.build_model()
        log, evaluations = pd.read_csv(run / 'train_log.csv'), pd.read_csv(run / 'eval_log.csv')
        assert (
            log['step'].is_unique
            and log['step'].iloc[-1] == config.max_steps
            and evaluations['step'].iloc[-1] == config.max_steps
        )
        recipes[run.name] = (kind, identity)
    # what the notebooks ask for by default, without its data digests (those need the generated
    # testbed: see the slow test)
    for label, fields in SHIPPED_MODELS.items():
        kind = label.split()[0]
        asked = testbed.tiny_pretrain_config(
            kind,
            tmp_path,
            max_steps=NOTEBOOK_DEFAULTS['steps'],
            batch_size=NOTEBOOK_DEFAULTS['batch_size'],
            seed=NOTEBOOK_DEFAULTS['seed'],
            eval_every=NOTEBOOK_DEFAULTS['steps'] // NOTEBOOK_DEFAULTS['evaluations'],
        )
        asked = asked.to_dict() | {'model': {**asked.model.to_dict(), **fields}}
        settings = json.loads(
            json.dumps(
                {
                    k: v
                    for k, v in asked.items()
                    if k
                    not in RUN_ONLY_SETTINGS + ('train_data', 'eval_data', 'label_csv', 'progress')
                }
            )
        )
        matches = [
            name
            for name, (k, identity) in recipes.items()
            if k == kind
            and all(identity.get(s) == v for s, v in settings.items() if s != 'progress')
        ]
        assert len(matches) == 1, (
            f'{label}: {len(matches)} shipped runs with the notebooks\' default settings'
        )


@pytest.mark.slow
def test_retraining_the_shipped_sync_model_reproduces_its_loss_curve(tmp_path):
    """Retrain the shipped CAV-MAE Sync model on the default testbed for 200 steps of its schedule:
    the same data identity, the logged losses to 1e-3."""
    from cavmae_sync.synthetic import default_synthetic
    from cavmae_sync.pretraining import pretrain

    root = default_synthetic()
    shipped = testbed.pretrained_tiny('sync', root, **NOTEBOOK_DEFAULTS, progress=False)
    assert shipped.is_relative_to(testbed.SHIPPED_DIR), (
        f'{shipped}: the default testbed does not match the shipped identity'
    )
    config = testbed.tiny_pretrain_config(
        'sync',
        root,
        max_steps=NOTEBOOK_DEFAULTS['steps'],
        eval_every=300,
        progress=False,
        output_dir=str(tmp_path / 'run'),
        stop_after_steps=200,
    )
    assert testbed.run_name('sync', config) == shipped.parent.name
    pretrain(config)
    again, logged = (
        pd.read_csv(tmp_path / 'run' / 'train_log.csv').set_index('step'),
        pd.read_csv(shipped.parent / 'train_log.csv').set_index('step'),
    )
    assert list(again.index) == list(range(10, 201, 10))
    for column in ('loss', 'contrastive_loss', 'mae_loss_audio', 'mae_loss_video'):
        gap = (again[column] - logged.loc[again.index, column]).abs()
        print(f'{column}: largest gap over 200 steps {gap.max():.2e}')
        assert gap.max() < 1e-3, (column, gap.idxmax(), gap.max())
