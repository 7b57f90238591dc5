"""Training learns, and its augmentations compute what they say: pretraining reconstructs masked patches better than a
zero prediction and memorises audio-visual pairs, fine-tuning and the linear probe beat their untrained heads, weight
averaging is the mean of the epochs' weights, mixup and SpecAugment are checked value by value. Tiny models: seconds."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from cavmae_sync import clip_cache, finetuning, pretraining, train, train_config, training_data
from cavmae_sync.checkpoint import load_checkpoint
from cavmae_sync.linear_probe import LinearProbe
from cavmae_sync.metrics import mean_average_precision
from training_setup import MINI_MODEL


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(cls, clips: Path, out: Path, *extra):
    return train_config.config_from_args(
        cls,
        [
            *MINI_MODEL,
            '--train_data',
            str(clips / 'train.json'),
            '--output_dir',
            str(out),
            '--log_every',
            '1',
            '--progress',
            'false',
            '--tensorboard',
            'false',
            '--seed',
            '3',
            *extra,
        ],
    )


@pytest.fixture
def recorded(monkeypatch):
    """Wraps `train.fit` where pretraining and fine-tuning call it: records the model, its weights
    before training and after each epoch (what `on_epoch_end` sees)."""
    record, fit = {'epochs': []}, train.fit

    def fit_recording(config, task, ctx=None, desc='train'):
        record['model'], record['initial'] = (
            task.model,
            {k: v.detach().clone() for k, v in task.model.state_dict().items()},
        )
        inner = task.on_epoch_end

        def on_epoch_end(epoch, model):
            record['epochs'].append({k: v.detach().clone() for k, v in model.state_dict().items()})
            if inner:
                inner(epoch, model)

        return fit(config, dataclasses.replace(task, on_epoch_end=on_epoch_end), ctx, desc)

    for runner in (pretraining, finetuning):
        monkeypatch.setattr(runner, 'fit', fit_recording)
    return record


def trainable_unchanged(model, before: dict) -> list[str]:
    return [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and torch.equal(p.detach(), before[n])
    ]


def test_pretraining_reconstructs_better_than_predicting_zero(clips, tmp_path, recorded):
    """40 steps on 16 synthetic clips: the masked-patch MSE (per-patch normalized targets) falls
    clearly below the ~1 of a zero prediction."""
    result = pretraining.pretrain(
        config(
            train_config.PretrainConfig,
            clips,
            tmp_path / 'run',
            '--batch_size',
            '8',
            '--lr',
            '3e-3',
            '--lr_reference_batch',
            '8',
            '--max_steps',
            '40',
            '--warmup_fraction',
            '0',
            '--weight_decay',
            '0',
            '--model.contrastive_weight',
            '1.0',
        )
    )
    history = result.history.set_index('step')
    assert list(history.index) == list(range(1, 41))
    for term in ('mae_loss_audio', 'mae_loss_video'):
        first, last = history[term].iloc[:3].mean(), history[term].iloc[-10:].mean()
        # a zero prediction of a normalized patch costs (P - 1) / P ~ 1: the model must do clearly
        # better, and better than at first
        assert last < 0.85 and last < 0.9 * first, f'{term}: {first:.3f} -> {last:.3f}'
    assert not trainable_unchanged(recorded['model'], recorded['initial'])
    saved = load_checkpoint(result.checkpoint_path).state_dict  # model.pt holds the trained weights
    assert all(torch.equal(saved[k], v) for k, v in recorded['model'].state_dict().items())


class FixedPairs(torch.utils.data.Dataset):
    "8 fixed audio-visual pairs of distinct random inputs (every item is the same at every step)."

    in_memory = True

    def __init__(self, n: int, audio_length: int, image_size: int):
        g = torch.Generator().manual_seed(0)
        self.audio, self.frames = (
            torch.randn(n, audio_length, 128, generator=g),
            torch.randn(n, 3, image_size, image_size, generator=g),
        )

    def __len__(self):
        return len(self.audio)

    def __getitem__(self, i):
        return {'audio': self.audio[i], 'frames': self.frames[i], 'index': i}


def test_pretraining_memorises_audio_visual_pairs(clips, tmp_path, recorded, monkeypatch):
    """60 steps on one fixed batch of 8 distinct pairs: the InfoNCE loss falls far below chance (log
    8) and the pairs are
    matched. (The synthetic clips look alike at this size: within a few dozen steps their
    contrastive loss stays at log B.)"""
    pairs = FixedPairs(8, 64, 32)
    monkeypatch.setattr(pretraining, 'clip_dataset', lambda *args, **kwargs: pairs)
    run = config(
        train_config.PretrainConfig,
        clips,
        tmp_path / 'run',
        '--batch_size',
        '8',
        '--lr',
        '3e-3',
        '--lr_reference_batch',
        '8',
        '--max_steps',
        '60',
        '--warmup_fraction',
        '0',
        '--weight_decay',
        '0',
        '--model.contrastive_weight',
        '1.0',
        '--model.mask_ratio_audio',
        '0.5',
        '--model.mask_ratio_video',
        '0.5',
    )  # 32 px frames have 4 patches: keep 2 visible
    history = pretraining.pretrain(run).history.set_index('step')
    chance = math.log(8)
    assert (
        history['contrastive_loss'].iloc[:3].mean() > 0.9 * chance
    )  # it starts at chance or above ...
    assert history['contrastive_loss'].iloc[-5:].mean() < 0.4 * chance  # ... and ends far below it
    assert history['contrastive_accuracy'].iloc[-5:].mean() >= 0.75
    assert not trainable_unchanged(recorded['model'], recorded['initial'])
    # the trained encoder matches the pairs without masking too
    model = recorded['model'].eval()
    with torch.no_grad():
        out = model(pairs.audio, pairs.frames, 0.0, 0.0)
    assert out.contrastive_accuracy >= 0.75 and out.contrastive_loss < 0.5 * chance


def clip_mAP(model, dataset) -> float:
    "mAP (%) of a classifier on evaluation items (all T frames of each clip)."
    items = [dataset[i] for i in range(len(dataset))]
    model.eval()
    with torch.no_grad():
        logits = model(
            torch.stack([x['audio'] for x in items]), torch.stack([x['frames'] for x in items])
        )
    return mean_average_precision(logits, torch.stack([x['labels'] for x in items]) > 0.5).mAP


def test_finetuning_beats_the_untrained_classifier(clips, tmp_path, recorded):
    """48 steps of fine-tuning on 16 clips: their mAP (evaluated on the same clips) rises well above
    the untrained classifier's."""
    run = config(
        train_config.FinetuneConfig,
        clips,
        tmp_path / 'ft',
        '--eval_data',
        str(clips / 'train.json'),
        '--epochs',
        '12',
        '--batch_size',
        '4',
        '--lr',
        '1e-3',
        '--lr_reference_batch',
        '4',
        '--schedule',
        'cosine',
        '--augment_frames',
        'false',
    )
    result = finetuning.finetune(run)
    untrained = recorded['model']
    untrained.load_state_dict(recorded['initial'])
    before = clip_mAP(untrained, training_data.clip_dataset(run, run.eval_data, 'eval'))
    assert result.metric_name == 'mAP' and result.metric == result.final_metric
    assert result.metric > before + 10, (
        f'fine-tuned mAP {result.metric:.1f}% vs untrained {before:.1f}%'
    )
    history = result.history.set_index('step')['loss']
    assert history.iloc[-8:].mean() < 0.9 * history.iloc[:8].mean()
    trained = load_checkpoint(result.checkpoint_path).build_model()
    assert (
        abs(
            clip_mAP(trained, training_data.clip_dataset(run, run.eval_data, 'eval'))
            - result.metric
        )
        < 1e-6
    )  # the metric is model.pt's


def test_linear_probe_beats_the_untrained_probe(clips, tmp_path):
    """The probe's saved layer reproduces its metric on the saved features, and beats an untrained
    layer of the same shape by far."""
    run = config(
        train_config.FinetuneConfig,
        clips,
        tmp_path / 'probe',
        '--eval_data',
        str(clips / 'train.json'),
        '--method',
        'linear_probe',
        '--probe_epochs',
        '100',
        '--probe_lr',
        '1e-2',
        '--batch_size',
        '4',
        '--lr_reference_batch',
        '4',
    )
    result = finetuning.finetune(run)
    saved = torch.load(result.checkpoint_path)
    targets = (
        clip_cache.dataset_targets(training_data.clip_dataset(run, run.eval_data, 'eval')) > 0.5
    )
    features = saved['eval_features']  # (N, D)
    probe = LinearProbe(
        torch.zeros(features.shape[1]), torch.ones(features.shape[1]), targets.shape[1]
    )
    probe.load_state_dict(saved['probe'])
    with torch.no_grad():
        assert abs(mean_average_precision(probe(features), targets).mAP - result.metric) < 1e-6
    untrained = []
    for seed in range(5):
        torch.manual_seed(seed)
        fresh = LinearProbe(probe.mean, probe.std, targets.shape[1])
        with torch.no_grad():
            untrained.append(mean_average_precision(fresh(features), targets).mAP)
    assert result.metric > max(untrained) + 15, (
        f'probe mAP {result.metric:.1f}% vs untrained {untrained}'
    )


def test_weight_averaging_is_the_mean_of_the_epochs_weights(clips, tmp_path, recorded):
    """average_from_epoch=2 of 3 epochs: model.pt holds the mean of the weights after epochs 2 and
    3, not the last epoch's."""
    run = config(
        train_config.FinetuneConfig,
        clips,
        tmp_path / 'avg',
        '--eval_data',
        str(clips / 'test.json'),
        '--epochs',
        '3',
        '--batch_size',
        '4',
        '--lr',
        '1e-3',
        '--lr_reference_batch',
        '4',
        '--schedule',
        'cosine',
        '--average_from_epoch',
        '2',
    )
    result = finetuning.finetune(run)
    assert len(recorded['epochs']) == 3
    averaged = load_checkpoint(result.checkpoint_path)
    assert (
        averaged.training_state['averaged_epochs'] == 2
        and averaged.training_state['metric'] == result.metric
    )
    second, third = recorded['epochs'][1], recorded['epochs'][2]
    moved = 0
    for name, value in averaged.state_dict.items():
        if not value.is_floating_point():
            continue
        torch.testing.assert_close(
            value, (second[name] + third[name]) / 2, rtol=1e-6, atol=1e-7, msg=name
        )
        moved += not torch.equal(second[name], third[name])
    assert moved > 10  # the two epochs differ, so the mean is neither of them
    evaluations = result.evaluations
    assert evaluations['averaged_epochs'].dropna().iloc[-1] == 2
    assert (
        result.metric == evaluations.iloc[-1]['mAP']
        and result.final_metric == evaluations.dropna(subset=['mAP']).iloc[-2]['mAP']
    )


def test_mixup_mixes_inputs_and_targets_with_the_same_weights_and_partners():
    """mixed = w * x + (1 - w) * x[partner] for audio, frames and targets alike (one-hot identity
    targets reveal w and the partner)."""
    B = 64
    torch.manual_seed(0)
    audio, frames, targets = torch.randn(B, 2, 16, 8), torch.randn(B, 2, 3, 4, 4), torch.eye(B)
    mixed_audio, mixed_frames, mixed_targets = finetuning.mixup(
        audio, frames, targets, probability=1.0, alpha=10.0
    )
    weight = mixed_targets.diagonal()  # (B,) w_i (1 where the partner is i itself)
    partner = torch.where(
        weight < 1, (mixed_targets - torch.diag(weight)).argmax(1), torch.arange(B)
    )
    assert torch.allclose(mixed_targets.sum(1), torch.ones(B))  # a soft label sums to 1
    assert torch.allclose(
        mixed_targets[torch.arange(B), partner]
        + torch.where(partner == torch.arange(B), 0.0, weight),
        torch.ones(B),
    )
    for x, mixed in ((audio, mixed_audio), (frames, mixed_frames)):
        w = weight.view(-1, *[1] * (x.ndim - 1))
        torch.testing.assert_close(mixed, w * x + (1 - w) * x[partner])
    assert sorted(partner.tolist()) == list(range(B))  # the partners are a permutation
    mixed_weights = weight[partner != torch.arange(B)]
    assert (
        0.35 < mixed_weights.mean() < 0.65 and mixed_weights.std() < 0.2
    )  # Beta(10, 10): mean 0.5, std 0.11
    # probability: 0 leaves the batch as it is; 0.5 mixes about half of a large batch
    same = finetuning.mixup(audio, frames, targets, probability=0.0, alpha=10.0)
    assert same[0] is audio and same[2] is targets
    torch.manual_seed(1)
    half = finetuning.mixup(
        torch.zeros(2000, 1), torch.zeros(2000, 1), torch.eye(2000), probability=0.5, alpha=10.0
    )[2]
    assert 0.4 < (half.diagonal() < 1).float().mean() < 0.6


def test_spec_augment_masks_whole_stripes_of_the_stated_widths():
    """Per window: one band of < freqm whole mel columns and one span of < timem whole frame rows
    are zeroed, nothing else."""
    L, F, freqm, timem = 64, 32, 8, 12
    torch.manual_seed(0)
    audio = torch.rand(50, 4, L, F) + 1.0  # (B, T, L, F), nowhere 0
    out = finetuning.spec_augment(audio, freqm, timem)
    assert out.shape == audio.shape
    zero = (out == 0).reshape(-1, L, F)  # (N, L, F)
    kept = ~zero
    assert torch.equal(
        out.reshape(-1, L, F)[kept], audio.reshape(-1, L, F)[kept]
    )  # what is not masked is untouched
    freq_widths, time_widths = [], []
    for window in zero:
        columns, rows = window.all(0), window.all(1)  # (F,) whole mel bins, (L,) whole frames
        assert torch.equal(window, columns[None, :] | rows[:, None])  # only whole stripes
        for line, limit, widths in ((columns, freqm, freq_widths), (rows, timem, time_widths)):
            where = line.nonzero().flatten()
            if len(where):
                assert where[-1] - where[0] + 1 == len(where)  # one contiguous band
            assert len(where) < limit
            widths.append(len(where))
    assert set(freq_widths) == set(range(freqm)) and set(time_widths) == set(
        range(timem)
    )  # every width up to the limit occurs
    assert torch.equal(finetuning.spec_augment(audio, 0, 0), audio)
    only_time = finetuning.spec_augment(audio, 0, timem).reshape(-1, L, F) == 0
    assert not only_time.all(1).any()  # no frequency band without freqm
