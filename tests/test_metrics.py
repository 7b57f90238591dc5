"""Metrics against hand-computed cases, direct definitions and scikit-learn: AP, mAP, accuracy,
recall at k and ranks (ties included), best IoU."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cavmae_sync.metrics import (
    average_precision,
    mean_average_precision,
    accuracy,
    retrieval_ranks,
    recall_metrics,
    rank_counts,
    recall_hits,
    best_iou,
)


def definition_ap(scores, targets):
    "Mean over positives of the precision among all clips scored at least as high (ties enter together)."
    scores, targets = np.asarray(scores, float), np.asarray(targets, bool)
    return float(np.mean([targets[scores >= scores[i]].mean() for i in np.flatnonzero(targets)]))


@pytest.mark.parametrize(
    'scores, targets, expected',
    [
        ([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], 5 / 6),  # scikit-learn's documented example
        (
            [0.9, 0.5, 0.5, 0.1],
            [0, 1, 0, 1],
            5 / 12,
        ),  # tie group (1 positive, 1 negative) enters together
        ([0.5, 0.5, 0.5, 0.1], [1, 0, 1, 0], 2 / 3),
        ([0.3, 0.3, 0.3, 0.3], [0, 1, 0, 0], 1 / 4),  # everything tied: AP = prevalence
        ([3.0, 2.0, 1.0], [1, 1, 0], 1.0),
        ([1.0, 2.0, 3.0], [1, 0, 0], 1 / 3),
        ([0.7, 0.7, 0.2, 0.2, 0.9], [1, 0, 1, 0, 0], (1 / 3 + 2 / 5) / 2),
    ],
)
def test_average_precision_hand_computed(scores, targets, expected):
    assert math.isclose(average_precision(scores, targets), expected, rel_tol=1e-12)
    assert math.isclose(
        average_precision(torch.tensor(scores), torch.tensor(targets).bool()),
        expected,
        rel_tol=1e-12,
    )


@pytest.mark.parametrize('seed', range(10))
def test_average_precision_matches_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores, targets = rng.integers(0, 5, 60) / 4, rng.random(60) < 0.25
    targets[0] = True
    assert math.isclose(
        average_precision(scores, targets), definition_ap(scores, targets), rel_tol=1e-12
    )


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
    with pytest.warns(
        UserWarning,
        match='No positive class found in y_true, recall is set to one for all thresholds',
    ):
        assert average_precision([0.2, 0.1, 0.7], [0, 0, 0]) == 0.0


def no_positive_case():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(80, 12, generator=gen).round(decimals=1)
    targets = torch.rand(80, 12, generator=gen) < 0.1
    targets[:, [4, 9]] = False
    targets[0, [c for c in range(12) if c not in (4, 9)]] = True  # every other class has a positive
    return scores, targets


def test_mean_average_precision_counts_classes_without_positives_as_zero_by_default():
    scores, targets = no_positive_case()
    with pytest.warns(
        UserWarning, match=r'No positive class found in y_true.*2 of 12 classes.*\[4, 9\]'
    ):
        result = mean_average_precision(scores, targets)
    per_class = [
        definition_ap(scores[:, c].numpy(), targets[:, c].numpy()) * 100 if c not in (4, 9) else 0.0
        for c in range(12)
    ]
    assert result.classes_without_positives == [4, 9] and result.no_positives == 'zero'
    assert (result.per_class[[4, 9]] == 0).all() and result.evaluated_classes == list(range(12))
    assert math.isclose(
        result.mAP, sum(per_class) / 12, rel_tol=1e-9
    )  # hand-computed: the 10 APs and two zeros over 12
    assert 'counted as AP 0' in repr(result)
    frame = result.to_frame([f'c{i}' for i in range(12)])
    assert frame['evaluated'].sum() == 12 and frame['has_positives'].sum() == 10


def test_mean_average_precision_can_exclude_classes_without_positives():
    scores, targets = no_positive_case()
    result = mean_average_precision(scores, targets, no_positives='exclude')
    assert result.classes_without_positives == [4, 9]
    assert (
        torch.isnan(result.per_class[[4, 9]]).all()
        and not torch.isnan(result.per_class[[0, 1, 2, 3, 5]]).any()
    )
    per_class = [
        definition_ap(scores[:, c].numpy(), targets[:, c].numpy()) * 100
        for c in range(12)
        if c not in (4, 9)
    ]
    assert math.isclose(result.mAP, np.mean(per_class), rel_tol=1e-9)
    assert 'left out' in repr(result) and result.to_frame()['evaluated'].sum() == 10
    with pytest.raises(ValueError, match='no class'):
        mean_average_precision(scores, torch.zeros_like(targets))
    with pytest.raises(ValueError, match='no_positives must be one of'):
        mean_average_precision(scores, targets, no_positives='nan')


def test_mean_average_precision_hand_computed_small_case():
    scores = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.7, 0.3], [0.1, 0.6, 0.2], [0.3, 0.1, 0.0]])
    targets = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0]])  # class 2 has no positive
    with pytest.warns(UserWarning):
        assert math.isclose(
            mean_average_precision(scores, targets).mAP, (0.75 + 1.0 + 0.0) / 3 * 100
        )
    assert math.isclose(
        mean_average_precision(scores, targets, no_positives='exclude').mAP, (0.75 + 1.0) / 2 * 100
    )


def test_against_scikit_learn_when_installed():
    "The released CAV-MAE code's mAP: sklearn's average_precision_score per class, then the mean over all classes."
    sklearn_metrics = pytest.importorskip('sklearn.metrics')
    import warnings

    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(150, 20, generator=gen).round(decimals=1)  # rounding makes ties
    targets = torch.rand(150, 20, generator=gen) < 0.08
    targets[:, [3, 17]] = False  # two classes without positives
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter('always')
        reference = [
            sklearn_metrics.average_precision_score(targets[:, k].numpy(), scores[:, k].numpy())
            for k in range(20)
        ]
    assert reference[3] == reference[17] == 0.0
    assert any('No positive class found in y_true' in str(w.message) for w in theirs)
    with pytest.warns(UserWarning, match='No positive class found in y_true'):
        ours = mean_average_precision(scores, targets)
    np.testing.assert_allclose(
        ours.per_class.double().numpy(), np.array(reference) * 100, rtol=1e-6, atol=1e-5
    )
    assert math.isclose(ours.mAP, float(np.mean(reference)) * 100, rel_tol=1e-6)
    for k in (0, 5):
        assert math.isclose(
            average_precision(scores[:, k], targets[:, k]), reference[k], rel_tol=1e-12
        )


def test_accuracy():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, [1, 0, 0, 0]) == 75.0
    assert accuracy(logits, F.one_hot(torch.tensor([1, 0, 0, 0]), 2)) == 75.0
    with pytest.raises(ValueError, match='exactly one'):
        accuracy(logits, torch.ones(4, 2))
    with pytest.raises(ValueError):
        accuracy(logits, [1, 0, 2, 0])


def direct_expectation(scores, ks=(1, 5, 10)):
    """R@k and MR straight from the definition, one query at a time: the true match is equally likely to stand at
    each place of its tie group (positions h+1 .. h+e+1), so each place is one outcome of probability 1 / (e + 1)."""
    scores = np.asarray(scores)
    hits, expected_ranks, ties = {k: [] for k in ks}, [], 0
    for i in range(len(scores)):
        higher = sum(1 for j in range(scores.shape[1]) if scores[i, j] > scores[i, i])
        tied = sum(1 for j in range(scores.shape[1]) if j != i and scores[i, j] == scores[i, i])
        outcomes = [higher + place for place in range(1, tied + 2)]
        for k in ks:
            hits[k].append(sum(r <= k for r in outcomes) / len(outcomes))
        expected_ranks.append(sum(outcomes) / len(outcomes))
        ties += tied > 0
    out = {f'R@{k}': 100 * sum(hits[k]) / len(scores) for k in ks}
    ordered, n = sorted(expected_ranks), len(expected_ranks)
    out['MR'] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    out['ties'] = ties
    return out


def brute_force(scores, ks):
    "R@k and each query's expected rank by enumerating every tie-breaking order of the candidates (N! of them)."
    scores = np.asarray(scores)
    n = len(scores)
    orders = list(itertools.permutations(range(n)))
    hits, ranks = {k: np.zeros(n) for k in ks}, np.zeros(n)
    for priority in orders:
        for i in range(n):
            rank = 1 + sum(
                1
                for j in range(n)
                if scores[i, j] > scores[i, i]
                or (scores[i, j] == scores[i, i] and priority[j] < priority[i])
            )
            ranks[i] += rank / len(orders)
            for k in ks:
                hits[k][i] += (rank <= k) / len(orders)
    return {f'R@{k}': 100 * hits[k].mean() for k in ks}, ranks


def test_recall_is_the_expectation_over_tie_orders():
    scores = torch.tensor(
        [
            [0.5, 0.5, 0.5, 0.1],  # tied with 2 others: rank 1, 2 or 3
            [0.9, 0.2, 0.2, 0.3],  # 0.9 and 0.3 higher, one tie: rank 3 or 4
            [0.1, 0.1, 0.4, 0.4],  # tie with candidate 3: rank 1 or 2
            [0.8, 0.8, 0.8, 0.7],
        ]
    )  # three higher: rank 4
    counts = rank_counts(scores)
    assert (
        counts.higher.tolist() == [0, 2, 0, 3]
        and counts.tied.tolist() == [2, 1, 1, 0]
        and counts.num_tied == 3
    )
    assert retrieval_ranks(scores).tolist() == [2.0, 3.5, 1.5, 4.0]
    metrics = recall_metrics(scores, ks=(1, 2, 3))
    assert math.isclose(metrics['R@1'], 100 * (1 / 3 + 0 + 1 / 2 + 0) / 4)
    assert math.isclose(metrics['R@2'], 100 * (2 / 3 + 0 + 1 + 0) / 4)
    assert math.isclose(metrics['R@3'], 100 * (1 + 1 / 2 + 1 + 0) / 4)
    assert metrics['MR'] == 2.75 and metrics['ties'] == 3  # median of 1.5, 2, 3.5, 4
    expected, ranks = brute_force(scores.numpy(), (1, 2, 3))
    assert np.allclose(ranks, retrieval_ranks(scores).numpy())
    for key in expected:
        assert math.isclose(metrics[key], expected[key]), key
    hits = recall_hits(scores, 1)
    assert torch.allclose(hits, torch.tensor([1 / 3, 0, 1 / 2, 0], dtype=torch.float64))


@pytest.mark.parametrize('n', [1, 2, 7, 50])
def test_constant_matrix_scores_chance(n):
    metrics = recall_metrics(torch.full((n, n), 0.25), ks=(1, 5, 10))
    for k in (1, 5, 10):
        assert math.isclose(metrics[f'R@{k}'], 100 * min(k, n) / n)
    assert metrics['MR'] == (n + 1) / 2 and metrics['ties'] == (n if n > 1 else 0)


@pytest.mark.parametrize('seed', range(4))
def test_partly_tied_matrices_match_brute_force_enumeration(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = (
        torch.randint(0, 3, (6, 6), generator=gen).float() / 3
    )  # three values: ties in most rows
    for matrix in (scores, scores.T):
        expected, ranks = brute_force(matrix.numpy(), (1, 2, 4))
        got = recall_metrics(matrix, ks=(1, 2, 4))
        for key in expected:
            assert math.isclose(got[key], expected[key], abs_tol=1e-9), key
        assert math.isclose(got['MR'], float(np.median(ranks)))


@pytest.mark.parametrize('seed', range(5))
def test_recall_matches_direct_expectation_with_many_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 37
    scores = (
        torch.randint(0, 4, (n, n), generator=gen).float() / 4
    )  # few distinct values: ties everywhere
    for matrix in (scores, scores.T):
        got, expected = recall_metrics(matrix), direct_expectation(matrix.numpy())
        assert got.keys() == expected.keys()
        for key in expected:
            assert math.isclose(got[key], expected[key]), key
        chunked = rank_counts(matrix, chunk_size=5)
        assert torch.equal(chunked.higher, rank_counts(matrix).higher) and torch.equal(
            chunked.tied, rank_counts(matrix).tied
        )


def test_without_ties_nothing_changes():
    scores = torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain_ranks = [1 + int((scores[i] > scores[i, i]).sum()) for i in range(40)]
    metrics = recall_metrics(scores)
    assert metrics['ties'] == 0 and retrieval_ranks(scores).tolist() == plain_ranks
    assert metrics['R@5'] == 100 * sum(r <= 5 for r in plain_ranks) / 40 and metrics['MR'] == float(
        np.median(plain_ranks)
    )


def test_recall_rejects_bad_matrices():
    with pytest.raises(ValueError, match='square'):
        recall_metrics(torch.zeros(3, 4))
    with pytest.raises(ValueError, match='NaN'):
        recall_metrics(torch.tensor([[1.0, float('nan')], [0.0, 1.0]]))


def direct_best_iou(values, targets, k=20):
    values, targets = np.asarray(values, float), np.asarray(targets, bool)
    best = 0.0
    for threshold in np.linspace(values.min(), values.max(), k):
        predicted = values > threshold
        union = np.logical_or(predicted, targets).sum()
        best = max(best, np.logical_and(predicted, targets).sum() / union if union else 0.0)
    return best


def test_best_iou_matches_direct_thresholds():
    rng = np.random.default_rng(0)
    for _ in range(10):
        values, targets = rng.random(200), rng.random(200) < 0.3
        iou, _ = best_iou(torch.tensor(values), torch.tensor(targets))
        assert np.isclose(iou, direct_best_iou(values, targets))
