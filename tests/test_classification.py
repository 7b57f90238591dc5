"Classification metrics against hand-computed cases and direct definitions; linear probe; classifier evaluation."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cavmae_sync.classification import (average_precision, mean_average_precision, accuracy, linear_probe,
                                        extract_features, evaluate_classifier)


def definition_ap(scores, targets):
    "Mean over positives of the precision among all clips scored at least as high (ties enter together)."
    scores, targets = np.asarray(scores, float), np.asarray(targets, bool)
    return float(np.mean([targets[scores >= scores[i]].mean() for i in np.flatnonzero(targets)]))


@pytest.mark.parametrize('scores, targets, expected', [
    ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 5 / 6),                # scikit-learn's documented example
    ([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1], 5 / 12),                # tie group (1 positive, 1 negative) enters together
    ([0.5, 0.5, 0.5, 0.1], [1, 0, 1, 0], 2 / 3),
    ([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 0], 1 / 4),                 # everything tied: AP = prevalence
    ([3.0, 2.0, 1.0], [1, 1, 0], 1.0),
    ([1.0, 2.0, 3.0], [1, 0, 0], 1 / 3),
    ([0.7, 0.7, 0.2, 0.2, 0.9], [1, 0, 1, 0, 0], (1 / 3 + 2 / 5) / 2),
])
def test_average_precision_hand_computed(scores, targets, expected):
    assert math.isclose(average_precision(scores, targets), expected, rel_tol=1e-12)
    assert math.isclose(average_precision(torch.tensor(scores), torch.tensor(targets).bool()), expected, rel_tol=1e-12)


@pytest.mark.parametrize('seed', range(10))
def test_average_precision_matches_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores, targets = rng.integers(0, 5, 60) / 4, rng.random(60) < 0.25
    targets[0] = True
    assert math.isclose(average_precision(scores, targets), definition_ap(scores, targets), rel_tol=1e-12)


def test_average_precision_rejects_bad_input():
    with pytest.raises(ValueError, match='without positives'):
        average_precision([0.2, 0.1], [0, 0], no_positives='raise')
    with pytest.raises(ValueError, match='0/1'):
        average_precision([0.2, 0.1], [0, 0.5])
    with pytest.raises(ValueError, match='NaN'):
        average_precision([float('nan'), 0.1], [1, 0])
    with pytest.raises(ValueError, match='matching'):
        average_precision([0.2, 0.1], [1, 0, 1])
    with pytest.raises(ValueError, match="'zero' or 'raise'"):
        average_precision([0.2, 0.1], [1, 0], no_positives='skip')


def test_no_positives_is_zero_with_scikit_learns_warning():
    with pytest.warns(UserWarning, match='No positive class found in y_true, recall is set to one for all thresholds'):
        assert average_precision([0.2, 0.1, 0.7], [0, 0, 0]) == 0.0


def no_positive_case():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(80, 12, generator=gen).round(decimals=1)
    targets = torch.rand(80, 12, generator=gen) < 0.1
    targets[:, [4, 9]] = False
    targets[0, [c for c in range(12) if c not in (4, 9)]] = True          # every other class has a positive
    return scores, targets


def test_mean_average_precision_counts_classes_without_positives_as_zero_by_default():
    scores, targets = no_positive_case()
    with pytest.warns(UserWarning, match=r'No positive class found in y_true.*2 of 12 classes.*\[4, 9\]'):
        result = mean_average_precision(scores, targets)
    per_class = [definition_ap(scores[:, c].numpy(), targets[:, c].numpy()) * 100 if c not in (4, 9) else 0.0 for c in range(12)]
    assert result.classes_without_positives == [4, 9] and result.no_positives == 'zero'
    assert (result.per_class[[4, 9]] == 0).all() and result.evaluated_classes == list(range(12))
    assert math.isclose(result.mAP, sum(per_class) / 12, rel_tol=1e-9)    # hand-computed: the 10 APs and two zeros over 12
    assert 'counted as AP 0' in repr(result)
    frame = result.to_frame([f'c{i}' for i in range(12)])
    assert frame['evaluated'].sum() == 12 and frame['has_positives'].sum() == 10


def test_mean_average_precision_can_exclude_classes_without_positives():
    scores, targets = no_positive_case()
    result = mean_average_precision(scores, targets, no_positives='exclude')
    assert result.classes_without_positives == [4, 9]
    assert torch.isnan(result.per_class[[4, 9]]).all() and not torch.isnan(result.per_class[[0, 1, 2, 3, 5]]).any()
    per_class = [definition_ap(scores[:, c].numpy(), targets[:, c].numpy()) * 100 for c in range(12) if c not in (4, 9)]
    assert math.isclose(result.mAP, np.mean(per_class), rel_tol=1e-9)
    assert 'left out' in repr(result) and result.to_frame()['evaluated'].sum() == 10
    with pytest.raises(ValueError, match='no class'):
        mean_average_precision(scores, torch.zeros_like(targets))
    with pytest.raises(ValueError, match='no_positives must be one of'):
        mean_average_precision(scores, targets, no_positives='nan')


def test_mean_average_precision_hand_computed_small_case():
    scores = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.7, 0.3], [0.1, 0.6, 0.2], [0.3, 0.1, 0.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])         # class 2 has no positive
    with pytest.warns(UserWarning):
        assert math.isclose(mean_average_precision(scores, targets).mAP, (0.75 + 1.0 + 0.0) / 3 * 100)
    assert math.isclose(mean_average_precision(scores, targets, no_positives='exclude').mAP, (0.75 + 1.0) / 2 * 100)


def test_against_scikit_learn_when_installed():
    "The released CAV-MAE code's mAP: sklearn's average_precision_score per class, then the mean over all classes."
    sklearn_metrics = pytest.importorskip('sklearn.metrics')
    import warnings
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(150, 20, generator=gen).round(decimals=1)              # rounding makes ties
    targets = torch.rand(150, 20, generator=gen) < 0.08
    targets[:, [3, 17]] = False                                                  # two classes without positives
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter('always')
        reference = [sklearn_metrics.average_precision_score(targets[:, k].numpy(), scores[:, k].numpy()) for k in range(20)]
    assert reference[3] == reference[17] == 0.0
    assert any('No positive class found in y_true' in str(w.message) for w in theirs)
    with pytest.warns(UserWarning, match='No positive class found in y_true'):
        ours = mean_average_precision(scores, targets)
    np.testing.assert_allclose(ours.per_class.double().numpy(), np.array(reference) * 100, rtol=1e-6, atol=1e-5)
    assert math.isclose(ours.mAP, float(np.mean(reference)) * 100, rel_tol=1e-6)
    for k in (0, 5):
        assert math.isclose(average_precision(scores[:, k], targets[:, k]), reference[k], rel_tol=1e-12)


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, [1, 0, 0, 0]) == 75.0
    assert accuracy(logits, F.one_hot(torch.tensor([1, 0, 0, 0]), 2)) == 75.0
    with pytest.raises(ValueError, match='exactly one'):
        accuracy(logits, torch.ones(4, 2))
    with pytest.raises(ValueError):
        accuracy(logits, [1, 0, 2, 0])


def test_linear_probe_single_and_multi_label():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=gen) * 2
    labels = torch.randint(0, 4, (400,), generator=gen)
    features = centres[labels] + torch.randn(400, 16, generator=gen) - 5
    result = linear_probe(features[:300], labels[:300], features[300:], F.one_hot(labels[300:], 4), multilabel=False, epochs=20, lr=1e-2)
    assert result.metric_name == 'accuracy' and result.metric > 90
    assert len(result.history) == 20 and result.history['test_metric'].notna().sum() >= 2
    torch.testing.assert_close(torch.tensor(result.metric), torch.tensor(accuracy(result.test_scores, labels[300:])))
    tags = (torch.rand(400, 5, generator=gen) < 0.3).float()
    features = tags @ torch.randn(5, 16, generator=gen) + 0.3 * torch.randn(400, 16, generator=gen)
    result = linear_probe(features[:300], tags[:300], features[300:], tags[300:], multilabel=True, epochs=20, lr=1e-2)
    assert result.metric_name == 'mAP' and result.metric > 85 and result.map_result is not None
    with pytest.raises(ValueError):
        linear_probe(features[:300], tags[:200], features[300:], tags[300:], multilabel=True, epochs=1)


class LabelledClips(Dataset):
    def __init__(self, config, n=5, frames=2, classes=3):
        self.config, self.n, self.frames, self.classes = config, n, frames, classes
    def __len__(self): return self.n
    def __getitem__(self, i):
        c, gen = self.config, torch.Generator().manual_seed(i)
        return {'audio': torch.randn(self.frames, c.audio_length, c.num_mel_bins, generator=gen),
                'frames': torch.randn(self.frames, 3, c.image_size, c.image_size, generator=gen),
                'labels': F.one_hot(torch.tensor(i % self.classes), self.classes).float(), 'index': i}


def test_extract_features_are_frame_means_of_pooled_embeddings(tmp_path):
    from cavmae_sync.model import CAVMAESync, tiny
    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=2)).eval()
    data = LabelledClips(model.config)
    features = extract_features(model, data, batch_size=2, progress=False, cache_path=tmp_path / 'f.pt')
    item = data[3]
    with torch.no_grad():
        out = model.encode(item['audio'], item['frames'])                 # the T frames of clip 3
    expected = torch.cat([out.audio_embedding.mean(0), out.video_embedding.mean(0)])
    torch.testing.assert_close(features.features[3], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(features.targets, torch.stack([data[i]['labels'] for i in range(5)]))
    assert torch.equal(extract_features(model, data, cache_path=tmp_path / 'f.pt').features, features.features)
    with pytest.raises(ValueError, match='another model'):
        extract_features(model, data, modality='audio', cache_path=tmp_path / 'f.pt')


def test_evaluate_classifier_scores_its_logits():
    from cavmae_sync.model import CAVMAESyncClassifier, tiny
    torch.manual_seed(0)
    classifier = CAVMAESyncClassifier(tiny(num_frames=2), num_classes=3)
    data = LabelledClips(classifier.config, n=6)
    classifier.train()
    evaluation = evaluate_classifier(classifier, data, multilabel=False, batch_size=4, progress=False)
    assert classifier.training                                                    # its mode is restored
    with torch.no_grad():
        expected = classifier.eval()(torch.stack([data[i]['audio'] for i in range(6)]), torch.stack([data[i]['frames'] for i in range(6)]))
    torch.testing.assert_close(evaluation.scores, expected, rtol=1e-4, atol=1e-5)
    assert evaluation.metric == accuracy(expected, torch.arange(6) % 3)
    with pytest.raises(ValueError, match='classes'):
        evaluate_classifier(classifier, LabelledClips(classifier.config, classes=4), multilabel=True, progress=False)


def test_evaluate_classifier_no_positives_rule_and_precision():
    from cavmae_sync.model import CAVMAESyncClassifier, tiny
    torch.manual_seed(0)
    classifier = CAVMAESyncClassifier(tiny(num_frames=2), num_classes=4)
    data = LabelledClips(classifier.config, n=6, classes=3)
    padded = [dict(data[i], labels=torch.cat([data[i]['labels'], torch.zeros(1)])) for i in range(6)]   # class 3: no positive
    with pytest.warns(UserWarning, match='No positive class found'):
        zero = evaluate_classifier(classifier, padded, multilabel=True, progress=False)
    excluded = evaluate_classifier(classifier, padded, multilabel=True, progress=False, no_positives='exclude')
    per_class = excluded.map_result.per_class[:3].double()
    assert math.isclose(zero.metric, float(per_class.sum()) / 4, rel_tol=1e-6) and math.isclose(excluded.metric, float(per_class.mean()), rel_tol=1e-6)
    assert torch.equal(evaluate_classifier(classifier, padded, multilabel=True, progress=False, precision='bf16',
                                           no_positives='exclude').scores, excluded.scores)          # CPU: fp32 whatever precision says
    with pytest.raises(ValueError, match='precision'):
        evaluate_classifier(classifier, padded, multilabel=True, progress=False, precision='fp8')
    with pytest.raises(ValueError, match='no_positives'):
        evaluate_classifier(classifier, padded, multilabel=True, progress=False, no_positives='drop')


def test_extract_features_precision_option(tmp_path):
    from cavmae_sync.model import CAVMAESync, tiny
    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=2))
    data = LabelledClips(model.config, n=3)
    fp32 = extract_features(model, data, progress=False)
    assert torch.equal(extract_features(model, data, progress=False, precision='bf16').features, fp32.features)
    with pytest.raises(ValueError, match='precision'):
        extract_features(model, data, progress=False, precision='int8')


def test_reference_results_keep_both_files_and_their_sources():
    from cavmae_sync.classification import reference_results
    from cavmae_sync.config import project_root
    import pandas as pd
    baseline = pd.read_csv(project_root() / 'data' / 'cavmae_baseline_results.csv')       # the old file still reads as before
    assert {'model', 'task', 'dataset', 'metric', 'value', 'source'} <= set(baseline.columns)
    table = reference_results()
    assert len(table) == len(baseline) + 4 and table['source'].notna().all()
    sync = table[table['model'] == 'CAV-MAE Sync'].set_index(['dataset', 'task', 'metric'])['value']
    assert sync.to_dict() == {('audioset_20k', 'frozen_encoder', 'mAP'): 30.5, ('audioset_20k', 'frozen_encoder_audio_only', 'mAP'): 29.3,
                              ('audioset_20k', 'frozen_encoder_video_only', 'mAP'): 14.3, ('vggsound', 'frozen_encoder', 'accuracy'): 52.7}
    assert table[table['model'] == 'CAV-MAE Sync']['source'].str.contains('TG-DP').all()
    assert set(reference_results('audioset')['dataset']) <= {'audioset_20k', 'audioset_2m'}
