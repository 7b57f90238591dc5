"Retrieval: every similarity strategy against a loop over pairs, recall against a direct count (ties included)."
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cavmae_sync.retrieval import (STRATEGIES, similarity, retrieval_ranks, recall_metrics, retrieval_table,
                                   class_balanced_subset, rank_counts, recall_hits)


def loop_similarity(audio, video, strategy):
    out = torch.empty(len(audio), len(video), dtype=torch.float64)
    for i in range(len(audio)):
        for j in range(len(video)):
            if strategy.startswith('diagonal'):
                values = [float(audio[i, t] @ video[j, t]) for t in range(audio.shape[1])]
            else:
                values = [float(audio[i, s] @ video[j, t]) for s in range(audio.shape[1]) for t in range(video.shape[1])]
            out[i, j] = np.mean(values) if strategy.endswith('mean') else max(values)
    return out


def random_embeddings(n_audio, n_video, frames, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n_audio, frames, dim, generator=gen), dim=-1),
            F.normalize(torch.randn(n_video, frames, dim, generator=gen), dim=-1))


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
    torch.testing.assert_close(similarity(audio, video, strategy, memory_budget=1), expected, rtol=1e-5, atol=1e-6)
    half = similarity(audio.bfloat16(), video.bfloat16(), strategy)        # computed in float32 from bf16 inputs
    assert half.dtype == torch.float32 and torch.allclose(half, expected, atol=2e-2)


def test_mean_and_max_allow_different_frame_counts():
    audio, _ = random_embeddings(4, 4, 3, 8, seed=5)
    _, video = random_embeddings(4, 5, 6, 8, seed=6)
    for strategy in ('mean', 'max'):
        torch.testing.assert_close(similarity(audio, video, strategy), loop_similarity(audio.double(), video.double(), strategy).float(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='T=3'):
        similarity(audio, video, 'diagonal_max')


@pytest.mark.parametrize('bad', [
    lambda a, v: similarity(a, v, 'median'),
    lambda a, v: similarity(a[0], v),
    lambda a, v: similarity(a, v[..., :4]),
    lambda a, v: similarity(a, v, 'max', chunk_size=0),
])
def test_similarity_rejects_bad_input(bad):
    audio, video = random_embeddings(3, 3, 2, 8, seed=0)
    with pytest.raises(ValueError):
        bad(audio, video)


def direct_expectation(scores, ks=(1, 5, 10)):
    """R@k and MR straight from the definition, one query at a time: the true match is equally likely to stand at
    each place of its tie group (positions h+1 .. h+e+1), so each place is one outcome of probability 1 / (e + 1)."""
    scores = np.asarray(scores)
    hits, expected_ranks, ties = {k: [] for k in ks}, [], 0
    for i in range(len(scores)):
        higher = sum(1 for j in range(scores.shape[1]) if scores[i, j] > scores[i, i])
        tied = sum(1 for j in range(scores.shape[1]) if j != i and scores[i, j] == scores[i, i])
        outcomes = [higher + place for place in range(1, tied + 2)]
        for k in ks: hits[k].append(sum(r <= k for r in outcomes) / len(outcomes))
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
            rank = 1 + sum(1 for j in range(n) if scores[i, j] > scores[i, i] or (scores[i, j] == scores[i, i] and priority[j] < priority[i]))
            ranks[i] += rank / len(orders)
            for k in ks: hits[k][i] += (rank <= k) / len(orders)
    return {f'R@{k}': 100 * hits[k].mean() for k in ks}, ranks


def test_recall_is_the_expectation_over_tie_orders():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1],     # tied with 2 others: rank 1, 2 or 3
                           [0.9, 0.2, 0.2, 0.3],     # 0.9 and 0.3 higher, one tie: rank 3 or 4
                           [0.1, 0.1, 0.4, 0.4],     # tie with candidate 3: rank 1 or 2
                           [0.8, 0.8, 0.8, 0.7]])    # three higher: rank 4
    counts = rank_counts(scores)
    assert counts.higher.tolist() == [0, 2, 0, 3] and counts.tied.tolist() == [2, 1, 1, 0] and counts.num_tied == 3
    assert retrieval_ranks(scores).tolist() == [2.0, 3.5, 1.5, 4.0]
    metrics = recall_metrics(scores, ks=(1, 2, 3))
    assert math.isclose(metrics['R@1'], 100 * (1 / 3 + 0 + 1 / 2 + 0) / 4)
    assert math.isclose(metrics['R@2'], 100 * (2 / 3 + 0 + 1 + 0) / 4)
    assert math.isclose(metrics['R@3'], 100 * (1 + 1 / 2 + 1 + 0) / 4)
    assert metrics['MR'] == 2.75 and metrics['ties'] == 3           # median of 1.5, 2, 3.5, 4
    expected, ranks = brute_force(scores.numpy(), (1, 2, 3))
    assert np.allclose(ranks, retrieval_ranks(scores).numpy())
    for key in expected: assert math.isclose(metrics[key], expected[key]), key
    hits = recall_hits(scores, 1)
    assert torch.allclose(hits, torch.tensor([1 / 3, 0, 1 / 2, 0], dtype=torch.float64))


@pytest.mark.parametrize('n', [1, 2, 7, 50])
def test_constant_matrix_scores_chance(n):
    metrics = recall_metrics(torch.full((n, n), 0.25), ks=(1, 5, 10))
    for k in (1, 5, 10): assert math.isclose(metrics[f'R@{k}'], 100 * min(k, n) / n)
    assert metrics['MR'] == (n + 1) / 2 and metrics['ties'] == (n if n > 1 else 0)


@pytest.mark.parametrize('seed', range(4))
def test_partly_tied_matrices_match_brute_force_enumeration(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = (torch.randint(0, 3, (6, 6), generator=gen).float() / 3)     # three values: ties in most rows
    for matrix in (scores, scores.T):
        expected, ranks = brute_force(matrix.numpy(), (1, 2, 4))
        got = recall_metrics(matrix, ks=(1, 2, 4))
        for key in expected: assert math.isclose(got[key], expected[key], abs_tol=1e-9), key
        assert math.isclose(got['MR'], float(np.median(ranks)))


@pytest.mark.parametrize('seed', range(5))
def test_recall_matches_direct_expectation_with_many_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 37
    scores = torch.randint(0, 4, (n, n), generator=gen).float() / 4     # few distinct values: ties everywhere
    for matrix in (scores, scores.T):
        got, expected = recall_metrics(matrix), direct_expectation(matrix.numpy())
        assert got.keys() == expected.keys()
        for key in expected: assert math.isclose(got[key], expected[key]), key
        chunked = rank_counts(matrix, chunk_size=5)
        assert torch.equal(chunked.higher, rank_counts(matrix).higher) and torch.equal(chunked.tied, rank_counts(matrix).tied)


def test_without_ties_nothing_changes():
    scores = torch.randn(40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain_ranks = [1 + int((scores[i] > scores[i, i]).sum()) for i in range(40)]
    metrics = recall_metrics(scores)
    assert metrics['ties'] == 0 and retrieval_ranks(scores).tolist() == plain_ranks
    assert metrics['R@5'] == 100 * sum(r <= 5 for r in plain_ranks) / 40 and metrics['MR'] == float(np.median(plain_ranks))


def test_recall_rejects_bad_matrices():
    with pytest.raises(ValueError, match='square'):
        recall_metrics(torch.zeros(3, 4))
    with pytest.raises(ValueError, match='NaN'):
        recall_metrics(torch.tensor([[1.0, float('nan')], [0.0, 1.0]]))


def test_retrieval_table_directions_use_rows_and_transpose():
    audio, video = random_embeddings(12, 12, 3, 16, seed=7)
    table = retrieval_table(audio, video, strategies=('diagonal_mean', 'max'))
    assert len(table) == 4 and list(table.columns) == ['strategy', 'direction', 'R@1', 'R@5', 'R@10', 'MR', 'ties']
    for strategy in ('diagonal_mean', 'max'):
        scores = similarity(audio, video, strategy)
        a2v = table[(table.strategy == strategy) & (table.direction == 'audio_to_video')].iloc[0]
        v2a = table[(table.strategy == strategy) & (table.direction == 'video_to_audio')].iloc[0]
        assert a2v['R@5'] == direct_expectation(scores.numpy())['R@5'] and v2a['MR'] == direct_expectation(scores.T.numpy())['MR']


def test_class_balanced_subset():
    labels = np.repeat(np.arange(309), 7)                  # VGGSound-like: 309 classes
    subset = class_balanced_subset(labels, per_class=5)
    assert len(subset) == 1545 and (np.bincount(labels[subset]) == 5).all()
    assert np.array_equal(subset, class_balanced_subset(labels, per_class=5))          # reproducible
    assert np.array_equal(subset, class_balanced_subset(np.eye(309)[labels], per_class=5))
    multi = np.zeros((6, 2)); multi[:, 0] = 1; multi[:3, 1] = 1                     # multi-label: no clip taken twice
    picked = class_balanced_subset(multi, per_class=2, seed=1)
    assert len(picked) == 4 and len(set(picked.tolist())) == 4
    with pytest.raises(ValueError, match='fewer than 8'):
        class_balanced_subset(labels, per_class=8)
    assert len(class_balanced_subset(labels, per_class=8, strict=False)) == 309 * 7


# ---- embedding a data set ----

from torch.utils.data import Dataset, Subset

import os

import pandas as pd

from cavmae_sync.data import ClipDataset, ClipSource
from cavmae_sync.retrieval import (embed_dataset, ClipEmbeddings, clip_ids, dataset_fingerprint, model_fingerprint,
                                   embed_video, model_preprocess_config, media_fingerprint, precision_tag, evaluation_autocast,
                                   read_clip_list, paper_list_path, paper_subset, list_subset, drawn_subset)


class CountingClips(Dataset):
    "Random eval items; counts loads, can fail at one position (an interruption) or return None (a skipped file)."
    def __init__(self, config, n=5, frames=3, fail_at=None, missing=()):
        self.config, self.n, self.frames, self.fail_at, self.missing, self.loads = config, n, frames, fail_at, set(missing), []
        self.video_ids = [f'v{i}' for i in range(n)]
    def __len__(self): return self.n
    def __getitem__(self, i):
        self.loads.append(i)
        if i == self.fail_at: raise RuntimeError('interrupted')
        if i in self.missing: return None
        c, gen = self.config, torch.Generator().manual_seed(i)
        return {'audio': torch.randn(self.frames, c.audio_length, c.num_mel_bins, generator=gen),
                'frames': torch.randn(self.frames, 3, c.image_size, c.image_size, generator=gen), 'index': i}


@pytest.fixture(scope='module')
def tiny_model():
    from cavmae_sync.model import CAVMAESync, tiny
    torch.manual_seed(0)
    return CAVMAESync(tiny(num_frames=3))


def test_embed_dataset_matches_per_clip_encoding(tiny_model):
    data = CountingClips(tiny_model.config)
    tiny_model.train()
    embeddings = embed_dataset(tiny_model, data, batch_size=2, progress=False)
    assert tiny_model.training                                             # mode restored
    assert embeddings.audio.shape == (5, 3, tiny_model.config.embed_dim) and embeddings.video_ids == data.video_ids
    assert sorted(data.loads) == list(range(5))                            # each clip decoded once
    item = data[4]
    with torch.no_grad():
        out = tiny_model.eval().encode(item['audio'], item['frames'])
    tiny_model.train()
    torch.testing.assert_close(embeddings.audio[4], F.normalize(out.audio_embedding, dim=-1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embeddings.video[4], F.normalize(out.video_embedding, dim=-1), rtol=1e-4, atol=1e-5)


def test_embed_dataset_cache_reuse_and_mismatch(tiny_model, tmp_path):
    from cavmae_sync.model import CAVMAESync
    cache = tmp_path / 'emb.pt'
    first = embed_dataset(tiny_model, CountingClips(tiny_model.config), cache_path=cache, progress=False)
    data = CountingClips(tiny_model.config)
    again = embed_dataset(tiny_model, data, cache_path=cache, progress=False)
    assert data.loads == [] and torch.equal(again.audio, first.audio)            # read from the file, nothing decoded
    assert list(tmp_path.iterdir()) == [cache]                                   # no temporary or partial files left
    other = CAVMAESync(tiny_model.config)
    with pytest.raises(ValueError, match='another model or data set'):
        embed_dataset(other, CountingClips(tiny_model.config), cache_path=cache, progress=False)
    with pytest.raises(ValueError, match='another model or data set'):
        embed_dataset(tiny_model, CountingClips(tiny_model.config, n=4), cache_path=cache, progress=False)
    redone = embed_dataset(other, CountingClips(tiny_model.config), cache_path=cache, overwrite=True, progress=False)
    assert not torch.equal(redone.audio, first.audio) and ClipEmbeddings.load(cache).fingerprint == redone.fingerprint


def test_embed_dataset_resumes_after_interruption(tiny_model, tmp_path):
    cache = tmp_path / 'emb.pt'
    failing = CountingClips(tiny_model.config, n=6, fail_at=4)
    with pytest.raises(RuntimeError, match='interrupted'):
        embed_dataset(tiny_model, failing, batch_size=1, save_every=1, cache_path=cache, progress=False)
    assert not cache.exists() and (tmp_path / 'emb.pt.partial').exists()
    resumed_data = CountingClips(tiny_model.config, n=6)
    resumed = embed_dataset(tiny_model, resumed_data, batch_size=1, save_every=1, cache_path=cache, progress=False)
    assert min(resumed_data.loads) == 4                                     # clips 0-3 came from the partial file
    fresh = embed_dataset(tiny_model, CountingClips(tiny_model.config, n=6), batch_size=3, progress=False)
    torch.testing.assert_close(resumed.audio, fresh.audio, rtol=1e-4, atol=1e-5)
    assert resumed.video_ids == fresh.video_ids and not (tmp_path / 'emb.pt.partial').exists()


def test_embed_dataset_reports_skipped_clips(tiny_model):
    data = CountingClips(tiny_model.config, missing={1, 3})
    with pytest.warns(UserWarning, match='2 clips could not be loaded'):
        embeddings = embed_dataset(tiny_model, data, batch_size=2, progress=False)
    assert len(embeddings) == 3 and embeddings.skipped == [1, 3] and embeddings.video_ids == ['v0', 'v2', 'v4']
    with pytest.raises(ValueError, match='no clip'):
        embed_dataset(tiny_model, CountingClips(tiny_model.config, n=2, missing={0, 1}), progress=False)


def test_fingerprints_and_ids(tiny_model):
    data = CountingClips(tiny_model.config)
    assert clip_ids(Subset(data, [3, 1])) == ['v3', 'v1']
    assert dataset_fingerprint(Subset(data, [3, 1])) != dataset_fingerprint(Subset(data, [1, 3]))
    assert model_fingerprint(tiny_model) == model_fingerprint(tiny_model)


@pytest.mark.parametrize('seed', range(3))
def test_model_fingerprint_covers_every_element(tiny_model, seed):
    "Any one element of any tensor, e.g. a random index of the largest one (which a strided sample would miss)."
    before = model_fingerprint(tiny_model)
    gen = torch.Generator().manual_seed(seed)
    state = tiny_model.state_dict()
    names = sorted(state, key=lambda name: -state[name].numel())
    for name in (names[0], names[int(torch.randint(len(names), (1,), generator=gen))]):
        flat = state[name].view(-1)
        if not flat.is_floating_point(): continue
        index = int(torch.randint(flat.numel(), (1,), generator=gen))
        original = flat[index].clone()
        with torch.no_grad():
            flat[index] = original + (1e-6 if original.abs() < 1 else original.abs() * 1e-6)   # the smallest kind of change
            assert model_fingerprint(tiny_model) != before, f'{name}[{index}] does not change the fingerprint'
            flat[index] = original
    assert model_fingerprint(tiny_model) == before


class FileClips(ClipDataset):
    "Clips backed by real files on disk; the items are random tensors (nothing is decoded)."
    def __init__(self, config, sources):
        super().__init__(sources, mode='eval')
        self.random = CountingClips(config, n=len(sources))
    def __getitem__(self, i): return self.random[i] | {'video_id': self.sources[i].video_id}


def test_replacing_media_invalidates_the_cache(tiny_model, tmp_path):
    media = tmp_path / 'media'
    media.mkdir()
    for i in range(3): (media / f'c{i}.mp4').write_bytes(bytes([i]) * 1000)
    sources = [ClipSource(f'c{i}', video=media / f'c{i}.mp4') for i in range(3)]
    cache = tmp_path / 'emb.pt'
    first = embed_dataset(tiny_model, FileClips(tiny_model.config, sources), cache_path=cache, progress=False)
    again = FileClips(tiny_model.config, sources)
    assert torch.equal(embed_dataset(tiny_model, again, cache_path=cache, progress=False).audio, first.audio)
    assert again.random.loads == []                                          # unchanged media: served from the cache
    (media / 'c1.mp4').write_bytes(b'a different video')                     # replaced under the same name
    with pytest.raises(ValueError, match='replaced since'):
        embed_dataset(tiny_model, FileClips(tiny_model.config, sources), cache_path=cache, progress=False)
    redone = FileClips(tiny_model.config, sources)
    embed_dataset(tiny_model, redone, cache_path=cache, overwrite=True, progress=False)
    assert sorted(redone.random.loads) == [0, 1, 2]
    before = dataset_fingerprint(FileClips(tiny_model.config, sources))
    info = os.stat(media / 'c2.mp4')                                         # same size, new content, later mtime
    (media / 'c2.mp4').write_bytes(bytes([9]) * 1000)
    os.utime(media / 'c2.mp4', ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    assert dataset_fingerprint(FileClips(tiny_model.config, sources)) != before
    (media / 'c0.mp4').unlink()                                               # a missing file changes it too
    assert dataset_fingerprint(FileClips(tiny_model.config, sources)) not in (before, dataset_fingerprint(FileClips(tiny_model.config, sources[1:])))


def test_media_fingerprint_of_the_extracted_layout_and_subsets(tmp_path):
    root = tmp_path / 'frames'
    for t in range(3):
        (root / f'frame_{t}').mkdir(parents=True)
        for clip in ('a', 'b'): (root / f'frame_{t}' / f'{clip}.jpg').write_bytes(b'jpg' + bytes([t]))
    wavs = [tmp_path / f'{clip}.wav' for clip in ('a', 'b')]
    for wav in wavs: wav.write_bytes(b'RIFF')
    data = ClipDataset([ClipSource(clip, frame_root=root, audio=wav) for clip, wav in zip(('a', 'b'), wavs)], mode='eval')
    whole, only_b = media_fingerprint(data), media_fingerprint(Subset(data, [1]))
    (root / 'frame_1' / 'a.jpg').write_bytes(b'a new frame 1')                # a frame of clip a replaced
    assert media_fingerprint(data) != whole and media_fingerprint(Subset(data, [1])) == only_b
    (root / 'frame_3').mkdir()                                                # a frame folder more (re-extraction)
    (root / 'frame_3' / 'b.jpg').write_bytes(b'jpg')
    assert media_fingerprint(Subset(data, [1])) != only_b
    assert media_fingerprint(CountingClips(tiny_config(), n=2)) is None       # no files behind it: ids and config only


def tiny_config():
    from cavmae_sync.model import tiny
    return tiny(num_frames=3)


def test_model_fingerprint_time_on_a_vit_b_sized_state_dict():
    "The cost of hashing every weight: a ViT-B-sized state dict (about 86M float32 values, 344 MB)."
    import time
    class Weights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(768, 768 * 12)) for _ in range(12)])
            self.extra = torch.nn.Parameter(torch.zeros(1000, 768))
    model = Weights()
    start = time.perf_counter()
    key = model_fingerprint(model)
    seconds = time.perf_counter() - start
    print(f'model_fingerprint of {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M values: {seconds:.2f} s')
    assert len(key) == 16 and seconds < 30


def test_evaluation_precision_options(tiny_model):
    assert precision_tag('cpu', 'fp16') == precision_tag('cpu', 'bf16') == ''      # CPU: always fp32
    assert precision_tag('cuda', 'fp16') == '-cuda-fp16' and precision_tag('cuda', 'bf16') == '-cuda-bf16'
    with pytest.raises(ValueError, match='precision must be one of'):
        precision_tag('cpu', 'float8')
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*CUDA is not available.*')      # a CPU-only machine disables CUDA autocast
        context = evaluation_autocast('cuda', 'fp16')
        assert context.fast_dtype == torch.float16 and (context._enabled is True or not torch.cuda.is_available())
        assert evaluation_autocast('cuda', 'bf16').fast_dtype == torch.bfloat16
    assert not evaluation_autocast('cpu', 'fp16')._enabled and not evaluation_autocast('cuda', 'fp32')._enabled
    data = CountingClips(tiny_model.config, n=2)
    fp32 = embed_dataset(tiny_model, data, progress=False)
    assert torch.equal(embed_dataset(tiny_model, data, progress=False, precision='bf16').audio, fp32.audio)   # CPU unchanged
    with pytest.raises(ValueError, match='precision'):
        embed_dataset(tiny_model, data, progress=False, precision='half')


def test_paper_subset_and_user_lists(tmp_path):
    listed = read_clip_list(paper_list_path())
    table = pd.read_csv(paper_list_path(), dtype=str)
    labels = pd.read_csv(paper_list_path('vggsound_class_labels_indices.csv'))
    assert len(listed) == len(set(listed)) == 1545 and (table['labels'].value_counts() == 5).all()
    assert set(table['labels']) == set(labels['mid']) and len(labels) == 309
    copy = listed[::-1][:1520] + ['someone_elses_clip_000001']                # the user's copy lacks 25 clips
    chosen = paper_subset(copy)
    assert len(chosen) == 1520 and chosen.listed == 1545 and len(chosen.missing) == 25 and chosen.is_papers_subset
    assert chosen.missing == [v for v in listed if v not in set(copy)]        # in list order
    assert [copy[i] for i in chosen.indices] == chosen.video_ids == [v for v in listed if v in set(copy)]
    assert '1520 of the 1545 clips of the paper list' in chosen.summary() and '25 listed clips are missing' in chosen.summary()
    (tmp_path / 'as.txt').write_text('# my AudioSet list\nx1\nx3\n')
    mine = list_subset(tmp_path / 'as.txt', ['x0', 'x1', 'x2', 'x3'])
    assert mine.indices.tolist() == [1, 3] and not mine.is_papers_subset and mine.source == 'user list'
    drawn = drawn_subset(np.eye(3)[[0, 1, 2, 0, 1, 2]], [f'x{i}' for i in range(6)], per_class=1)
    assert len(drawn) == 3 and drawn.source == 'drawn' and not drawn.is_papers_subset and "NOT the paper's subset" in drawn.summary()
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


def test_clip_embeddings_subset_and_table(tiny_model, tmp_path):
    embeddings = embed_dataset(tiny_model, CountingClips(tiny_model.config, n=4), progress=False)
    part = embeddings.subset([2, 0])
    assert part.video_ids == ['v2', 'v0'] and torch.equal(part.audio[1], embeddings.audio[0])
    assert len(embeddings.table(('mean',))) == 2
    embeddings.save(tmp_path / 'e.pt')
    assert torch.equal(ClipEmbeddings.load(tmp_path / 'e.pt').video, embeddings.video)
    torch.save({'something': 1}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='not a ClipEmbeddings'):
        ClipEmbeddings.load(tmp_path / 'other.pt')


def test_embed_video_real_clip(media_dir):
    from cavmae_sync.model import CAVMAESync, tiny
    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=4))
    path = media_dir / '00W1lcxW-WU_40.000.mp4'
    result = embed_video(path, model)
    assert result.audio.shape == result.video.shape == (4, model.config.embed_dim)
    torch.testing.assert_close(result.audio.norm(dim=-1), torch.ones(4))
    assert result.frame_times is not None and len(result.frame_times) == 4 and result.path == str(path)
    config = model_preprocess_config(model)
    assert (config.num_frames, config.window, config.image_size) == (4, model.config.audio_length, model.config.image_size)


def test_evaluation_subset_chooses_the_papers_list_a_user_list_or_a_labelled_draw(tmp_path):
    from cavmae_sync.retrieval import evaluation_subset
    listed = read_clip_list(paper_list_path())
    labels = F.one_hot(torch.arange(20) % 4, 4)
    data = ClipDataset([ClipSource(v, video=tmp_path / f'{v}.mp4', labels=labels[k]) for k, v in enumerate(listed[:19] + ['extra'])], mode='eval')
    vgg = evaluation_subset(Subset(data, list(range(1, 20))), 'vggsound')                 # through a Subset: positions in it
    assert vgg.is_papers_subset and len(vgg) == 18 and vgg.video_ids == listed[1:19] and vgg.indices.tolist() == list(range(18))
    assert len(vgg.missing) == 1545 - 18
    (tmp_path / 'as.csv').write_text('video_id\nextra\n' + listed[0] + '\n')
    mine = evaluation_subset(data, 'audioset', list_file=tmp_path / 'as.csv')
    assert mine.video_ids == ['extra', listed[0]] and not mine.is_papers_subset
    drawn = evaluation_subset(data, 'audioset', per_class=2, seed=1)
    assert drawn.source == 'drawn' and len(drawn) == 8 and "NOT the paper's subset" in drawn.summary()
    unlabelled = ClipDataset([ClipSource('a', video=tmp_path / 'a.mp4')], mode='eval')
    with pytest.raises(ValueError, match='labels'):
        evaluation_subset(unlabelled, 'audioset')
