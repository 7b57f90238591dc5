"""Shards: written in disjoint parts by the command line, read back as the mp4s read under the released preset, split
over 2 processes x 2 workers into disjoint samples that together cover the epoch; decoded in batches (`batch_decode`) as
the per-sample path decodes them; feeding evaluation (embeddings, pretraining's held-out retrieval) and fine-tuning as
the mp4 datafiles do."""

import json
import os
import subprocess
import sys
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
    make_synthetic(
        root / 'synthetic', num_train=8, num_test=2, seed=0, image_size=64, duration=6.0, workers=1
    )
    videos = sorted((root / 'synthetic').rglob('*.mp4'))
    (root / 'videos').mkdir()
    for path in videos:
        (root / 'videos' / path.name).symlink_to(path)
    for part in ('0/2', '1/2'):
        done = subprocess.run(
            [
                sys.executable,
                '-c',
                'import sys; from cavmae_sync.prepare import prepare_cli; sys.exit(prepare_cli(sys.argv[1:]))',
                str(root / 'videos'),
                '--shards',
                str(root / 'out'),
                '--part',
                part,
                '--num-frames',
                '4',
                '--image-size',
                '32',
                '--shard-gb',
                '1e-9',
                '--no-progress',
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    return root


def test_parts_are_disjoint_and_cover_the_collection(collection):
    indexes = [
        json.loads(p.read_text()) for p in sorted((collection / 'out').glob('part*-of-*.json'))
    ]
    clips = [c for index in indexes for shard in index['shards'] for c in shard['clips']]
    assert len(indexes) == 2 and sorted(clips) == sorted(
        p.stem for p in (collection / 'videos').iterdir()
    )
    assert len(list_shards(collection / 'out')) == len(
        clips
    )  # one clip per shard at this shard size


def test_shards_give_what_load_clip_gives_under_the_released_preset(collection):
    stream = ShardDataset(collection / 'out', 'eval', RELEASED)
    for item in stream:
        direct = load_clip(collection / 'videos' / f"{item['video_id']}.mp4", config=RELEASED)
        assert (
            torch.equal(item['frames'], direct.frames)
            and (item['audio'] - direct.audio).abs().max() < 1e-6
        )


def test_two_ranks_times_two_workers_read_disjoint_samples_covering_the_epoch(collection, tmp_path):
    """Each of 2 processes (gloo) iterates with 2 DataLoader workers; every clip is read exactly
    once per epoch. An evaluation
    set (`training_data.ShardsReadHere`) is read whole by the process that iterates it, each clip
    once over its workers."""
    script = tmp_path / 'read.py'
    script.write_text(f"""
import json, sys, torch.distributed as dist
from torch.utils.data import DataLoader
from cavmae_sync.config import PreprocessConfig
from cavmae_sync.shards import ShardDataset
from cavmae_sync.training_data import ShardsReadHere
dist.init_process_group('gloo')
config = PreprocessConfig(num_frames=4, image_size=32, window=64, frame_preset='released')
data = ShardDataset({str(collection / 'out')!r}, 'train', config, shuffle_buffer=2, seed=5)
epochs = []
for epoch in range(2):
    data.set_epoch(epoch)
    epochs.append([item['video_id'] for item in DataLoader(data, batch_size=None, num_workers=2)])
whole = ShardsReadHere({str(collection / 'out')!r}, 'eval', config)          # evaluation on one rank: all of it
epochs.append([item['video_id'] for item in DataLoader(whole, batch_size=None, num_workers=2)])
json.dump(epochs, open(sys.argv[1] + f'.{{dist.get_rank()}}', 'w'))
dist.destroy_process_group()
""")
    done = subprocess.run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--standalone',
            '--nproc_per_node',
            '2',
            str(script),
            str(tmp_path / 'seen'),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f'seen.{r}').read_text()) for r in range(2)]
    everything = sorted(p.stem for p in (collection / 'videos').iterdir())
    for epoch in range(2):
        a, b = ranks[0][epoch], ranks[1][epoch]
        assert not set(a) & set(b) and sorted(a + b) == everything
    assert (
        ranks[0][0] != ranks[0][1] or ranks[1][0] != ranks[1][1]
    )  # the order changes between epochs
    assert (
        sorted(ranks[0][2]) == sorted(ranks[1][2]) == everything
    )  # `training_data.ShardsReadHere`: each rank reads every clip once


def test_too_few_shards_for_the_readers_is_an_error(collection):
    data = ShardDataset(list_shards(collection / 'out')[:2], 'eval', RELEASED)
    with pytest.raises(ValueError, match='every reader needs a shard'):
        list(DataLoader(data, batch_size=None, num_workers=3))


def test_a_truncated_shard_is_named(collection, tmp_path):
    shard = list_shards(collection / 'out')[0]
    broken = tmp_path / 'broken.tar'
    broken.write_bytes(shard.read_bytes()[:2000])
    from cavmae_sync.config import MediaError

    with pytest.raises(MediaError, match='broken.tar') as error:
        list(ShardDataset([broken], 'eval', RELEASED))
    assert 'truncated' in str(error.value) or 'cut short' in str(error.value)


def test_pretraining_streams_shards_and_resumes_bit_for_bit(clips, tmp_path):
    """Pretraining reads shards with 2 DataLoader workers; killed right after the mid-epoch
    checkpoint at step 5, the resumed
    run re-reads the epoch up to that step and ends with the uninterrupted run's losses and weights, bit for bit. The
    run ends mid-epoch (step 6; the second epoch is steps 5-8), so a resume that re-reads one batch too many trains on
    another batch and fails the comparison, rather than running out of batches."""
    import pandas as pd
    from cavmae_sync.checkpoint import load_checkpoint
    from cavmae_sync.shards import write_shards
    from killed_training import killed_cli
    from training_setup import MINI_MODEL, RUN_FLAGS, cli

    (tmp_path / 'train').mkdir()
    for video in sorted((clips / 'videos').glob('train_*.mp4')):
        (tmp_path / 'train' / video.name).symlink_to(video)
    index = write_shards(
        tmp_path / 'train',
        tmp_path / 'shards',
        config=PreprocessConfig(num_frames=4, image_size=32),
        shard_bytes=1,
        progress=False,
    )
    assert len(index.shards) == 16

    def run(out, program=cli('cavmae-sync-pretrain')):
        args = [
            *MINI_MODEL,
            '--model.frame_preset',
            'released',
            '--train_data',
            str(tmp_path / 'shards'),
            '--output_dir',
            str(out),
            *RUN_FLAGS,
            '--num_workers',
            '2',
            '--max_steps',
            '6',
            '--checkpoint_every',
            '5',
        ]
        return subprocess.run(
            program + args,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, 'OMP_NUM_THREADS': '1'},
        )

    whole = run(tmp_path / 'whole')
    assert whole.returncode == 0, whole.stderr[-3000:]
    config = json.loads((tmp_path / 'whole' / 'config.json').read_text())
    assert config['derived']['steps_per_epoch'] == 4  # 16 clips, 2 readers x 8, micro-batches of 4
    killed = run(tmp_path / 'killed', killed_cli(5))  # dies right after step 5's checkpoint
    assert killed.returncode == 137 and not (tmp_path / 'killed' / 'model.pt').exists()
    resumed = subprocess.run(
        cli('cavmae-sync-pretrain')
        + ['--config', str(tmp_path / 'killed' / 'config.json'), '--resume', 'last'],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    losses = [
        pd.read_csv(tmp_path / name / 'train_log.csv').set_index('step')['loss']
        for name in ('whole', 'killed')
    ]
    assert list(losses[0].index) == list(range(1, 7)) and losses[0].equals(losses[1])
    a, b = (
        load_checkpoint(tmp_path / name / 'model.pt').state_dict for name in ('whole', 'killed')
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


# batched vs per-clip fbank: float32 rounding of a batched FFT and matrix product; frames are equal
AUDIO_TOLERANCE = 1e-4


def test_batch_decoding_gives_the_per_sample_items_and_load_clip(collection):
    """Evaluation batches: the batch decoder's frames equal `load_clip`'s on the mp4s (released
    preset), its windows agree within 1e-4."""
    decoded = BatchDecoder(RELEASED)(
        collate_raw(list(ShardDataset(collection / 'out', 'eval', RELEASED, raw=True)))
    )
    clips = len(list((collection / 'videos').iterdir()))
    assert decoded['frames'].shape == (clips, 4, 3, 32, 32) and decoded['audio'].shape == (
        clips,
        4,
        64,
        128,
    )
    for b, video_id in enumerate(decoded['video_id']):
        direct = load_clip(collection / 'videos' / f'{video_id}.mp4', config=RELEASED)
        assert torch.equal(decoded['frames'][b], direct.frames)
        assert (decoded['audio'][b] - direct.audio).abs().max() < AUDIO_TOLERANCE


@pytest.mark.parametrize('augment', [False, True])
def test_raw_loader_workers_and_batch_decoder_give_the_per_sample_batches(collection, augment):
    """Training, 2 DataLoader workers, batches of 3: raw samples + `BatchDecoder` give the
    per-sample path's batches, crops included."""

    def batches(raw):
        data = ShardDataset(
            collection / 'out',
            'train',
            RELEASED,
            shuffle_buffer=3,
            seed=4,
            augment=augment,
            raw=raw,
        )
        return list(DataLoader(data, batch_size=3, num_workers=2, collate_fn=data.collate_fn))

    decoder = BatchDecoder(RELEASED, 'cpu')
    expected, got = batches(False), [decoder(batch) for batch in batches(True)]
    assert len(got) == len(expected) == 4  # 2 workers x (3 + 2) clips of their 5 shards each
    for a, b in zip(got, expected):
        assert a['video_id'] == b['video_id'] and torch.equal(a['frame_index'], b['frame_index'])
        assert (
            torch.equal(a['frames'], b['frames'])
            and (a['audio'] - b['audio']).abs().max() < AUDIO_TOLERANCE
        )
    if augment:  # crops: not the centre crop of the same frame
        centre = [
            decoder(batch)
            for batch in DataLoader(
                ShardDataset(
                    collection / 'out', 'train', RELEASED, shuffle_buffer=3, seed=4, raw=True
                ),
                batch_size=3,
                num_workers=2,
                collate_fn=collate_raw,
            )
        ]
        assert not all(torch.equal(a['frames'], c['frames']) for a, c in zip(got, centre))


def test_batch_decoding_of_real_clips_at_the_released_size(media_dir, tmp_path):
    """Two real 10-s clips at the released model's sizes (T=16, 224 px, L=416; 998 fbank frames
    padded to 1,024): as the per-sample path."""
    from cavmae_sync.shards import write_shards

    released = PreprocessConfig(frame_preset='released')
    write_shards(media_dir, tmp_path / 'shards', config=released, shard_bytes=1, progress=False)
    decoder = BatchDecoder(released)
    for mode in ('train', 'eval'):
        expected = [item for item in ShardDataset(tmp_path / 'shards', mode, released, seed=1)]
        got = decoder(
            collate_raw(list(ShardDataset(tmp_path / 'shards', mode, released, seed=1, raw=True)))
        )
        assert got['video_id'] == [item['video_id'] for item in expected]
        assert torch.equal(got['frames'], torch.stack([item['frames'] for item in expected]))
        assert (
            got['audio'] - torch.stack([item['audio'] for item in expected])
        ).abs().max() < AUDIO_TOLERANCE


# frames from shards equal the mp4's, windows agree within 1e-6 (test above); measured: equal, bit
# for bit
EMBEDDING_TOLERANCE = 1e-5


def test_embeddings_from_shards_equal_those_from_the_mp4s(collection, tmp_path):
    """`embed_dataset` reads shards as a stream (2 DataLoader workers): the same clips, sorted by
    id, as the mp4s under the
    released preset; the cache is reused, keyed by the shards' identities; a stream is read from its start only."""
    from cavmae_sync.data import ClipDataset, ClipSource
    from cavmae_sync.embeddings import embed_dataset, iterate_encoded
    from cavmae_sync.model import CAVMAESync, tiny

    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=4, image_size=32, audio_length=64, frame_preset='released'))
    videos = sorted((collection / 'videos').iterdir())
    direct = embed_dataset(
        model,
        ClipDataset([ClipSource(p.stem, p) for p in videos], 'eval', RELEASED),
        batch_size=4,
        progress=False,
    )
    cache = tmp_path / 'shards.pt'
    streamed = embed_dataset(
        model,
        ShardDataset(collection / 'out', 'eval', RELEASED),
        batch_size=3,
        num_workers=2,
        cache_path=cache,
        progress=False,
    )
    assert (
        streamed.video_ids == direct.video_ids == [p.stem for p in videos]
    )  # sorted by id, whatever the arrival order
    for name in ('audio', 'video'):
        gap = (getattr(streamed, name) - getattr(direct, name)).abs().max().item()
        assert gap < EMBEDDING_TOLERANCE, f'{name}: {gap}'
    one_reader = embed_dataset(
        model, ShardDataset(collection / 'out', 'eval', RELEASED), batch_size=5, progress=False
    )
    assert one_reader.video_ids == streamed.video_ids and torch.equal(
        one_reader.audio, streamed.audio
    )
    assert one_reader.fingerprint == streamed.fingerprint  # the workers are not part of the data
    again = embed_dataset(
        model, ShardDataset(collection / 'out', 'eval', RELEASED), cache_path=cache, progress=False
    )
    assert torch.equal(again.video, streamed.video) and sorted(
        p.name for p in tmp_path.iterdir()
    ) == ['shards.pt']  # no partial file
    shard = list_shards(collection / 'out')[0]
    stat = shard.stat()
    try:
        os.utime(
            shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9)
        )  # a shard rewritten since: another data set
        with pytest.raises(ValueError, match='another model or data set'):
            embed_dataset(
                model,
                ShardDataset(collection / 'out', 'eval', RELEASED),
                cache_path=cache,
                progress=False,
            )
    finally:
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match='from its start'):
        next(iterate_encoded(model, ShardDataset(collection / 'out', 'eval', RELEASED), start=2))
    with pytest.raises(ValueError, match="mode='eval'"):
        embed_dataset(model, ShardDataset(collection / 'out', 'train', RELEASED), progress=False)
    with pytest.raises(ValueError, match='more than once'):
        embed_dataset(
            model,
            ShardDataset([shard, shard, *list_shards(collection / 'out')[1:4]], 'eval', RELEASED),
            progress=False,
        )


def split_folder(clips: Path, split: str, out: Path) -> Path:
    "The mp4s of one split of the synthetic set, as a folder of links (what `write_shards` reads)."
    out.mkdir()
    for row in json.loads((clips / f'{split}.json').read_text())['data']:
        source = (clips / row['video_path']).resolve()
        (out / source.name).symlink_to(source)
    return out


def write_labelled_shards(clips: Path, tmp_path: Path, config: PreprocessConfig) -> dict:
    """Shards of the train and test splits (one clip per shard) with the datafiles' labels, written
    through a video_id,labels CSV."""
    import csv
    from cavmae_sync.shards import write_shards

    rows = [
        row
        for split in ('train', 'test')
        for row in json.loads((clips / f'{split}.json').read_text())['data']
    ]
    with open(tmp_path / 'video_labels.csv', 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['video_id', 'labels'])
        writer.writerows([row['video_id'], row['labels']] for row in rows)
    out = {}
    for split in ('train', 'test'):
        write_shards(
            split_folder(clips, split, tmp_path / f'{split}_videos'),
            tmp_path / f'{split}_shards',
            labels=tmp_path / 'video_labels.csv',
            config=config,
            shard_bytes=1,
            progress=False,
        )
        out[split] = tmp_path / f'{split}_shards'
    return out


def test_pretraining_evaluates_on_shards(clips, tmp_path):
    """`--eval_data SHARDS_DIR`: the held-out retrieval evaluation of pretraining reads shards, and
    logs what the same model
    scores on the test clips' mp4s (released preset)."""
    import pandas as pd
    from cavmae_sync import train_config
    from cavmae_sync.checkpoint import load_checkpoint
    from cavmae_sync.pretraining import retrieval_evaluation
    from cavmae_sync import training_data
    from training_setup import MINI_MODEL, cli

    shards = write_labelled_shards(clips, tmp_path, PreprocessConfig(num_frames=4, image_size=32))
    args = [
        *MINI_MODEL,
        '--model.frame_preset',
        'released',
        '--train_data',
        str(clips / 'train.json'),
        '--eval_data',
        str(shards['test']),
        '--output_dir',
        str(tmp_path / 'run'),
        '--batch_size',
        '4',
        '--lr',
        '1e-3',
        '--lr_reference_batch',
        '4',
        '--max_steps',
        '2',
        '--progress',
        'false',
        '--tensorboard',
        'false',
        '--seed',
        '3',
        '--num_workers',
        '0',
    ]
    done = subprocess.run(
        cli('cavmae-sync-pretrain') + args,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    logged = pd.read_csv(tmp_path / 'run' / 'eval_log.csv').iloc[-1]
    assert logged['step'] == 2 and logged['chance_R@1'] == 100 / 8  # all 8 test clips
    config = train_config.config_from_args(train_config.PretrainConfig, args)
    model = load_checkpoint(tmp_path / 'run' / 'model.pt').build_model().eval()
    expected = retrieval_evaluation(
        model, training_data.clip_dataset(config, clips / 'test.json', 'eval')
    )
    for name, value in expected.items():
        assert abs(logged[name] - value) < 1e-9, (name, logged[name], value)


def test_finetuning_from_shards_gives_the_datafile_losses(clips, tmp_path):
    """`finetune` on shards with labels (train and evaluation) gives the losses and mAP of the same
    clips read from the mp4
    datafiles. Exact comparison needs the same samples in each step: a stream and the datafile's
    sampler visit clips in other
    orders and draw other random frames, so the run takes one frame per clip (T=1: frame 0 and its
    window in both) and the
    whole set as its batch (one step per epoch: the loss is a mean, whatever the order); no mixup, SpecAugment or crops.
    The two agree within float rounding (the batch's order changes summation order). The classifier's initial weights do
    not depend on the datafile's clips being decoded into memory first (which draws from the global RNG)."""
    import pandas as pd
    from cavmae_sync import finetuning, train_config
    from training_setup import MINI_MODEL

    shards = write_labelled_shards(clips, tmp_path, PreprocessConfig(num_frames=1, image_size=32))

    def run(name, train_data, eval_data, *extra):
        args = [
            *MINI_MODEL,
            '--model.num_frames',
            '1',
            '--model.frame_preset',
            'released',
            '--train_data',
            str(train_data),
            '--eval_data',
            str(eval_data),
            '--label_csv',
            str(clips / 'labels.csv'),
            '--loss',
            'bce',
            '--augment_frames',
            'false',
            '--output_dir',
            str(tmp_path / name),
            '--batch_size',
            '16',
            '--epochs',
            '3',
            '--lr',
            '1e-3',
            '--lr_reference_batch',
            '16',
            '--log_every',
            '1',
            '--progress',
            'false',
            '--tensorboard',
            'false',
            '--seed',
            '3',
            '--num_workers',
            '0',
            *extra,
        ]
        return finetuning.finetune(
            train_config.config_from_args(train_config.FinetuneConfig, args)
        ), args

    from_mp4, _ = run(
        'mp4', clips / 'train.json', clips / 'test.json'
    )  # decoded into memory (cache 'auto')
    from_shards, args = run('shards', shards['train'], shards['test'])
    losses = [
        pd.read_csv(result.output_dir / 'train_log.csv').set_index('step')['loss']
        for result in (from_mp4, from_shards)
    ]
    assert list(losses[0].index) == list(losses[1].index) == [1, 2, 3]
    assert (losses[0] - losses[1]).abs().max() < 1e-6, (
        losses[0].tolist(),
        losses[1].tolist(),
    )  # measured: bit-identical here
    assert losses[0].iloc[0] != losses[0].iloc[-1]  # the model learned something: the steps differ
    assert (
        from_shards.metric_name == from_mp4.metric_name == 'mAP'
        and abs(from_shards.metric - from_mp4.metric) < 1e-6
    )
    for extra, reason in (
        (['--loss', 'auto'], "pass --loss bce"),
        (['--balanced_sampling'], 'balanced_sampling'),
        (['--method', 'linear_probe'], 'linear_probe'),
        (['--label_csv', ''], 'no label_csv'),
    ):
        with pytest.raises(ValueError, match=reason):
            finetuning.finetune(
                train_config.config_from_args(train_config.FinetuneConfig, [*args, *extra])
            )


def test_an_epoch_of_shards_split_unevenly_over_workers_on_a_cpu(clips, tmp_path):
    """16 one-clip shards read by 3 DataLoader workers hold 6, 5 and 5 clips: 3 full batches of 4
    per epoch, not 16 // 4 = 4.
    On a CPU the epoch's length comes from `ShardDataset.batches_per_epoch` too (a map-style
    sampler's count ran the loader dry)."""
    from cavmae_sync import pretraining, train_config
    from cavmae_sync.shards import write_shards
    from training_setup import MINI_MODEL

    (tmp_path / 'train').mkdir()
    for video in sorted((clips / 'videos').glob('train_*.mp4')):
        (tmp_path / 'train' / video.name).symlink_to(video)
    write_shards(
        tmp_path / 'train',
        tmp_path / 'shards',
        config=PreprocessConfig(num_frames=4, image_size=32),
        shard_bytes=1,
        progress=False,
    )
    args = [
        *MINI_MODEL,
        '--model.frame_preset',
        'released',
        '--train_data',
        str(tmp_path / 'shards'),
        '--output_dir',
        str(tmp_path / 'run'),
        '--batch_size',
        '4',
        '--lr',
        '1e-3',
        '--lr_reference_batch',
        '4',
        '--epochs',
        '2',
        '--progress',
        'false',
        '--tensorboard',
        'false',
        '--num_workers',
        '3',
        '--device',
        'cpu',
    ]
    result = pretraining.pretrain(train_config.config_from_args(train_config.PretrainConfig, args))
    assert result.completed and result.steps == result.total_steps == 6
    assert (
        json.loads((tmp_path / 'run' / 'config.json').read_text())['derived']['steps_per_epoch']
        == 3
    )
