"""Shards: written in disjoint parts by the command line, read back as the mp4s read under the released preset, split
over 2 processes x 2 workers into disjoint samples that together cover the epoch."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from cavmae_sync.config import PreprocessConfig
from cavmae_sync.data import load_clip
from cavmae_sync.shards import ShardDataset, list_shards

RELEASED = PreprocessConfig(num_frames=4, image_size=32, window=64, frame_preset='released')


@pytest.fixture(scope='module')
def collection(tmp_path_factory) -> Path:
    "8 testbed clips written as shards by two `cavmae-sync-prepare --shards --part I/2` jobs."
    from cavmae_sync.synthetic import make_synthetic
    root = tmp_path_factory.mktemp('shards')
    make_synthetic(root / 'synthetic', num_train=8, num_test=2, seed=0, image_size=64, duration=6.0, workers=1)
    videos = sorted((root / 'synthetic').rglob('*.mp4'))
    (root / 'videos').mkdir()
    for path in videos: (root / 'videos' / path.name).symlink_to(path)
    for part in ('0/2', '1/2'):
        done = subprocess.run([sys.executable, '-c', 'import sys; from cavmae_sync.data import prepare_cli; sys.exit(prepare_cli(sys.argv[1:]))',
                               str(root / 'videos'), '--shards', str(root / 'out'), '--part', part, '--num-frames', '4',
                               '--image-size', '32', '--shard-gb', '1e-9', '--no-progress'], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return root


def test_parts_are_disjoint_and_cover_the_collection(collection):
    indexes = [json.loads(p.read_text()) for p in sorted((collection / 'out').glob('part*-of-*.json'))]
    clips = [c for index in indexes for shard in index['shards'] for c in shard['clips']]
    assert len(indexes) == 2 and sorted(clips) == sorted(p.stem for p in (collection / 'videos').iterdir())
    assert len(list_shards(collection / 'out')) == len(clips)                 # one clip per shard at this shard size


def test_shards_give_what_load_clip_gives_under_the_released_preset(collection):
    stream = ShardDataset(collection / 'out', 'eval', RELEASED)
    for item in stream:
        direct = load_clip(collection / 'videos' / f"{item['video_id']}.mp4", config=RELEASED)
        assert torch.equal(item['frames'], direct.frames) and (item['audio'] - direct.audio).abs().max() < 1e-6


def test_two_ranks_times_two_workers_read_disjoint_samples_covering_the_epoch(collection, tmp_path):
    "Each of 2 processes (gloo) iterates with 2 DataLoader workers; every clip is read exactly once per epoch."
    script = tmp_path / 'read.py'
    script.write_text(f"""
import json, sys, torch.distributed as dist
from torch.utils.data import DataLoader
from cavmae_sync.config import PreprocessConfig
from cavmae_sync.shards import ShardDataset
dist.init_process_group('gloo')
config = PreprocessConfig(num_frames=4, image_size=32, window=64, frame_preset='released')
data = ShardDataset({str(collection / 'out')!r}, 'train', config, shuffle_buffer=2, seed=5)
epochs = []
for epoch in range(2):
    data.set_epoch(epoch)
    epochs.append([item['video_id'] for item in DataLoader(data, batch_size=None, num_workers=2)])
json.dump(epochs, open(sys.argv[1] + f'.{{dist.get_rank()}}', 'w'))
dist.destroy_process_group()
""")
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517', str(script),
                           str(tmp_path / 'seen')], capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'seen.{r}').read_text()) for r in range(2)]
    everything = sorted(p.stem for p in (collection / 'videos').iterdir())
    for epoch in range(2):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert not set(a) & set(b) and sorted(a + b) == everything
    assert ranks[0][0] != ranks[0][1] or ranks[1][0] != ranks[1][1]           # the order changes between epochs


def test_too_few_shards_for_the_readers_is_an_error(collection):
    data = ShardDataset(list_shards(collection / 'out')[:2], 'eval', RELEASED)
    with pytest.raises(ValueError, match='every reader needs a shard'): list(DataLoader(data, batch_size=None, num_workers=3))


def test_a_truncated_shard_is_named(collection, tmp_path):
    shard = list_shards(collection / 'out')[0]
    broken = tmp_path / 'broken.tar'
    broken.write_bytes(shard.read_bytes()[:2000])
    from cavmae_sync.config import MediaError
    with pytest.raises(MediaError, match='broken.tar') as error: list(ShardDataset([broken], 'eval', RELEASED))
    assert 'truncated' in str(error.value) or 'cut short' in str(error.value)
