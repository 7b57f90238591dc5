"""Opening a file never runs code from it: a hostile pickle fed to every loading entry point is refused, and the
file it would create is never created."""

import io
import os
import subprocess
from pathlib import Path

import pytest
import torch

from cavmae_sync import checkpoint
from cavmae_sync.checkpoint import CHECKPOINT_FORMAT, CheckpointError, save_checkpoint
from cavmae_sync.model import CAVMAESync, tiny
from training_setup import MINI_MODEL, cli


class CreatesFile:
    "Unpickling this calls `io.open(marker, 'w')`: code run from the file, visible as the marker file appearing."

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (io.open, (self.marker, 'w'))


@pytest.fixture
def hostile(tmp_path) -> tuple[Path, Path]:
    "A checkpoint-looking file (our format key, a state dict) whose pickle would create `marker`."
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'downloaded.pth'
    torch.save(
        {
            'format': CHECKPOINT_FORMAT,
            'state_dict': {'w': torch.zeros(2)},
            'model': {'w': torch.zeros(2)},
            'config': {},
            'training_state': {'step': 1, 'hook': CreatesFile(marker)},
        },
        path,
    )
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize(
    'entry_point',
    [
        checkpoint.load_checkpoint,
        checkpoint.load_official,
        checkpoint.load_model_file,
        checkpoint.holds_classifier,
        lambda path: checkpoint.init_from_imagenet_mae(
            CAVMAESync(tiny(modality_depth=1, decoder_depth=1)), path
        ),
    ],
    ids=[
        'load_checkpoint',
        'load_official',
        'load_model_file',
        'holds_classifier',
        'init_from_imagenet_mae',
    ],
)
def test_library_entry_points_refuse_a_hostile_pickle(hostile, entry_point):
    path, marker = hostile
    with pytest.raises(CheckpointError, match='refused') as error:
        entry_point(path)
    assert str(path) in str(error.value) and 'run code' in str(error.value)
    assert not marker.exists()


def test_caches_refuse_a_hostile_pickle(hostile):
    from cavmae_sync.embeddings import ClipEmbeddings

    path, marker = hostile
    with pytest.raises(Exception) as error:
        ClipEmbeddings.load(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    'command, flag',
    [
        ('cavmae-sync-pretrain', '--resume'),
        ('cavmae-sync-pretrain', '--init'),
        ('cavmae-sync-finetune', '--pretrained'),
    ],
)
def test_command_line_entry_points_refuse_a_hostile_pickle(clips, hostile, tmp_path, command, flag):
    path, marker = hostile
    args = [
        *MINI_MODEL,
        '--train_data',
        str(clips / 'train.json'),
        '--eval_data',
        str(clips / 'test.json'),
        '--output_dir',
        str(tmp_path / 'run'),
        '--batch_size',
        '4',
        '--epochs',
        '1',
        '--progress',
        'false',
        '--tensorboard',
        'false',
        flag,
        str(path),
    ]
    done = subprocess.run(
        cli(command) + args,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert done.returncode != 0
    assert 'refused' in done.stderr and str(path) in done.stderr, done.stderr[-2000:]
    assert not marker.exists()


def test_our_checkpoint_of_another_version_is_not_read_as_released_weights(tmp_path):
    "A file that says it is ours but that this version cannot read is an error, never a 12-head guess."
    model = CAVMAESync(tiny(modality_depth=1, decoder_depth=1, num_heads=3))
    payload = torch.load(save_checkpoint(tmp_path / 'ok.pt', model), weights_only=True)
    torch.save(
        {**payload, 'config': {**payload['config'], 'field_from_the_future': True}},
        tmp_path / 'field.pt',
    )
    torch.save({**payload, 'format': 'cavmae_sync.checkpoint/9'}, tmp_path / 'newer.pt')
    for name, reason in (
        ('field.pt', 'field_from_the_future'),
        ('newer.pt', 'cavmae_sync.checkpoint/9'),
    ):
        with pytest.raises(CheckpointError, match=reason) as error:
            checkpoint.load_model_file(tmp_path / name, verbose=True)
        assert name in str(error.value) and 'official' not in str(error.value)
    assert checkpoint.load_model_file(tmp_path / 'ok.pt', verbose=True).config.num_heads == 3
