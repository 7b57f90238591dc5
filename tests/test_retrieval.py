"""Retrieval: every similarity strategy against a loop over pairs, the retrieval table, the
evaluation subsets (recall and ranks: test_metrics.py; embedding: test_embeddings.py)."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from cavmae_sync.data import ClipDataset, ClipSource
from cavmae_sync.retrieval import (
    STRATEGIES,
    similarity,
    retrieval_table,
    class_balanced_subset,
    read_clip_list,
    paper_list_path,
    paper_subset,
    list_subset,
    drawn_subset,
)
from test_metrics import direct_expectation  # R@k and MR by their definition, one query at a time


def loop_similarity(audio, video, strategy):
    out = torch.empty(len(audio), len(video), dtype=torch.float64)
    for i in range(len(audio)):
        for j in range(len(video)):
            if strategy.startswith('diagonal'):
                values = [float(audio[i, t] @ video[j, t]) for t in range(audio.shape[1])]
            else:
                values = [
                    float(audio[i, s] @ video[j, t])
                    for s in range(audio.shape[1])
                    for t in range(video.shape[1])
                ]
            out[i, j] = np.mean(values) if strategy.endswith('mean') else max(values)
    return out


def random_embeddings(n_audio, n_video, frames, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n_audio, frames, dim, generator=gen), dim=-1),
        F.normalize(torch.randn(n_video, frames, dim, generator=gen), dim=-1),
    )


@pytest.mark.parametrize('strategy', STRATEGIES)
@pytest.mark.parametrize('chunk_size', [None, 1, 2, 5])
def test_similarity_matches_loop(strategy, chunk_size):
    audio, video = random_embeddings(9, 7, 5, 12, seed=3)
    expected = loop_similarity(audio.double(), video.double(), strategy).float()
    got = similarity(audio, video, strategy, chunk_size=chunk_size)
    assert got.shape == (9, 7) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_similarity_small_memory_budget_and_half_inputs(strategy):
    audio, video = random_embeddings(6, 6, 4, 8, seed=4)
    expected = loop_similarity(audio.double(), video.double(), strategy).float()
    torch.testing.assert_close(
        similarity(audio, video, strategy, memory_budget=1), expected, rtol=1e-5, atol=1e-6
    )
    half = similarity(
        audio.bfloat16(), video.bfloat16(), strategy
    )  # computed in float32 from bf16 inputs
    assert half.dtype == torch.float32 and torch.allclose(half, expected, atol=2e-2)


def test_mean_and_max_allow_different_frame_counts():
    audio, _ = random_embeddings(4, 4, 3, 8, seed=5)
    _, video = random_embeddings(4, 5, 6, 8, seed=6)
    for strategy in ('mean', 'max'):
        torch.testing.assert_close(
            similarity(audio, video, strategy),
            loop_similarity(audio.double(), video.double(), strategy).float(),
            rtol=1e-5,
            atol=1e-6,
        )
    with pytest.raises(ValueError, match='T=3'):
        similarity(audio, video, 'diagonal_max')


@pytest.mark.parametrize(
    'bad',
    [
        lambda a, v: similarity(a, v, 'median'),
        lambda a, v: similarity(a[0], v),
        lambda a, v: similarity(a, v[..., :4]),
        lambda a, v: similarity(a, v, 'max', chunk_size=0),
    ],
)
def test_similarity_rejects_bad_input(bad):
    audio, video = random_embeddings(3, 3, 2, 8, seed=0)
    with pytest.raises(ValueError):
        bad(audio, video)


def test_retrieval_table_directions_use_rows_and_transpose():
    audio, video = random_embeddings(12, 12, 3, 16, seed=7)
    table = retrieval_table(audio, video, strategies=('diagonal_mean', 'max'))
    assert len(table) == 4 and list(table.columns) == [
        'strategy',
        'direction',
        'R@1',
        'R@5',
        'R@10',
        'MR',
        'ties',
    ]
    for strategy in ('diagonal_mean', 'max'):
        scores = similarity(audio, video, strategy)
        a2v = table[(table.strategy == strategy) & (table.direction == 'audio_to_video')].iloc[0]
        v2a = table[(table.strategy == strategy) & (table.direction == 'video_to_audio')].iloc[0]
        assert (
            a2v['R@5'] == direct_expectation(scores.numpy())['R@5']
            and v2a['MR'] == direct_expectation(scores.T.numpy())['MR']
        )


def test_class_balanced_subset():
    labels = np.repeat(np.arange(309), 7)  # VGGSound-like: 309 classes
    subset = class_balanced_subset(labels, per_class=5)
    assert len(subset) == 1545 and (np.bincount(labels[subset]) == 5).all()
    assert np.array_equal(subset, class_balanced_subset(labels, per_class=5))  # reproducible
    assert np.array_equal(subset, class_balanced_subset(np.eye(309)[labels], per_class=5))
    multi = np.zeros((6, 2))
    multi[:, 0] = 1
    multi[:3, 1] = 1  # multi-label: no clip taken twice
    picked = class_balanced_subset(multi, per_class=2, seed=1)
    assert len(picked) == 4 and len(set(picked.tolist())) == 4
    with pytest.raises(ValueError, match='fewer than 8'):
        class_balanced_subset(labels, per_class=8)
    assert len(class_balanced_subset(labels, per_class=8, strict=False)) == 309 * 7


def test_paper_subset_and_user_lists(tmp_path):
    listed = read_clip_list(paper_list_path())
    table = pd.read_csv(paper_list_path(), dtype=str)
    labels = pd.read_csv(paper_list_path('vggsound_class_labels_indices.csv'))
    assert len(listed) == len(set(listed)) == 1545 and (table['labels'].value_counts() == 5).all()
    assert set(table['labels']) == set(labels['mid']) and len(labels) == 309
    copy = listed[::-1][:1520] + ['someone_elses_clip_000001']  # the user's copy lacks 25 clips
    chosen = paper_subset(copy)
    assert (
        len(chosen) == 1520
        and chosen.listed == 1545
        and len(chosen.missing) == 25
        and chosen.is_papers_subset
    )
    assert chosen.missing == [v for v in listed if v not in set(copy)]  # in list order
    assert (
        [copy[i] for i in chosen.indices]
        == chosen.video_ids
        == [v for v in listed if v in set(copy)]
    )
    assert (
        '1520 of the 1545 clips of the paper list' in chosen.summary()
        and '25 listed clips are missing' in chosen.summary()
    )
    (tmp_path / 'as.txt').write_text('# my AudioSet list\nx1\nx3\n')
    mine = list_subset(tmp_path / 'as.txt', ['x0', 'x1', 'x2', 'x3'])
    assert (
        mine.indices.tolist() == [1, 3] and not mine.is_papers_subset and mine.source == 'user list'
    )
    drawn = drawn_subset(np.eye(3)[[0, 1, 2, 0, 1, 2]], [f'x{i}' for i in range(6)], per_class=1)
    assert (
        len(drawn) == 3
        and drawn.source == 'drawn'
        and not drawn.is_papers_subset
        and "NOT the paper's subset" in drawn.summary()
    )
    with pytest.raises(ValueError, match='none of the'):
        paper_subset(['unrelated'])
    (tmp_path / 'bad.csv').write_text('id\nx1\n')
    with pytest.raises(ValueError, match='video_id column'):
        read_clip_list(tmp_path / 'bad.csv')
    (tmp_path / 'twice.txt').write_text('x1\nx1\n')
    with pytest.raises(ValueError, match='repeated'):
        read_clip_list(tmp_path / 'twice.txt')
    with pytest.raises(FileNotFoundError, match='nowhere.csv'):
        read_clip_list(tmp_path / 'nowhere.csv')


def test_evaluation_subset_chooses_the_papers_list_a_user_list_or_a_labelled_draw(tmp_path):
    from cavmae_sync.retrieval import evaluation_subset

    listed = read_clip_list(paper_list_path())
    labels = F.one_hot(torch.arange(20) % 4, 4)
    data = ClipDataset(
        [
            ClipSource(v, video=tmp_path / f'{v}.mp4', labels=labels[k])
            for k, v in enumerate(listed[:19] + ['extra'])
        ],
        mode='eval',
    )
    vgg = evaluation_subset(
        Subset(data, list(range(1, 20))), 'vggsound'
    )  # through a Subset: positions in it
    assert (
        vgg.is_papers_subset
        and len(vgg) == 18
        and vgg.video_ids == listed[1:19]
        and vgg.indices.tolist() == list(range(18))
    )
    assert len(vgg.missing) == 1545 - 18
    (tmp_path / 'as.csv').write_text('video_id\nextra\n' + listed[0] + '\n')
    mine = evaluation_subset(data, 'audioset', list_file=tmp_path / 'as.csv')
    assert mine.video_ids == ['extra', listed[0]] and not mine.is_papers_subset
    drawn = evaluation_subset(data, 'audioset', per_class=2, seed=1)
    assert (
        drawn.source == 'drawn' and len(drawn) == 8 and "NOT the paper's subset" in drawn.summary()
    )
    unlabelled = ClipDataset([ClipSource('a', video=tmp_path / 'a.mp4')], mode='eval')
    with pytest.raises(ValueError, match='labels'):
        evaluation_subset(unlabelled, 'audioset')
