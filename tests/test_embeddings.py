"""Embeddings: a data set through the encoder against per-clip encoding, the cache and its
fingerprints (model, data, media, precision), resuming, one video."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from cavmae_sync.data import ClipDataset, ClipSource
from cavmae_sync.embeddings import (
    embed_dataset,
    ClipEmbeddings,
    clip_ids,
    dataset_fingerprint,
    model_fingerprint,
    embed_video,
    model_preprocess_config,
    media_fingerprint,
    precision_tag,
    evaluation_autocast,
)


class CountingClips(Dataset):
    "Random eval items; counts loads, can fail at one position (an interruption) or return None (a skipped file)."

    def __init__(self, config, n=5, frames=3, fail_at=None, missing=()):
        self.config, self.n, self.frames, self.fail_at, self.missing, self.loads = (
            config,
            n,
            frames,
            fail_at,
            set(missing),
            [],
        )
        self.video_ids = [f'v{i}' for i in range(n)]

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loads.append(i)
        if i == self.fail_at:
            raise RuntimeError('interrupted')
        if i in self.missing:
            return None
        c, gen = self.config, torch.Generator().manual_seed(i)
        return {
            'audio': torch.randn(self.frames, c.audio_length, c.num_mel_bins, generator=gen),
            'frames': torch.randn(self.frames, 3, c.image_size, c.image_size, generator=gen),
            'index': i,
        }


@pytest.fixture(scope='module')
def tiny_model():
    from cavmae_sync.model import CAVMAESync, tiny

    torch.manual_seed(0)
    return CAVMAESync(tiny(num_frames=3))


def test_embed_dataset_matches_per_clip_encoding(tiny_model):
    data = CountingClips(tiny_model.config)
    tiny_model.train()
    embeddings = embed_dataset(tiny_model, data, batch_size=2, progress=False)
    assert tiny_model.training  # mode restored
    assert (
        embeddings.audio.shape == (5, 3, tiny_model.config.embed_dim)
        and embeddings.video_ids == data.video_ids
    )
    assert sorted(data.loads) == list(range(5))  # each clip decoded once
    item = data[4]
    with torch.no_grad():
        out = tiny_model.eval().encode(item['audio'], item['frames'])
    tiny_model.train()
    torch.testing.assert_close(
        embeddings.audio[4], F.normalize(out.audio_embedding, dim=-1), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        embeddings.video[4], F.normalize(out.video_embedding, dim=-1), rtol=1e-4, atol=1e-5
    )


def test_embed_dataset_cache_reuse_and_mismatch(tiny_model, tmp_path):
    from cavmae_sync.model import CAVMAESync

    cache = tmp_path / 'emb.pt'
    first = embed_dataset(
        tiny_model, CountingClips(tiny_model.config), cache_path=cache, progress=False
    )
    data = CountingClips(tiny_model.config)
    again = embed_dataset(tiny_model, data, cache_path=cache, progress=False)
    assert data.loads == [] and torch.equal(
        again.audio, first.audio
    )  # read from the file, nothing decoded
    assert list(tmp_path.iterdir()) == [cache]  # no temporary or partial files left
    other = CAVMAESync(tiny_model.config)
    with pytest.raises(ValueError, match='another model or data set'):
        embed_dataset(other, CountingClips(tiny_model.config), cache_path=cache, progress=False)
    with pytest.raises(ValueError, match='another model or data set'):
        embed_dataset(
            tiny_model, CountingClips(tiny_model.config, n=4), cache_path=cache, progress=False
        )
    redone = embed_dataset(
        other, CountingClips(tiny_model.config), cache_path=cache, overwrite=True, progress=False
    )
    assert (
        not torch.equal(redone.audio, first.audio)
        and ClipEmbeddings.load(cache).fingerprint == redone.fingerprint
    )


def test_embed_dataset_resumes_after_interruption(tiny_model, tmp_path):
    cache = tmp_path / 'emb.pt'
    failing = CountingClips(tiny_model.config, n=6, fail_at=4)
    with pytest.raises(RuntimeError, match='interrupted'):
        embed_dataset(
            tiny_model, failing, batch_size=1, save_every=1, cache_path=cache, progress=False
        )
    assert not cache.exists() and (tmp_path / 'emb.pt.partial').exists()
    resumed_data = CountingClips(tiny_model.config, n=6)
    resumed = embed_dataset(
        tiny_model, resumed_data, batch_size=1, save_every=1, cache_path=cache, progress=False
    )
    assert min(resumed_data.loads) == 4  # clips 0-3 came from the partial file
    fresh = embed_dataset(
        tiny_model, CountingClips(tiny_model.config, n=6), batch_size=3, progress=False
    )
    torch.testing.assert_close(resumed.audio, fresh.audio, rtol=1e-4, atol=1e-5)
    assert resumed.video_ids == fresh.video_ids and not (tmp_path / 'emb.pt.partial').exists()


def test_embed_dataset_reports_skipped_clips(tiny_model):
    data = CountingClips(tiny_model.config, missing={1, 3})
    with pytest.warns(UserWarning, match='2 clips could not be loaded'):
        embeddings = embed_dataset(tiny_model, data, batch_size=2, progress=False)
    assert (
        len(embeddings) == 3
        and embeddings.skipped == [1, 3]
        and embeddings.video_ids == ['v0', 'v2', 'v4']
    )
    with pytest.raises(ValueError, match='no clip'):
        embed_dataset(
            tiny_model, CountingClips(tiny_model.config, n=2, missing={0, 1}), progress=False
        )


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
        if not flat.is_floating_point():
            continue
        index = int(torch.randint(flat.numel(), (1,), generator=gen))
        original = flat[index].clone()
        with torch.no_grad():
            flat[index] = original + (
                1e-6 if original.abs() < 1 else original.abs() * 1e-6
            )  # the smallest kind of change
            assert model_fingerprint(tiny_model) != before, (
                f'{name}[{index}] does not change the fingerprint'
            )
            flat[index] = original
    assert model_fingerprint(tiny_model) == before


class FileClips(ClipDataset):
    "Clips backed by real files on disk; the items are random tensors (nothing is decoded)."

    def __init__(self, config, sources):
        super().__init__(sources, mode='eval')
        self.random = CountingClips(config, n=len(sources))

    def __getitem__(self, i):
        return self.random[i] | {'video_id': self.sources[i].video_id}


def test_replacing_media_invalidates_the_cache(tiny_model, tmp_path):
    media = tmp_path / 'media'
    media.mkdir()
    for i in range(3):
        (media / f'c{i}.mp4').write_bytes(bytes([i]) * 1000)
    sources = [ClipSource(f'c{i}', video=media / f'c{i}.mp4') for i in range(3)]
    cache = tmp_path / 'emb.pt'
    first = embed_dataset(
        tiny_model, FileClips(tiny_model.config, sources), cache_path=cache, progress=False
    )
    again = FileClips(tiny_model.config, sources)
    assert torch.equal(
        embed_dataset(tiny_model, again, cache_path=cache, progress=False).audio, first.audio
    )
    assert again.random.loads == []  # unchanged media: served from the cache
    (media / 'c1.mp4').write_bytes(b'a different video')  # replaced under the same name
    with pytest.raises(ValueError, match='replaced since'):
        embed_dataset(
            tiny_model, FileClips(tiny_model.config, sources), cache_path=cache, progress=False
        )
    redone = FileClips(tiny_model.config, sources)
    embed_dataset(tiny_model, redone, cache_path=cache, overwrite=True, progress=False)
    assert sorted(redone.random.loads) == [0, 1, 2]
    before = dataset_fingerprint(FileClips(tiny_model.config, sources))
    info = os.stat(media / 'c2.mp4')  # same size, new content, later mtime
    (media / 'c2.mp4').write_bytes(bytes([9]) * 1000)
    os.utime(media / 'c2.mp4', ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))
    assert dataset_fingerprint(FileClips(tiny_model.config, sources)) != before
    (media / 'c0.mp4').unlink()  # a missing file changes it too
    assert dataset_fingerprint(FileClips(tiny_model.config, sources)) not in (
        before,
        dataset_fingerprint(FileClips(tiny_model.config, sources[1:])),
    )


def test_media_fingerprint_of_the_extracted_layout_and_subsets(tmp_path):
    root = tmp_path / 'frames'
    for t in range(3):
        (root / f'frame_{t}').mkdir(parents=True)
        for clip in ('a', 'b'):
            (root / f'frame_{t}' / f'{clip}.jpg').write_bytes(b'jpg' + bytes([t]))
    wavs = [tmp_path / f'{clip}.wav' for clip in ('a', 'b')]
    for wav in wavs:
        wav.write_bytes(b'RIFF')
    data = ClipDataset(
        [ClipSource(clip, frame_root=root, audio=wav) for clip, wav in zip(('a', 'b'), wavs)],
        mode='eval',
    )
    whole, only_b = media_fingerprint(data), media_fingerprint(Subset(data, [1]))
    (root / 'frame_1' / 'a.jpg').write_bytes(b'a new frame 1')  # a frame of clip a replaced
    assert media_fingerprint(data) != whole and media_fingerprint(Subset(data, [1])) == only_b
    (root / 'frame_3').mkdir()  # a frame folder more (re-extraction)
    (root / 'frame_3' / 'b.jpg').write_bytes(b'jpg')
    assert media_fingerprint(Subset(data, [1])) != only_b
    assert (
        media_fingerprint(CountingClips(tiny_config(), n=2)) is None
    )  # no files behind it: ids and config only


def tiny_config():
    from cavmae_sync.model import tiny

    return tiny(num_frames=3)


def test_model_fingerprint_time_on_a_vit_b_sized_state_dict():
    "The cost of hashing every weight: a ViT-B-sized state dict (about 86M float32 values, 344 MB)."
    import time

    class Weights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.zeros(768, 768 * 12)) for _ in range(12)]
            )
            self.extra = torch.nn.Parameter(torch.zeros(1000, 768))

    model = Weights()
    start = time.perf_counter()
    key = model_fingerprint(model)
    seconds = time.perf_counter() - start
    print(
        f'model_fingerprint of {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M values: {seconds:.2f} s'
    )
    assert len(key) == 16 and seconds < 30


def test_evaluation_precision_options(tiny_model):
    assert precision_tag('cpu', 'fp16') == precision_tag('cpu', 'bf16') == ''  # CPU: always fp32
    assert (
        precision_tag('cuda', 'fp16') == '-cuda-fp16'
        and precision_tag('cuda', 'bf16') == '-cuda-bf16'
    )
    with pytest.raises(ValueError, match='precision must be one of'):
        precision_tag('cpu', 'float8')
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            'ignore', message='.*CUDA is not available.*'
        )  # a CPU-only machine disables CUDA autocast
        context = evaluation_autocast('cuda', 'fp16')
        assert context.fast_dtype == torch.float16 and (
            context._enabled is True or not torch.cuda.is_available()
        )
        assert evaluation_autocast('cuda', 'bf16').fast_dtype == torch.bfloat16
    assert (
        not evaluation_autocast('cpu', 'fp16')._enabled
        and not evaluation_autocast('cuda', 'fp32')._enabled
    )
    data = CountingClips(tiny_model.config, n=2)
    fp32 = embed_dataset(tiny_model, data, progress=False)
    assert torch.equal(
        embed_dataset(tiny_model, data, progress=False, precision='bf16').audio, fp32.audio
    )  # CPU unchanged
    with pytest.raises(ValueError, match='precision'):
        embed_dataset(tiny_model, data, progress=False, precision='half')


def test_clip_embeddings_subset_and_file(tiny_model, tmp_path):
    embeddings = embed_dataset(tiny_model, CountingClips(tiny_model.config, n=4), progress=False)
    part = embeddings.subset([2, 0])
    assert part.video_ids == ['v2', 'v0'] and torch.equal(part.audio[1], embeddings.audio[0])
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
    assert (
        result.frame_times is not None and len(result.frame_times) == 4 and result.path == str(path)
    )
    config = model_preprocess_config(model)
    assert (config.num_frames, config.window, config.image_size) == (
        4,
        model.config.audio_length,
        model.config.image_size,
    )
