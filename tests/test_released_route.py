"""The released preset reproduces the released pipeline from the mp4 files: the released extractor's
jpgs pixel for pixel,
its wav's fbank windows, and the released model's embeddings (`../shared/reference/official_route/`)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cavmae_sync.checkpoint import load_official
from cavmae_sync.config import PreprocessConfig
from cavmae_sync.audio import clip_spectrogram, load_audio
from cavmae_sync.data import prepare_dataset, read_clip_audio
from cavmae_sync.embeddings import embed_video
from cavmae_sync.video import ReleasedPipelineWarning


@pytest.fixture(scope='module')
def route(reference_dir) -> Path:
    return reference_dir / 'official_route'


@pytest.fixture(scope='module')
def expected(route) -> dict:
    return torch.load(route / 'released_route_embeddings.pt', weights_only=True)


def released_jpg(route: Path, t: int, video_id: str) -> np.ndarray:
    return np.array(Image.open(route / 'frames' / f'frame_{t}' / f'{video_id}.jpg').convert('RGB'))


def test_released_model_embeddings_from_the_mp4(route, expected, media_dir, capsys):
    model = load_official(
        route / 'tiny_released_architecture.pth', **expected['load_official_kwargs']
    )
    assert model.config.frame_preset == 'released'
    assert 'sha256' in capsys.readouterr().out  # what was loaded is printed
    for k, video_id in enumerate(expected['ids']):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            ours = embed_video(media_dir / f'{video_id}.mp4', model)
        correct = expected['frames_read_correctly'][video_id]
        assert (ours.audio - expected['audio'][k]).abs().max() < 1e-4
        assert (ours.video[:correct] - expected['video'][k][:correct]).abs().max() < 1e-4
        misread = [
            w
            for w in caught
            if issubclass(w.category, ReleasedPipelineWarning) and video_id in str(w.message)
        ]
        assert bool(misread) == (correct < 16)  # the Kls clip is named, the other is not


def test_released_fbank_windows_from_the_mp4(route, expected, media_dir):
    """Every window of the clip's spectrogram, from the mp4, against the released wav's. The 16-bit samples differ in
    about 40 of 160,000 places by one step (the libswresample in PyAV against the ffmpeg that made the released wavs),
    which moves a few values of the top mel bins (near the 8 kHz cut-off, nearly silent) by up to 2.3e-3."""
    config = PreprocessConfig(frame_preset='released')
    for video_id in expected['ids']:
        ours = clip_spectrogram(
            read_clip_audio(media_dir / f'{video_id}.mp4', config), config.sample_rate
        )  # (S, mel)
        released = clip_spectrogram(
            load_audio(route / 'audio' / f'{video_id}.wav', config.sample_rate), config.sample_rate
        )
        difference = (ours - released).abs()
        assert (
            difference.max() < 5e-3
            and difference.mean() < 1e-5
            and (difference > 1e-3).float().mean() < 1e-4
        )


def test_prepare_extract_writes_the_released_layout(route, expected, media_dir, tmp_path):
    prepare_dataset(media_dir, out=tmp_path / 'layout', extract=True, workers=1, progress=False)
    for video_id in expected['ids']:
        for t in range(expected['frames_read_correctly'][video_id]):
            ours = np.array(
                Image.open(
                    tmp_path / 'layout' / 'frames' / f'frame_{t}' / f'{video_id}.jpg'
                ).convert('RGB')
            )
            assert np.array_equal(ours, released_jpg(route, t, video_id)), (video_id, t)
