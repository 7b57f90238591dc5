"""Tests that turn red on plausible bugs the rest of the suite let through (issue 27): gradient accumulation, resuming
a stream, fine-tuning's label smoothing and balanced sampling, the decoded-clip cache, the claims' intervals, the logged
losses under DDP, the linear probe's statistics, the embedding resume, the warm-up and the pointing hits.
Each test's docstring names the bug it guards against; every input is small and made by hand."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cavmae_sync import finetuning, pretraining, train, train_config
from cavmae_sync.checkpoint import load_checkpoint
from cavmae_sync.claims import localization_claim
from cavmae_sync.linear_probe import linear_probe
from cavmae_sync.clip_cache import decode_clips
from cavmae_sync.config import PreprocessConfig
from cavmae_sync.data import DatafileDataset
from cavmae_sync.embeddings import embed_dataset
from cavmae_sync.metrics import paired_bootstrap
from cavmae_sync.model import CAVMAESync, tiny
from cavmae_sync.testbed_localization import pointing_hits
from training_setup import MINI_MODEL

HERE = Path(__file__).resolve().parent

# The one private name this file reaches: balanced sampling's per-clip weights, which cannot be seen from outside
# without fine-tuning and counting the draws.
clip_weights = finetuning._clip_weights


def mini_model_config():
    "The few-thousand-parameter model of training_setup.MINI_MODEL (4 frames of 32 px, 64-frame windows)."
    return train_config.config_from_args(train_config.PretrainConfig, MINI_MODEL).model


class RandomPairs(Dataset):
    "`n` training items (one audio window and one frame) of random numbers, the same numbers for the same index."

    def __init__(self, model_config, n: int = 8):
        self.config, self.n = model_config, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        c, gen = self.config, torch.Generator().manual_seed(i)
        return {
            'audio': torch.randn(c.audio_length, c.num_mel_bins, generator=gen),
            'frames': torch.randn(3, c.image_size, c.image_size, generator=gen),
            'index': i,
        }


def embedding_distance(model, batch) -> dict:
    "A loss without randomness (no masking): the batch mean of each pair's squared embedding distance."
    out = model.encode(batch['audio'], batch['frames'])  # (B, D) embeddings
    return {'loss': (out.audio_embedding - out.video_embedding).pow(2).sum(-1).mean()}


def fit_config(out, **overrides) -> train_config.PretrainConfig:
    "A `fit` of the mini model on the CPU: batches of 4, a row of train_log.csv per step, no extras."
    settings = {
        'model': mini_model_config(),
        'output_dir': str(out),
        'batch_size': 4,
        'lr': 1e-3,
        'lr_reference_batch': 4,
        'log_every': 1,
        'progress': False,
        'tensorboard': False,
        'num_workers': 0,
        'device': 'cpu',
        'precision': 'fp32',
        'seed': 0,
    }
    return train_config.PretrainConfig(**{**settings, **overrides})


def step_log(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / 'train_log.csv').set_index('step')


# ---------------------------------------------------------------------------------------------- gradient accumulation
def test_accumulated_half_batches_give_the_gradient_of_the_full_batch(tmp_path):
    """Bug: the micro-batch loss is not divided by `accumulation_steps` (`train.fit`): the accumulated gradient is that
    many times too large (invisible under AdamW, not with grad_clip). Two micro-batches of 2 clips must give the
    gradient of one batch of 4: the logged gradient norm (before clipping) is the same at every step."""
    runs = {}
    for steps in (1, 2):
        torch.manual_seed(0)
        task = train.TrainTask(
            CAVMAESync(mini_model_config()), RandomPairs(mini_model_config()), embedding_distance
        )
        config = fit_config(
            tmp_path / f'accumulate{steps}', max_steps=3, accumulation_steps=steps, grad_clip=1e9
        )
        train.fit(config, task)
        runs[steps] = step_log(tmp_path / f'accumulate{steps}')
    whole, halves = runs[1], runs[2]
    assert list(whole.index) == list(halves.index) == [1, 2, 3]
    assert (whole['grad_norm'] > 0).all()
    np.testing.assert_allclose(halves['grad_norm'], whole['grad_norm'], rtol=1e-4)
    np.testing.assert_allclose(halves['loss'], whole['loss'], rtol=1e-4)


@pytest.fixture(scope='module')
def train_shards(clips, tmp_path_factory) -> Path:
    "The 16 training clips of the testbed written as 16 shards (one clip each): released preset, 4 frames of 32 px."
    from cavmae_sync.shards import write_shards

    tmp = tmp_path_factory.mktemp('planted_shards')
    (tmp / 'videos').mkdir()
    for video in sorted((clips / 'videos').glob('train_*.mp4')):
        (tmp / 'videos' / video.name).symlink_to(video)
    write_shards(
        tmp / 'videos',
        tmp / 'shards',
        config=PreprocessConfig(num_frames=4, image_size=32),
        shard_bytes=1,
        progress=False,
    )
    return tmp / 'shards'


def test_streaming_resume_with_accumulation_skips_whole_steps(train_shards, tmp_path):
    """Bug: a streaming (shards) resume skips `step_in_epoch` micro-batches instead of `step_in_epoch x
    accumulation_steps` (`train.fit`): the resumed steps train on other clips. Stopped after 2 of 3 steps
    (accumulation 2, so 4 micro-batches read) and resumed, the run logs the unbroken run's losses and ends with its
    weights, bit for bit. The run ends mid-epoch (4 steps per epoch): a resume that skips too many micro-batches is
    caught by this comparison too, not by running out of batches."""

    def run(out, **extra):
        args = [
            *MINI_MODEL,
            '--model.frame_preset',
            'released',
            '--train_data',
            str(train_shards),
            '--output_dir',
            str(out),
            '--batch_size',
            '4',
            '--accumulation_steps',
            '2',
            '--lr',
            '1e-3',
            '--lr_reference_batch',
            '4',
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
            '--max_steps',
            '3',
            '--checkpoint_every',
            '1',
            '--device',
            'cpu',
            *[f'--set={k}={v}' for k, v in extra.items()],
        ]
        return pretraining.pretrain(
            train_config.config_from_args(train_config.PretrainConfig, args)
        )

    whole = run(tmp_path / 'whole')
    assert (
        json.loads((tmp_path / 'whole' / 'config.json').read_text())['derived']['steps_per_epoch']
        == 4
    )
    part = run(tmp_path / 'part', stop_after_steps=2)
    assert (part.steps, part.completed) == (2, False)
    rest = run(tmp_path / 'part', resume='last')
    assert rest.completed and whole.completed
    losses = [step_log(tmp_path / name)['loss'] for name in ('whole', 'part')]
    assert list(losses[0].index) == [1, 2, 3] and losses[1].tolist() == losses[0].tolist()
    a, b = (load_checkpoint(tmp_path / name / 'model.pt').state_dict for name in ('whole', 'part'))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- logged losses under DDP
DDP_DRIVER = """
import json, sys
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from cavmae_sync import train
from cavmae_sync.model import CAVMAESync
from test_planted_bugs import RandomPairs, fit_config, mini_model_config

torch.set_num_threads(1)
ctx = train.setup_distributed('cpu')
seen = []
def losses(model, batch):
    out = model(batch['audio'], batch['frames'])
    seen.append([float(out.loss), float(out.mae_loss_audio), float(out.contrastive_loss)])
    return {'loss': out.loss, 'mae_loss_audio': out.mae_loss_audio, 'contrastive_loss': out.contrastive_loss}
torch.manual_seed(0)
task = train.TrainTask(CAVMAESync(mini_model_config()), RandomPairs(mini_model_config()), losses)
train.fit(fit_config(sys.argv[1], max_steps=2), task, ctx)
json.dump(seen, open(f'{sys.argv[1]}/rank{ctx.rank}.json', 'w'))
dist.destroy_process_group()
"""


def test_logged_ddp_losses_are_the_mean_over_the_ranks(tmp_path):
    """Bug: under DDP the logged losses are summed over the ranks, not averaged (`train.fit`'s all-reduce of the logged
    values). Two torchrun processes on the CPU record the losses each computed; rank 0's log holds their mean."""
    driver, out = tmp_path / 'driver.py', tmp_path / 'run'
    driver.write_text(DDP_DRIVER)
    out.mkdir()
    command = [
        sys.executable,
        '-m',
        'torch.distributed.run',
        '--standalone',
        '--nproc_per_node',
        '2',
        str(driver),
        str(out),
        str(HERE),
    ]
    done = subprocess.run(
        command,
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = np.array(
        [json.loads((out / f'rank{r}.json').read_text()) for r in (0, 1)]
    )  # (2 ranks, 2 steps, 3 terms)
    assert ranks.shape == (2, 2, 3) and not np.allclose(
        ranks[0], ranks[1]
    )  # each rank its own clips
    log = step_log(out)
    assert list(log.index) == [1, 2]
    np.testing.assert_allclose(
        log[['loss', 'mae_loss_audio', 'contrastive_loss']].to_numpy(), ranks.mean(0), rtol=1e-5
    )


# ---------------------------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize('smoothing', [0.1, 0.3])
def test_label_smoothing_is_torchs_cross_entropy_smoothing(smoothing):
    """Bug: label smoothing spreads s/2 instead of s/num_classes (`finetuning.classification_loss`). Cross-entropy on
    one-hot targets smoothed by s equals `F.cross_entropy(..., label_smoothing=s)`; BCE smooths each target to
    t(1 - s) + s/C."""
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 5, generator=gen), torch.tensor([0, 4, 2, 2, 1, 3])
    one_hot = F.one_hot(labels, 5).float()
    expected = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    torch.testing.assert_close(
        finetuning.classification_loss(logits, one_hot, 'ce', smoothing), expected
    )
    multi_hot = one_hot.clone()
    multi_hot[0, 3] = 1
    smoothed = multi_hot * (1 - smoothing) + smoothing / 5
    torch.testing.assert_close(
        finetuning.classification_loss(logits, multi_hot, 'bce', smoothing),
        F.binary_cross_entropy_with_logits(logits, smoothed),
    )


def test_balanced_sampling_weighs_clips_by_inverse_label_frequency():
    """Bug: balanced sampling weighs clips by their labels' frequency instead of its inverse
    (`finetuning._clip_weights`). Three clips of class 0 and one of class 1: weights 1/3, 1/3, 1/3, 1 (the lone clip is
    drawn three times as often as each other one); a clip of both classes adds both inverses."""
    cases = (
        ([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [1 / 3, 1 / 3, 1 / 3, 1]),
        ([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], [1 / 3, 1 / 3, 1 / 3 + 1 / 2, 1 / 2]),
    )  # counts 3 and 2
    for targets, wanted in cases:
        weights, wanted = clip_weights(torch.tensor(targets)), np.array(wanted)
        np.testing.assert_allclose(weights / weights.sum(), wanted / wanted.sum(), rtol=1e-6)


def test_linear_probe_does_not_depend_on_the_test_set():
    """Bug: the linear probe standardizes with the test set's statistics, a leakage (`linear_probe.linear_probe`).
    Trained on the same training features, the probe is the same whatever the test features are."""
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(40, 6, generator=gen) * 2 + 1, torch.randn(12, 6, generator=gen)
    train_y, test_y = torch.arange(40) % 3, torch.arange(12) % 3
    probes = [
        linear_probe(train_x, train_y, x, test_y, multilabel=False, epochs=3, batch_size=16).probe
        for x in (test_x, test_x * 5 + 3)
    ]
    torch.testing.assert_close(probes[0].mean, train_x.mean(0))
    torch.testing.assert_close(probes[0].std, train_x.std(0))
    state = [p.state_dict() for p in probes]
    assert state[0].keys() == state[1].keys() and all(
        torch.equal(state[0][k], state[1][k]) for k in state[0]
    )


# ---------------------------------------------------------------------------------------------- caches
def test_decoded_clip_cache_tells_preprocessing_configs_apart(clips):
    """Bug: the decoded-clip cache key ignores the preprocessing config (`clip_cache.decode_clips`). The same files
    decoded with another number of frames, or another audio normalization, give those clips, not the first ones."""
    sources = DatafileDataset(clips / 'train.json', mode='eval', config=PreprocessConfig()).sources[
        :2
    ]
    four = PreprocessConfig(num_frames=4, image_size=32, window=64)
    first = decode_clips(sources, four, progress=False)
    three = decode_clips(sources, dataclasses.replace(four, num_frames=3), progress=False)
    assert [f.shape[0] for f in first.frames] == [4, 4] and [f.shape[0] for f in three.frames] == [
        3,
        3,
    ]
    shifted = decode_clips(
        sources, dataclasses.replace(four, audio_mean=four.audio_mean + 1.0), progress=False
    )
    for before, after in zip(first.spectrograms, shifted.spectrograms):
        torch.testing.assert_close(
            after, before - 1.0 / four.audio_std
        )  # (x - mean) / std, mean + 1
    again = decode_clips(sources, four, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(again.frames, first.frames))


class NumberedClips(Dataset):
    "Random evaluation items (3 frames each): `offset` gives other clips, `fail_at` an interruption at that position."

    def __init__(self, config, n=6, offset=0, fail_at=None):
        self.config, self.n, self.offset, self.fail_at = config, n, offset, fail_at
        self.video_ids = [f'v{i + offset}' for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError('interrupted')
        c, gen = self.config, torch.Generator().manual_seed(i + self.offset)
        return {
            'audio': torch.randn(3, c.audio_length, c.num_mel_bins, generator=gen),
            'frames': torch.randn(3, 3, c.image_size, c.image_size, generator=gen),
        }


def two_small_models():
    "Two small models of one config, with other weights."
    config = tiny(
        num_frames=3,
        embed_dim=32,
        num_heads=2,
        modality_depth=1,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
        image_size=32,
        audio_length=64,
    )
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(CAVMAESync(config))
    return models


@pytest.mark.parametrize('change', ['model', 'data set'])
def test_embedding_resume_refuses_a_partial_file_of_another_model_or_data_set(tmp_path, change):
    """Bug: the embedding resume accepts a `.partial` file of another model or data set (`embeddings.embed_dataset`).
    Interrupted after 4 clips, then run with another model (or on other clips): the result is that model's (those
    clips') fresh embeddings, nothing of the partial file's."""
    first, second = two_small_models()
    cache = tmp_path / 'emb.pt'
    with pytest.raises(RuntimeError, match='interrupted'):
        embed_dataset(
            first,
            NumberedClips(first.config, fail_at=4),
            batch_size=1,
            save_every=1,
            cache_path=cache,
            progress=False,
        )
    assert (tmp_path / 'emb.pt.partial').exists()
    if change == 'model':
        model, data = second, NumberedClips(first.config)
    else:
        model, data = first, NumberedClips(first.config, offset=10)
    resumed = embed_dataset(
        model, data, batch_size=1, save_every=1, cache_path=cache, progress=False
    )
    fresh = embed_dataset(model, data, batch_size=3, progress=False)
    torch.testing.assert_close(resumed.audio, fresh.audio, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resumed.video, fresh.video, rtol=1e-4, atol=1e-5)
    assert resumed.video_ids == fresh.video_ids == data.video_ids


# ---------------------------------------------------------------------------------------------- intervals
def test_paired_bootstrap_95_interval_is_196_standard_errors():
    """Bug: the paired bootstrap's tail is one-sided, a 90% interval labelled 95% (`metrics.paired_bootstrap`). On 400
    independent queries the 95% half-width is 1.96 analytic standard errors of the mean difference (90%: 1.645)."""
    rng = np.random.default_rng(0)
    a, b = (rng.random(400) < 0.6).astype(float), (rng.random(400) < 0.4).astype(float)
    standard_error = (a - b).std() / np.sqrt(len(a)) * 100  # points
    for confidence, z in ((0.95, 1.959964), (0.90, 1.644854)):
        gain = paired_bootstrap(a, b, samples=20000, confidence=confidence)
        assert gain.low < gain.gain < gain.high
        assert (gain.high - gain.low) / 2 == pytest.approx(z * standard_error, rel=0.04), (
            confidence,
            gain,
        )


def test_paired_bootstrap_of_identical_models_is_zero():
    """Counterpart of the metrics notebook's check: the bootstrap is paired, so a model compared with itself gains 0,
    interval [0, 0], with and without clusters (a bootstrap that resamples the two models apart gives a wide
    interval)."""
    hits = (np.random.default_rng(3).random(120) < 0.5).astype(float)
    for groups in (None, np.repeat(np.arange(30), 4)):
        same = paired_bootstrap(hits, hits.copy(), groups=groups)
        assert (same.gain, same.low, same.high) == (0.0, 0.0, 0.0)


def clustered_evidence(model: str, hits: np.ndarray, clips: np.ndarray):
    "Stands in for `testbed_localization.LocalizationEvidence`: hits per frame, the frames' clips, controls passed."
    return SimpleNamespace(
        model=model,
        hits=hits,
        clips=clips,
        controls_passed=True,
        control_failure='',
        control_evidence='controls passed',
        lines=[f'- {model}: controls passed'],
    )


def judge_localization(with_ingredient, without):
    "`claims.localization_claim` of two models (gated by their own controls only)."
    return localization_claim('c', with_ingredient, without)


def test_localization_claim_resamples_clips_not_frames():
    """Bug: the localization claim's bootstrap resamples frames, ignoring the clip clusters
    (`claims.localization_claim`). When every frame of a clip repeats its clip's hit, the claim's interval is as wide as
    the bootstrap over the clips themselves (one score per clip), not the narrow one over independent frames."""
    rng = np.random.default_rng(0)
    per_clip = {
        'A': (rng.random(40) < 0.6).astype(float),
        'B': (rng.random(40) < 0.3).astype(float),
    }
    clips = np.repeat(np.arange(40), 10)  # 10 frames per clip
    evidence = {m: clustered_evidence(m, np.repeat(h, 10), clips) for m, h in per_clip.items()}
    gain = judge_localization(evidence['A'], evidence['B']).gains['pointing accuracy']
    by_clip = paired_bootstrap(per_clip['A'], per_clip['B'])
    by_frame = paired_bootstrap(evidence['A'].hits, evidence['B'].hits)
    assert gain.gain == pytest.approx(by_clip.gain)
    assert gain.high - gain.low == pytest.approx(by_clip.high - by_clip.low, rel=0.15)
    assert gain.high - gain.low > 2 * (by_frame.high - by_frame.low)


# ---------------------------------------------------------------------------------------------- notebook-only checks
@pytest.mark.parametrize('total, fraction', [(100, 0.1), (30, 0.2), (7, 0.5)])
def test_warmup_first_step_has_a_learning_rate(total, fraction):
    """Counterpart of the training-config notebook's check of the warm-up: the first step runs at 1/warmup of the
    peak (not 0), the rate rises linearly to the peak at the last warm-up step, and the cosine starts at the peak."""
    config = train_config.PretrainConfig(model=tiny(), warmup_fraction=fraction)
    warmup = round(fraction * total)
    curve = [train_config.lr_factor(s, total, 10, config) for s in range(total)]
    assert curve[0] == pytest.approx(1 / warmup) and curve[0] > 0
    np.testing.assert_allclose(curve[:warmup], np.arange(1, warmup + 1) / warmup)
    assert curve[warmup - 1] == 1.0 and curve[warmup] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(curve[warmup:], curve[warmup + 1 :]))


def test_pointing_hits_reads_the_map_row_by_column():
    """Counterpart of the testbed-localization notebook's check: a hit is the map's arg-max pixel (row, column) inside
    the mask; a bug that reads the transposed map looks for the peak at (column, row)."""
    maps = torch.rand(20, 6, 6, generator=torch.Generator().manual_seed(0))
    flat = maps.flatten(1).argmax(1)
    rows, cols = flat // 6, flat % 6
    off_diagonal = rows != cols
    assert off_diagonal.sum() >= 10
    peak, transposed = (
        torch.zeros(20, 6, 6, dtype=torch.bool),
        torch.zeros(20, 6, 6, dtype=torch.bool),
    )
    peak[torch.arange(20), rows, cols] = True
    transposed[torch.arange(20), cols, rows] = True
    np.testing.assert_array_equal(pointing_hits(maps, peak), np.ones(20))
    np.testing.assert_array_equal(pointing_hits(maps, transposed), (~off_diagonal).double().numpy())
