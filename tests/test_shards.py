"""Shards: written in disjoint parts by the command line, read back as the mp4s read under the released preset, split
over 2 processes x 2 workers into disjoint samples that together cover the epoch; decoded in batches (`batch_decode`) as
the per-sample path decodes them."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from cavmae_sync.config import PreprocessConfig
from cavmae_sync.data import load_clip
from cavmae_sync.shards import ShardDataset, list_shards
from cavmae_sync.batch_decode import BatchDecoder, collate_raw

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
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
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


def test_pretraining_streams_shards_and_resumes_bit_for_bit(clips, tmp_path):
    """Pretraining reads shards with 2 DataLoader workers; killed right after the mid-epoch checkpoint at step 3, the resumed
    run re-reads the epoch up to that step and ends with the uninterrupted run's losses and weights, bit for bit."""
    import pandas as pd
    from cavmae_sync.checkpoint import load_checkpoint
    from cavmae_sync.shards import write_shards
    from training_setup import MINI_MODEL, cli
    (tmp_path / 'train').mkdir()
    for video in sorted((clips / 'videos').glob('train_*.mp4')): (tmp_path / 'train' / video.name).symlink_to(video)
    index = write_shards(tmp_path / 'train', tmp_path / 'shards', config=PreprocessConfig(num_frames=4, image_size=32), shard_bytes=1, progress=False)
    assert len(index.shards) == 16
    def run(out, **env):
        args = [*MINI_MODEL, '--model.frame_preset', 'released', '--train_data', str(tmp_path / 'shards'), '--output_dir', str(out),
                '--batch_size', '4', '--lr', '1e-3', '--lr_reference_batch', '4', '--log_every', '1', '--progress', 'false',
                '--tensorboard', 'false', '--seed', '3', '--num_workers', '2', '--max_steps', '6', '--checkpoint_every', '3']
        return subprocess.run(cli('cavmae-sync-pretrain') + args, capture_output=True, text=True, timeout=300,
                              env={**os.environ, 'OMP_NUM_THREADS': '1', **env})
    whole = run(tmp_path / 'whole')
    assert whole.returncode == 0, whole.stderr[-3000:]
    config = json.loads((tmp_path / 'whole' / 'config.json').read_text())
    assert config['derived']['steps_per_epoch'] == 4                      # 16 clips, 2 readers x 8, micro-batches of 4
    killed = run(tmp_path / 'killed', CAVMAE_SYNC_TEST_KILL_AFTER_CHECKPOINT='3')
    assert killed.returncode == 137 and not (tmp_path / 'killed' / 'model.pt').exists()
    resumed = subprocess.run(cli('cavmae-sync-pretrain') + ['--config', str(tmp_path / 'killed' / 'config.json'), '--resume', 'last'],
                             capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = [pd.read_csv(tmp_path / name / 'train_log.csv').set_index('step')['loss'] for name in ('whole', 'killed')]
    assert list(losses[0].index) == list(range(1, 7)) and losses[0].equals(losses[1])
    a, b = (load_checkpoint(tmp_path / name / 'model.pt').state_dict for name in ('whole', 'killed'))
    assert all(torch.equal(a[k], b[k]) for k in a)


AUDIO_TOLERANCE = 1e-4     # batched vs per-clip fbank: float32 rounding of a batched FFT and matrix product; frames are equal


def test_batch_decoding_gives_the_per_sample_items_and_load_clip(collection):
    "Evaluation batches: the batch decoder's frames equal `load_clip`'s on the mp4s (released preset), its windows agree within 1e-4."
    decoded = BatchDecoder(RELEASED)(collate_raw(list(ShardDataset(collection / 'out', 'eval', RELEASED, raw=True))))
    clips = len(list((collection / 'videos').iterdir()))
    assert decoded['frames'].shape == (clips, 4, 3, 32, 32) and decoded['audio'].shape == (clips, 4, 64, 128)
    for b, video_id in enumerate(decoded['video_id']):
        direct = load_clip(collection / 'videos' / f'{video_id}.mp4', config=RELEASED)
        assert torch.equal(decoded['frames'][b], direct.frames)
        assert (decoded['audio'][b] - direct.audio).abs().max() < AUDIO_TOLERANCE


@pytest.mark.parametrize('augment', [False, True])
def test_raw_loader_workers_and_batch_decoder_give_the_per_sample_batches(collection, augment):
    "Training, 2 DataLoader workers, batches of 3: raw samples + `BatchDecoder` give the per-sample path's batches, crops included."
    def batches(raw):
        data = ShardDataset(collection / 'out', 'train', RELEASED, shuffle_buffer=3, seed=4, augment=augment, raw=raw)
        return list(DataLoader(data, batch_size=3, num_workers=2, collate_fn=data.collate_fn))
    decoder = BatchDecoder(RELEASED, 'cpu')
    expected, got = batches(False), [decoder(batch) for batch in batches(True)]
    assert len(got) == len(expected) == 4                      # 2 workers x (3 + 2) clips of their 5 shards each
    for a, b in zip(got, expected):
        assert a['video_id'] == b['video_id'] and torch.equal(a['frame_index'], b['frame_index'])
        assert torch.equal(a['frames'], b['frames']) and (a['audio'] - b['audio']).abs().max() < AUDIO_TOLERANCE
    if augment:                                                # crops: not the centre crop of the same frame
        centre = [decoder(batch) for batch in
                  DataLoader(ShardDataset(collection / 'out', 'train', RELEASED, shuffle_buffer=3, seed=4, raw=True),
                             batch_size=3, num_workers=2, collate_fn=collate_raw)]
        assert not all(torch.equal(a['frames'], c['frames']) for a, c in zip(got, centre))


def test_batch_decoding_of_real_clips_at_the_released_size(media_dir, tmp_path):
    "Two real 10-s clips at the released model's sizes (T=16, 224 px, L=416; 998 fbank frames padded to 1,024): as the per-sample path."
    from cavmae_sync.shards import write_shards
    released = PreprocessConfig(frame_preset='released')
    write_shards(media_dir, tmp_path / 'shards', config=released, shard_bytes=1, progress=False)
    decoder = BatchDecoder(released)
    for mode in ('train', 'eval'):
        expected = [item for item in ShardDataset(tmp_path / 'shards', mode, released, seed=1)]
        got = decoder(collate_raw(list(ShardDataset(tmp_path / 'shards', mode, released, seed=1, raw=True))))
        assert got['video_id'] == [item['video_id'] for item in expected]
        assert torch.equal(got['frames'], torch.stack([item['frames'] for item in expected]))
        assert (got['audio'] - torch.stack([item['audio'] for item in expected])).abs().max() < AUDIO_TOLERANCE
