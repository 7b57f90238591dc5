"""Classification: linear probe, frozen features, classifier evaluation, published numbers (the
metrics themselves: test_metrics.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cavmae_sync.linear_probe import linear_probe, extract_features, evaluate_classifier
from cavmae_sync.metrics import accuracy


def test_linear_probe_single_and_multi_label():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen) * 2
    labels = torch.randint(0, 4, (400,), generator=gen)
    features = centres[labels] + torch.randn(400, 16, generator=gen) - 5
    result = linear_probe(
        features[:300],
        labels[:300],
        features[300:],
        F.one_hot(labels[300:], 4),
        multilabel=False,
        epochs=20,
        lr=1e-2,
    )
    assert result.metric_name == 'accuracy' and result.metric > 90
    assert len(result.history) == 20 and result.history['test_metric'].notna().sum() >= 2
    torch.testing.assert_close(
        torch.tensor(result.metric), torch.tensor(accuracy(result.test_scores, labels[300:]))
    )
    tags = (torch.rand(400, 5, generator=gen) < 0.3).float()
    features = tags @ torch.randn(5, 16, generator=gen) + 0.3 * torch.randn(400, 16, generator=gen)
    result = linear_probe(
        features[:300], tags[:300], features[300:], tags[300:], multilabel=True, epochs=20, lr=1e-2
    )
    assert result.metric_name == 'mAP' and result.metric > 85 and result.map_result is not None
    with pytest.raises(ValueError):
        linear_probe(
            features[:300], tags[:200], features[300:], tags[300:], multilabel=True, epochs=1
        )


class LabelledClips(Dataset):
    def __init__(self, config, n=5, frames=2, classes=3):
        self.config, self.n, self.frames, self.classes = config, n, frames, classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        c, gen = self.config, torch.Generator().manual_seed(i)
        return {
            'audio': torch.randn(self.frames, c.audio_length, c.num_mel_bins, generator=gen),
            'frames': torch.randn(self.frames, 3, c.image_size, c.image_size, generator=gen),
            'labels': F.one_hot(torch.tensor(i % self.classes), self.classes).float(),
            'index': i,
        }


def test_extract_features_are_frame_means_of_pooled_embeddings(tmp_path):
    from cavmae_sync.model import CAVMAESync, tiny

    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=2)).eval()
    data = LabelledClips(model.config)
    features = extract_features(
        model, data, batch_size=2, progress=False, cache_path=tmp_path / 'f.pt'
    )
    item = data[3]
    with torch.no_grad():
        out = model.encode(item['audio'], item['frames'])  # the T frames of clip 3
    expected = torch.cat([out.audio_embedding.mean(0), out.video_embedding.mean(0)])
    torch.testing.assert_close(features.features[3], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(features.targets, torch.stack([data[i]['labels'] for i in range(5)]))
    assert torch.equal(
        extract_features(model, data, cache_path=tmp_path / 'f.pt').features, features.features
    )
    with pytest.raises(ValueError, match='another model'):
        extract_features(model, data, modality='audio', cache_path=tmp_path / 'f.pt')


def test_evaluate_classifier_scores_its_logits():
    from cavmae_sync.model import tiny
    from cavmae_sync.classifier import CAVMAESyncClassifier

    torch.manual_seed(0)
    classifier = CAVMAESyncClassifier(tiny(num_frames=2), num_classes=3)
    data = LabelledClips(classifier.config, n=6)
    classifier.train()
    evaluation = evaluate_classifier(
        classifier, data, multilabel=False, batch_size=4, progress=False
    )
    assert classifier.training  # its mode is restored
    with torch.no_grad():
        expected = classifier.eval()(
            torch.stack([data[i]['audio'] for i in range(6)]),
            torch.stack([data[i]['frames'] for i in range(6)]),
        )
    torch.testing.assert_close(evaluation.scores, expected, rtol=1e-4, atol=1e-5)
    assert evaluation.metric == accuracy(expected, torch.arange(6) % 3)
    with pytest.raises(ValueError, match='classes'):
        evaluate_classifier(
            classifier, LabelledClips(classifier.config, classes=4), multilabel=True, progress=False
        )


def test_evaluate_classifier_no_positives_rule_and_precision():
    from cavmae_sync.model import tiny
    from cavmae_sync.classifier import CAVMAESyncClassifier

    torch.manual_seed(0)
    classifier = CAVMAESyncClassifier(tiny(num_frames=2), num_classes=4)
    data = LabelledClips(classifier.config, n=6, classes=3)
    padded = [
        dict(data[i], labels=torch.cat([data[i]['labels'], torch.zeros(1)])) for i in range(6)
    ]  # class 3: no positive
    with pytest.warns(UserWarning, match='No positive class found'):
        zero = evaluate_classifier(classifier, padded, multilabel=True, progress=False)
    excluded = evaluate_classifier(
        classifier, padded, multilabel=True, progress=False, no_positives='exclude'
    )
    per_class = excluded.map_result.per_class[:3].double()
    assert math.isclose(zero.metric, float(per_class.sum()) / 4, rel_tol=1e-6) and math.isclose(
        excluded.metric, float(per_class.mean()), rel_tol=1e-6
    )
    assert torch.equal(
        evaluate_classifier(
            classifier,
            padded,
            multilabel=True,
            progress=False,
            precision='bf16',
            no_positives='exclude',
        ).scores,
        excluded.scores,
    )  # CPU: fp32 whatever precision says
    with pytest.raises(ValueError, match='precision'):
        evaluate_classifier(classifier, padded, multilabel=True, progress=False, precision='fp8')
    with pytest.raises(ValueError, match='no_positives'):
        evaluate_classifier(
            classifier, padded, multilabel=True, progress=False, no_positives='drop'
        )


def test_extract_features_precision_option(tmp_path):
    from cavmae_sync.model import CAVMAESync, tiny

    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=2))
    data = LabelledClips(model.config, n=3)
    fp32 = extract_features(model, data, progress=False)
    assert torch.equal(
        extract_features(model, data, progress=False, precision='bf16').features, fp32.features
    )
    with pytest.raises(ValueError, match='precision'):
        extract_features(model, data, progress=False, precision='int8')


def test_reference_results_keep_both_files_and_their_sources():
    from cavmae_sync.classification import reference_results
    from cavmae_sync.config import project_root
    import pandas as pd

    baseline = pd.read_csv(
        project_root() / 'data' / 'cavmae_baseline_results.csv'
    )  # the old file still reads as before
    assert {'model', 'task', 'dataset', 'metric', 'value', 'source'} <= set(baseline.columns)
    table = reference_results()
    assert len(table) == len(baseline) + 4 and table['source'].notna().all()
    sync = table[table['model'] == 'CAV-MAE Sync'].set_index(['dataset', 'task', 'metric'])['value']
    assert sync.to_dict() == {
        ('audioset_20k', 'frozen_encoder', 'mAP'): 30.5,
        ('audioset_20k', 'frozen_encoder_audio_only', 'mAP'): 29.3,
        ('audioset_20k', 'frozen_encoder_video_only', 'mAP'): 14.3,
        ('vggsound', 'frozen_encoder', 'accuracy'): 52.7,
    }
    assert table[table['model'] == 'CAV-MAE Sync']['source'].str.contains('TG-DP').all()
    assert set(reference_results('audioset')['dataset']) <= {'audioset_20k', 'audioset_2m'}


# --- paired bootstrap of mAP, the runs of a comparison, the verdict per protocol
# ---------------------------------------------
import warnings

import numpy as np

from cavmae_sync.classification import (
    paired_map_bootstrap,
    classification_gain,
    classification_claims,
    ClassificationRun,
    ClassificationResults,
    CONTROL,
)
from cavmae_sync.metrics import mean_average_precision


def test_paired_map_bootstrap_recomputes_map_on_each_draw():
    """Each draw's gap is the two models' mAP on the resampled clips (scikit-learn's AP where
    installed); the interval is their percentiles."""
    gen = torch.Generator().manual_seed(0)
    y = (torch.rand(25, 3, generator=gen) < 0.4).float()
    a, b = y + torch.randn(25, 3, generator=gen), torch.randn(25, 3, generator=gen)
    result = paired_map_bootstrap(a, b, y, samples=40, seed=7, confidence=0.9)
    draws = np.random.default_rng(7).integers(0, 25, (40, 25))
    try:
        from sklearn.metrics import average_precision_score

        def draw_map(s, d):
            return 100 * np.mean(
                [
                    average_precision_score(y[d, c].numpy(), s[d, c].numpy())
                    if y[d, c].any()
                    else 0.0
                    for c in range(3)
                ]
            )
    except ImportError:

        def draw_map(s, d):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                return mean_average_precision(s[d], y[d]).mAP

    gaps = [draw_map(a, d) - draw_map(b, d) for d in draws]
    np.testing.assert_allclose([result.low, result.high], np.percentile(gaps, [5, 95]), atol=1e-9)
    assert (
        abs(result.gain - (mean_average_precision(a, y).mAP - mean_average_precision(b, y).mAP))
        < 1e-9
    )
    assert result.gain > 0 and result.low > 0 and result.low <= result.gain <= result.high
    chunked = paired_map_bootstrap(
        a, b, y, samples=40, seed=7, confidence=0.9, chunk=3
    )  # chunking changes nothing
    np.testing.assert_allclose(
        [chunked.gain, chunked.low, chunked.high], [result.gain, result.low, result.high], atol=1e-9
    )
    reversed_ = paired_map_bootstrap(b, a, y, samples=40, seed=7, confidence=0.9)
    assert abs(reversed_.gain + result.gain) < 1e-9 and abs(reversed_.high + result.low) < 1e-9


def test_paired_map_bootstrap_hand_case_and_bad_input():
    "Three clips, one class: a ranks the positive first (AP 1), b third (AP 1/3): a gain of 66.7 points."
    y = torch.tensor([[1.0], [0.0], [0.0]])
    a, b = (
        torch.tensor([[0.9], [0.1], [0.5]]),
        torch.tensor([[0.2], [0.9], [0.5]]),
    )  # a: AP 1; b: positive ranked third, AP 1/3
    result = paired_map_bootstrap(a, b, y, samples=1)
    assert abs(result.gain - (100 - 100 / 3)) < 1e-9
    with pytest.raises(ValueError, match='same clips'):
        paired_map_bootstrap(a, b[:2], y)
    with pytest.raises(ValueError, match='no_positives'):
        paired_map_bootstrap(a, b, y, no_positives='drop')
    with pytest.raises(ValueError, match='0/1'):
        paired_map_bootstrap(a, b, y * 2)
    with pytest.raises(ValueError, match='NaN'):
        paired_map_bootstrap(a, b * float('nan'), y)
    same = paired_map_bootstrap(a, a.clone(), y, samples=30)
    assert (same.gain, same.low, same.high) == (0.0, 0.0, 0.0)


def _run(model, method, scores, targets, metric_name='mAP'):
    metric = (
        mean_average_precision(scores, targets).mAP
        if metric_name == 'mAP'
        else accuracy(scores, targets)
    )
    return ClassificationRun(model, method, metric_name, metric, scores, targets, 'hand-made', 0.0)


def _hand_made_results(sync_noise, base_noise, control_noise, seed=0, n=120, classes=5):
    "Scores = labels + noise of the given size per model: less noise, higher mAP."
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, classes, generator=gen) < 0.3).float()

    def scores(noise):
        return y + noise * torch.randn(n, classes, generator=gen)

    runs = {
        ('Sync', m): _run('Sync', m, scores(sync_noise), y) for m in ('linear_probe', 'finetune')
    }
    runs.update(
        {('Base', m): _run('Base', m, scores(base_noise), y) for m in ('linear_probe', 'finetune')}
    )
    runs[(CONTROL, 'linear_probe')] = _run(CONTROL, 'linear_probe', scores(control_noise), y)
    return ClassificationResults(runs, CONTROL)


def test_classification_claims_outcomes_follow_the_rule():
    """Held / did not hold / not shown from the interval; no verdict for a model that does not beat
    the random-init probe."""
    held = classification_claims(
        _hand_made_results(0.3, 1.0, 50.0), 'Sync', 'Base', control_bar=100, samples=300
    )
    assert [v.outcome for v in held] == ['held', 'held'] and [list(v.gains) for v in held] == [
        ['linear probe mAP'],
        ['fine-tuning mAP'],
    ]
    assert (
        held[0].headline.startswith('**The claim held**')
        and 'Sync classifies better than Base (linear probe' in held[0].claim
    )
    same_runs = _hand_made_results(0.3, 1.0, 50.0)  # the same seed: the same scores
    gap = (
        same_runs.run('Sync', 'linear_probe').metric - same_runs.run('Base', 'linear_probe').metric
    )
    assert (
        abs(held[0].gains['linear probe mAP'].gain - gap) < 1e-9
    )  # Sync minus Base, not the reverse
    assert any('control (random init (tiny), linear probe)' in line for line in held[0].notes)
    assert [c.passed for c in held[0].checks] == [
        True,
        True,
    ] and 'over the random-init probe' in held[0].checks[0].line
    reverse = classification_claims(
        _hand_made_results(1.0, 0.3, 50.0), 'Sync', 'Base', control_bar=100, samples=300
    )
    assert [v.outcome for v in reverse] == ['did not hold', 'did not hold']
    tie = classification_claims(
        _hand_made_results(0.5, 0.5, 50.0, seed=3), 'Sync', 'Base', control_bar=100, samples=300
    )
    assert all(v.outcome == 'not shown' for v in tie)
    # Base's scores no better than the control's: no verdict, whatever Sync does, and the gate names Base
    gated = classification_claims(
        _hand_made_results(0.3, 50.0, 50.0), 'Sync', 'Base', control_bar=100, samples=300
    )
    assert all(v.outcome == 'no verdict' and 'Base fails its control' in v.headline for v in gated)
    assert all('Sync fails' not in v.headline for v in gated)


def test_classification_claims_control_gates():
    "A control above the bar gates both protocols; a model that does not beat the control gates its comparison."
    readable = classification_claims(
        _hand_made_results(0.3, 2.0, 0.5), 'Sync', 'Base', control_bar=60, samples=300
    )
    assert _hand_made_results(0.3, 2.0, 0.5).control_run.metric > 60
    assert all(v.outcome == 'no verdict' and 'the control fails' in v.headline for v in readable)
    no_better = classification_claims(
        _hand_made_results(1.5, 2.0, 0.3), 'Sync', 'Base', control_bar=100, samples=300
    )
    assert all(
        v.outcome == 'no verdict'
        and 'Sync fails its control' in v.headline
        and 'Base fails its control' in v.headline
        for v in no_better
    )
    with pytest.raises(ValueError, match='control'):
        classification_claims(
            ClassificationResults(_hand_made_results(0.3, 2.0, 0.5).runs), 'Sync', 'Base'
        )


def test_classification_gain_of_accuracy_is_per_clip_and_refuses_other_clips():
    y = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), 3).float()
    right, wrong = y * 5, torch.roll(y, 1, dims=1) * 5
    gain = classification_gain(
        _run('a', 'finetune', right, y, 'accuracy'),
        _run('b', 'finetune', wrong, y, 'accuracy'),
        samples=100,
    )
    assert (gain.gain, gain.low, gain.high) == (100.0, 100.0, 100.0)
    with pytest.raises(ValueError, match='same test clips'):
        classification_gain(
            _run('a', 'finetune', right, y, 'accuracy'),
            _run('b', 'finetune', wrong[:, [1, 0, 2]], y[:, [1, 0, 2]], 'accuracy'),
        )


def test_testbed_runs_are_cached_and_scored_on_every_test_clip(clips, tmp_path, monkeypatch):
    """Probe and fine-tuning of a checkpoint and the random-init control on a small testbed: cached,
    and the metric the run logged."""
    import json
    import pandas as pd
    from cavmae_sync.checkpoint import save_checkpoint
    from cavmae_sync.model import CAVMAESync, tiny
    from cavmae_sync.classification import testbed_classification

    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(tmp_path / 'data'))  # private run cache and locks
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / 'tiny.pt', CAVMAESync(tiny()))
    budget = dict(
        probe_epochs=2,
        finetune_epochs=1,
        finetune_batch_size=8,
        batch_size=4,
        num_workers=0,
        device='cpu',
    )
    results = testbed_classification(clips, {'tiny': checkpoint}, **budget)
    assert results.control == CONTROL and set(results.runs) == {
        ('tiny', 'linear_probe'),
        ('tiny', 'finetune'),
        (CONTROL, 'linear_probe'),
    }
    classes, test_clips = (
        len(pd.read_csv(clips / 'labels.csv')),
        len(json.loads((clips / 'test.json').read_text())['data']),
    )
    for run in results.runs.values():
        logged = json.loads((run.folder / 'summary.json').read_text())['metric']
        assert (
            run.scores.shape == run.targets.shape == (test_clips, classes)
            and abs(run.metric - logged) < 1e-4
        ), (run, logged)
    assert results.run('tiny', 'finetune').budget == '1 epoch of 16 clips, batch 8 (2 steps)'
    runs = tmp_path / 'data' / 'runs'
    folders = sorted(p.name for p in runs.iterdir())
    again = testbed_classification(
        clips, {'tiny': checkpoint}, **budget
    )  # read back, not retrained
    assert sorted(p.name for p in runs.iterdir()) == folders
    assert all(
        torch.equal(again.runs[k].scores, r.scores) and again.runs[k].seconds == r.seconds
        for k, r in results.runs.items()
    )
