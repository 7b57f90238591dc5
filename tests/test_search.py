"""Clip index and search (`cavmae_sync.search`): exact scores against `retrieval.similarity`, skipped files, resuming
after a real kill (SIGKILL) without recomputing finished clips, incremental updates, model checks and the CLIs."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cavmae_sync.search as search
from cavmae_sync.checkpoint import save_checkpoint
from cavmae_sync.model import CAVMAESync, tiny
from cavmae_sync.embeddings import embed_video
from cavmae_sync.retrieval import similarity
from cavmae_sync.search import (
    ClipIndex,
    build_index,
    embed_audio_file,
    embed_image_file,
    index_cli,
    query_vector,
    search_cli,
    search_files,
)
from cavmae_sync.video import write_video

SMALL = dict(num_frames=4, audio_length=64, image_size=32)


def random_clip(path, seed, seconds=3.0, size=32):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 255, (int(seconds * 8), size, size, 3), dtype=np.uint8)
    audio = (0.3 * rng.standard_normal((1, int(seconds * 16000)))).astype(np.float32)
    return write_video(path, frames, fps=8, audio=audio)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return CAVMAESync(tiny(**SMALL)).eval()


@pytest.fixture
def folder(tmp_path):
    for i in range(3):
        random_clip(tmp_path / f'clip{i}.mp4', i)
    (tmp_path / 'sub').mkdir()
    random_clip(tmp_path / 'sub' / 'clip3.mp4', 3)
    (tmp_path / 'broken.mp4').write_bytes(b'not a video')
    return tmp_path


def test_index_and_exact_search(folder, model):
    index = build_index(folder, model, progress=False)
    assert index.paths == ['clip0.mp4', 'clip1.mp4', 'clip2.mp4', 'sub/clip3.mp4']
    assert [s[0] for s in index.skipped] == ['broken.mp4'] and index.skipped[0][1]
    assert index.audio.dtype == torch.float16 and tuple(index.audio.shape) == (
        4,
        4,
        model.config.embed_dim,
    )
    own = [embed_video(folder / p, model) for p in index.paths]
    assert torch.allclose(index.video.float(), torch.stack([e.video for e in own]), atol=2e-3)
    reloaded = ClipIndex.load(folder / 'cavmae_sync.index')
    assert reloaded.paths == index.paths and torch.equal(reloaded.audio, index.audio)
    # a sound against the clips' frames: diagonal_mean, as retrieval.similarity computes it
    query = embed_audio_file(folder / 'clip2.mp4', model)
    assert torch.allclose(query, own[2].audio, atol=1e-5)
    expected = similarity(query[None], torch.stack([e.video for e in own]), 'diagonal_mean')[0]
    hits = search_files(index, model, audio=folder / 'clip2.mp4', k=10)
    assert len(hits) == 4 and [h.rank for h in hits] == [1, 2, 3, 4]
    assert [h.path for h in hits] == [index.paths[i] for i in expected.argsort(descending=True)]
    assert [h.score for h in hits] == pytest.approx(
        expected.sort(descending=True).values.tolist(), abs=2e-3
    )
    assert torch.allclose(
        index.matrix('video').float() @ query_vector(query, 4), expected, atol=2e-3
    )
    # a video: both directions, averaged
    both = (
        similarity(own[1].audio[None], index.video.float(), 'diagonal_mean')[0]
        + similarity(own[1].video[None], index.audio.float(), 'diagonal_mean')[0]
    ) / 2
    assert search_files(index, model, video=folder / 'clip1.mp4', k=1)[0].score == pytest.approx(
        float(both.max()), abs=2e-3
    )
    # a picture against the clips' sound
    image = folder / 'picture.png'
    Image.fromarray(np.random.default_rng(9).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(
        image
    )
    picture = embed_image_file(image, model)
    scores = (index.audio.float() @ picture).mean(1)
    assert search_files(index, model, image=image, k=1)[0].score == pytest.approx(
        float(scores.max()), abs=2e-3
    )
    with pytest.raises(ValueError, match='exactly one'):
        search_files(index, model, audio=image, image=image)
    with pytest.raises(ValueError, match='another model'):
        index.scores(torch.zeros(4, 7))


def test_incremental_update_and_model_check(folder, model):
    out = folder / 'clips.index'
    build_index(folder, model, out, progress=False)
    calls = []
    real = search.embed_file

    def counting(path, model, precision='fp16'):
        calls.append(Path(path).name)
        return real(path, model, precision)

    random_clip(folder / 'clip9.mp4', 9)
    time.sleep(0.01)
    random_clip(folder / 'clip0.mp4', 100)  # changed content under the same name
    (folder / 'clip2.mp4').unlink()
    search.embed_file = counting
    try:
        index = build_index(folder, model, out, progress=False)
    finally:
        search.embed_file = real
    assert sorted(calls) == [
        'broken.mp4',
        'clip0.mp4',
        'clip9.mp4',
    ]  # only new and changed files (the broken one is retried)
    assert index.paths == ['clip0.mp4', 'clip1.mp4', 'clip9.mp4', 'sub/clip3.mp4']
    assert torch.allclose(
        index.video[0].float(), embed_video(folder / 'clip0.mp4', model).video, atol=2e-3
    )
    other = CAVMAESync(tiny(**SMALL))
    with pytest.raises(ValueError, match='another model'):
        build_index(folder, other, out, progress=False)
    assert len(build_index(folder, other, out, progress=False, overwrite=True)) == 4


KILLED_RUN = r'''
import sys, time, torch
from pathlib import Path
import cavmae_sync.search as search
from cavmae_sync.checkpoint import load_model_file
model = load_model_file(sys.argv[2])
real, done = search.embed_file, []
def slow_after_two(path, model, precision='fp16'):
    if len(done) == 2: time.sleep(600)                    # the parent kills us here
    out = real(path, model, precision); done.append(path); return out
search.embed_file = slow_after_two
search.build_index(sys.argv[1], model, Path(sys.argv[1]) / 'clips.index', save_every=1, progress=False)
'''


def test_resume_after_kill(tmp_path, model):
    folder = tmp_path / 'clips'
    folder.mkdir()
    for i in range(4):
        random_clip(folder / f'clip{i}.mp4', i)
    checkpoint = save_checkpoint(tmp_path / 'model.pt', model)
    partial = folder / 'clips.index.partial'
    process = subprocess.Popen([sys.executable, '-c', KILLED_RUN, str(folder), str(checkpoint)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if partial.exists():
                try:
                    if len(ClipIndex.load(partial)) == 2:
                        break
                except Exception:
                    pass  # being replaced: atomic rename, try again
            time.sleep(0.2)
        assert process.poll() is None, 'the indexing process ended before it could be killed'
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (folder / 'clips.index').exists()
    assert ClipIndex.load(partial).paths == ['clip0.mp4', 'clip1.mp4']
    calls, real = [], search.embed_file

    def counting(path, model, precision='fp16'):
        calls.append(Path(path).name)
        return real(path, model, precision)

    search.embed_file = counting
    try:
        index = build_index(folder, model, folder / 'clips.index', progress=False)
    finally:
        search.embed_file = real
    assert calls == ['clip2.mp4', 'clip3.mp4']  # finished clips are not recomputed
    assert index.paths == [f'clip{i}.mp4' for i in range(4)] and not partial.exists()
    assert not list(folder.glob('.*.partial'))  # no temporary file left behind by the killed writer


def _run(cli, argv):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_cli(folder, model, tmp_path):
    checkpoint = save_checkpoint(tmp_path / 'model.pt', model)
    code, out, _ = _run(
        index_cli,
        [str(folder), '--checkpoint', str(checkpoint), '--out', str(tmp_path / 'clips.index')],
    )
    assert code == 0 and '4 clips indexed, 1 skipped' in out and 'skipped\tbroken.mp4\t' in out
    code, out, _ = _run(
        search_cli, [str(tmp_path / 'clips.index'), '--audio', str(folder / 'clip1.mp4'), '-k', '2']
    )
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].split('\t')[0] == '1'
    index = ClipIndex.load(tmp_path / 'clips.index')
    assert [l.split('\t')[2] for l in lines] == [
        str(folder / h.path) for h in search_files(index, model, audio=folder / 'clip1.mp4', k=2)
    ]
    code, out, _ = _run(
        search_cli, [str(tmp_path / 'clips.index'), '--video', str(folder / 'clip1.mp4'), '--json']
    )
    assert code == 0 and len([json.loads(l) for l in out.splitlines()]) == 4
    other = save_checkpoint(tmp_path / 'other.pt', CAVMAESync(tiny(**SMALL)))
    code, _, err = _run(
        search_cli,
        [
            str(tmp_path / 'clips.index'),
            '--audio',
            str(folder / 'clip1.mp4'),
            '--checkpoint',
            str(other),
        ],
    )
    assert code == 2 and 'not the model' in err
    code, _, err = _run(
        search_cli, [str(tmp_path / 'nothing.index'), '--audio', str(folder / 'clip1.mp4')]
    )
    assert code == 2 and 'nothing.index' in err
    code, _, err = _run(index_cli, [str(folder), '--checkpoint', str(tmp_path / 'absent.pt')])
    assert code == 2 and 'absent.pt' in err


def test_audio_only_query(tmp_path, model):
    import soundfile
    from cavmae_sync.audio import load_audio

    clip = random_clip(tmp_path / 'clip.mp4', 5)
    soundfile.write(
        str(tmp_path / 'sound.wav'), load_audio(clip, 16000, align_to_video=True).numpy(), 16000
    )
    from_wav, from_video = (
        embed_audio_file(tmp_path / 'sound.wav', model),
        embed_audio_file(clip, model),
    )
    assert (
        from_wav.shape == from_video.shape and (from_wav * from_video).sum(-1).min() > 0.99
    )  # the same sound, the same windows
    with pytest.raises(Exception, match='absent.wav'):
        embed_audio_file(tmp_path / 'absent.wav', model)
