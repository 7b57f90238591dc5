"Retrieval: every similarity strategy against a loop over pairs, recall against a direct count (ties included)."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cavmae_sync.retrieval import (STRATEGIES, similarity, retrieval_ranks, recall_metrics, retrieval_table,
                                   class_balanced_subset)


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


def direct_ranks(scores):
    "Rank by counting, one query at a time: 1 + candidates with a strictly higher score."
    scores = np.asarray(scores)
    return [1 + sum(1 for j in range(scores.shape[1]) if scores[i, j] > scores[i, i]) for i in range(len(scores))]


def direct_recall(scores, ks=(1, 5, 10)):
    ranks = direct_ranks(scores)
    out = {f'R@{k}': 100 * sum(r <= k for r in ranks) / len(ranks) for k in ks}
    ordered = sorted(ranks)
    n = len(ordered)
    out['MR'] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return out


def test_recall_counts_ties_in_the_query_favour():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1],     # all tied with the true match -> rank 1
                           [0.9, 0.2, 0.2, 0.3],     # 0.9 and 0.3 higher, 0.2 tied -> rank 3
                           [0.1, 0.1, 0.4, 0.4],     # tie with candidate 3 -> rank 1
                           [0.8, 0.8, 0.8, 0.7]])    # three higher -> rank 4
    assert retrieval_ranks(scores).tolist() == [1, 3, 1, 4] == direct_ranks(scores)
    metrics = recall_metrics(scores, ks=(1, 2, 3))
    assert metrics['R@1'] == 50 and metrics['R@2'] == 50 and metrics['R@3'] == 75
    assert metrics['MR'] == 2.0                        # median of 1, 1, 3, 4
    assert retrieval_ranks(scores.T).tolist() == direct_ranks(scores.T.numpy())


@pytest.mark.parametrize('seed', range(5))
def test_recall_matches_direct_count_with_many_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 37
    scores = torch.randint(0, 4, (n, n), generator=gen).float() / 4     # few distinct values: ties everywhere
    for matrix in (scores, scores.T):
        got, expected = recall_metrics(matrix), direct_recall(matrix.numpy())
        assert got.keys() == expected.keys()
        for key in expected: assert math.isclose(got[key], expected[key]), key


def test_recall_rejects_bad_matrices():
    with pytest.raises(ValueError, match='square'):
        recall_metrics(torch.zeros(3, 4))
    with pytest.raises(ValueError, match='NaN'):
        recall_metrics(torch.tensor([[1.0, float('nan')], [0.0, 1.0]]))


def test_retrieval_table_directions_use_rows_and_transpose():
    audio, video = random_embeddings(12, 12, 3, 16, seed=7)
    table = retrieval_table(audio, video, strategies=('diagonal_mean', 'max'))
    assert len(table) == 4 and list(table.columns) == ['strategy', 'direction', 'R@1', 'R@5', 'R@10', 'MR']
    for strategy in ('diagonal_mean', 'max'):
        scores = similarity(audio, video, strategy)
        a2v = table[(table.strategy == strategy) & (table.direction == 'audio_to_video')].iloc[0]
        v2a = table[(table.strategy == strategy) & (table.direction == 'video_to_audio')].iloc[0]
        assert a2v['R@5'] == direct_recall(scores.numpy())['R@5'] and v2a['MR'] == direct_recall(scores.T.numpy())['MR']


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

from cavmae_sync.retrieval import (embed_dataset, ClipEmbeddings, clip_ids, dataset_fingerprint, model_fingerprint,
                                   embed_video, model_preprocess_config)


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
    before = model_fingerprint(tiny_model)
    with torch.no_grad():
        tiny_model.patch_embed_a.proj.weight[0, 0, 0, 0] += 1                 # the first sampled value
    assert model_fingerprint(tiny_model) != before
    with torch.no_grad():
        tiny_model.patch_embed_a.proj.weight[0, 0, 0, 0] -= 1


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
