"Audio decoding, Kaldi fbank, clip spectrogram, frame windows and normalization statistics (cavmae_sync.audio)."

import math
import time

import av
import numpy as np
import pytest
import soundfile
import torch

from cavmae_sync.audio import (
    kaldi_fbank,
    load_audio,
    clip_fbank,
    clip_spectrogram,
    window_bounds,
    frame_windows,
    audio_stats,
    AudioStats,
    mel_center_frequencies,
)
from cavmae_sync.config import MediaError, AUDIO_MEAN, AUDIO_STD

CHANNEL_FREQUENCIES = (
    440.0,
    1900.0,
    2600.0,
    1300.0,
    3300.0,
    3700.0,
)  # Hz; channel 0 is always 440 Hz
LAYOUTS = {1: 'mono', 2: 'stereo', 6: '5.1'}


def tones(sample_rate, seconds, channels):
    "(N, C) float32: a different sine in every channel."
    t = np.arange(int(round(sample_rate * seconds))) / sample_rate
    return np.stack(
        [0.4 * np.sin(2 * np.pi * f * t) for f in CHANNEL_FREQUENCIES[:channels]], axis=1
    ).astype(np.float32)


def encode(path, samples, sample_rate, codec='aac', with_video=False, faststart=False):
    "Write (N, C) float samples with PyAV (optionally with a tiny video stream)."
    layout = LAYOUTS[samples.shape[1]]
    with av.open(
        str(path), 'w', options={'movflags': 'faststart'} if faststart else {}
    ) as container:
        if with_video:
            video = container.add_stream('mpeg4', rate=10)
            video.width, video.height, video.pix_fmt = 32, 32, 'yuv420p'
        audio = (
            container.add_stream(codec, rate=sample_rate, layout=layout) if samples.size else None
        )
        if audio is not None:
            fmt = audio.codec_context.format.name
            for start in range(0, len(samples), 1024):
                chunk = np.ascontiguousarray(samples[start : start + 1024].T)
                if not fmt.endswith('p'):
                    chunk = chunk.T.reshape(1, -1)
                if fmt.startswith('s16'):
                    chunk = (chunk * 32767).astype(np.int16)
                frame = av.AudioFrame.from_ndarray(chunk, format=fmt, layout=layout)
                frame.sample_rate, frame.pts = sample_rate, start
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode(None):
                container.mux(packet)
        if with_video:
            for i in range(10):
                frame = av.VideoFrame.from_ndarray(
                    np.full((32, 32, 3), 10 * i, np.uint8), format='rgb24'
                )
                frame.pts = i
                for packet in video.encode(frame):
                    container.mux(packet)
            for packet in video.encode(None):
                container.mux(packet)


# (file name, sample rate, channels, writer): every layout and rate, through soundfile and PyAV containers
CASES = [
    ('mono_8k.wav', 8000, 1, 'soundfile'),
    ('stereo_22k.flac', 22050, 2, 'soundfile'),
    ('stereo_44k.m4a', 44100, 2, 'aac'),
    ('surround_48k.m4a', 48000, 6, 'aac'),
    ('stereo_48k.mkv', 48000, 2, 'flac'),
    ('mono_22k.m4a', 22050, 1, 'aac'),
    ('stereo_8k.m4a', 8000, 2, 'aac'),
    ('surround_44k.wav', 44100, 6, 'soundfile'),
]
SECONDS = 1.5


@pytest.fixture(scope='module')
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp('audio_media')
    for name, rate, channels, writer in CASES:
        samples = tones(rate, SECONDS, channels)
        if writer == 'soundfile':
            soundfile.write(folder / name, samples, rate)
        else:
            encode(folder / name, samples, rate, codec=writer)
    encode(folder / 'with_video.mp4', tones(44100, SECONDS, 2), 44100, with_video=True)
    encode(folder / 'video_only.mp4', np.zeros((0, 1), np.float32), 44100, with_video=True)
    encode(folder / 'faststart.m4a', tones(44100, 3.0, 2), 44100, faststart=True)
    (folder / 'empty.mp4').touch()
    for source in (
        'with_video.mp4',
        'faststart.m4a',
        'stereo_22k.flac',
        'mono_8k.wav',
        'stereo_48k.mkv',
    ):
        data = (folder / source).read_bytes()
        (folder / f'half_{source}').write_bytes(data[: len(data) // 2])
    (folder / 'noise.mp4').write_bytes(
        np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    )
    return folder


# ---------------------------------------------------------------- reference data (skipped without ../shared)


def test_fbank_matches_torchaudio_reference(reference_dir):
    reference = torch.load(reference_dir / 'fbank_00W1lcxW-WU_40.000.pt')
    fbank = kaldi_fbank(reference['waveform'], reference['sample_rate'])
    assert fbank.shape == reference['fbank'].shape == (999, 128) and fbank.dtype == torch.float32
    assert (fbank - reference['fbank']).abs().max() <= 1e-3
    assert torch.equal(fbank, kaldi_fbank(reference['waveform'][0], reference['sample_rate']))


def test_real_clip_matches_ffmpeg_sox_reference(reference_dir, media_dir):
    reference = torch.load(reference_dir / 'fbank_00W1lcxW-WU_40.000.pt')
    start = time.perf_counter()
    waveform = load_audio(media_dir / '00W1lcxW-WU_40.000.mp4')
    seconds = time.perf_counter() - start
    assert waveform.dtype == torch.float32 and waveform.shape == reference['waveform'].shape[1:]
    fbank = kaldi_fbank(waveform - waveform.mean(), 16000)
    assert (fbank - reference['fbank']).abs().mean() < 0.01
    assert (waveform - waveform.mean() - reference['waveform'][0]).abs().max() < 1e-3
    pcm16 = load_audio(media_dir / '00W1lcxW-WU_40.000.mp4', pcm16=True)
    assert (kaldi_fbank(pcm16 - pcm16.mean(), 16000) - reference['fbank']).abs().mean() < 1e-4
    assert seconds < 2.0  # ~0.015 s when the machine is idle
    spectrogram = clip_spectrogram(waveform)
    assert spectrogram.shape == (1024, 128)
    assert torch.allclose(spectrogram[999:], torch.tensor(-AUDIO_MEAN / AUDIO_STD))


# ---------------------------------------------------------------- decoding generated files


@pytest.mark.parametrize('name,rate,channels,writer', CASES)
def test_load_audio_layouts_and_rates(media, name, rate, channels, writer):
    waveform = load_audio(media / name)
    assert waveform.dtype == torch.float32 and waveform.dim() == 1
    codec_slack = (
        16000 * 2048 / rate if writer != 'soundfile' else 2
    )  # AAC priming / final frame padding
    assert abs(waveform.numel() - SECONDS * 16000) <= codec_slack, (
        waveform.numel(),
        SECONDS * 16000,
    )
    spectrum = kaldi_fbank(waveform, 16000).mean(0)  # (128,)
    peak = mel_center_frequencies()[spectrum.argmax()].item()
    assert abs(peak - CHANNEL_FREQUENCIES[0]) < 40, (
        f'{name}: fbank peak at {peak:.0f} Hz, not channel 0'
    )
    assert 0.25 < waveform.square().mean().sqrt() < 0.32  # one 0.4-amplitude sine: RMS 0.28
    if channels > 1:  # channel 1's tone is absent, not mixed in
        other_bin = (mel_center_frequencies() - CHANNEL_FREQUENCIES[1]).abs().argmin()
        assert spectrum.max() - spectrum[other_bin] > 5.0  # > 20 dB below the peak (natural log)


def test_other_sample_rate(media):
    waveform = load_audio(media / 'stereo_22k.flac', sample_rate=8000)
    assert waveform.numel() == round(SECONDS * 8000)


def test_audio_with_video_stream(media):
    waveform = load_audio(media / 'with_video.mp4')
    assert abs(waveform.numel() - SECONDS * 16000) <= 16000 * 2048 / 44100


def test_pcm16_rounds_to_16_bits(media):
    precise, rounded = (
        load_audio(media / 'stereo_44k.m4a'),
        load_audio(media / 'stereo_44k.m4a', pcm16=True),
    )
    assert torch.equal(rounded * 32768, (rounded * 32768).round())
    assert (precise - rounded).abs().max() <= 1 / 32768


@pytest.mark.parametrize(
    'name,reason',
    [
        ('does_not_exist.mp4', 'file not found'),
        ('empty.mp4', 'empty file'),
        ('video_only.mp4', 'no audio stream'),
        ('noise.mp4', 'unreadable or corrupt container'),
        ('half_with_video.mp4', 'unreadable or corrupt container'),  # moov atom at the end: lost
        ('half_faststart.m4a', 'truncated'),  # index intact, data cut
        ('half_stereo_22k.flac', 'truncated'),
        ('half_mono_8k.wav', 'truncated'),
        ('half_stereo_48k.mkv', 'truncated'),  # decodes cleanly, ends early
    ],
)
def test_load_audio_errors(media, name, reason):
    with pytest.raises(MediaError, match=reason) as error:
        load_audio(media / name)
    assert error.value.path == str(media / name)


def test_load_audio_directory(media):
    with pytest.raises(MediaError, match='not a regular file'):
        load_audio(media)


# ---------------------------------------------------------------- fbank and clip spectrogram


def test_fbank_shape_and_frequency():
    tone = torch.sin(2 * math.pi * 2000 * torch.arange(32000) / 16000)
    fbank = kaldi_fbank(tone, 16000)
    assert fbank.shape == (1 + (32000 - 400) // 160, 128)
    assert abs(mel_center_frequencies()[fbank.mean(0).argmax()] - 2000) < 80
    assert kaldi_fbank(tone[:399], 16000).shape == (0, 128)
    with pytest.raises(ValueError, match='single-channel'):
        kaldi_fbank(torch.zeros(2, 1000), 16000)
    with pytest.raises(ValueError, match='floating-point'):
        kaldi_fbank(torch.zeros(1000, dtype=torch.int16), 16000)


def test_clip_spectrogram_pads_before_normalizing():
    waveform = 0.3 * torch.sin(2 * math.pi * 500 * torch.arange(16000) / 16000)  # 98 fbank frames
    raw = clip_fbank(waveform, target_length=200)
    assert raw.shape == (200, 128) and (raw[98:] == 0).all() and (raw[:98] != 0).any()
    normalized = clip_spectrogram(waveform, target_length=200)
    assert torch.allclose(normalized, (raw - AUDIO_MEAN) / AUDIO_STD)
    assert torch.allclose(normalized[98:], torch.tensor((0 - AUDIO_MEAN) / AUDIO_STD))
    assert torch.allclose(
        clip_spectrogram(waveform, target_length=50, mean=1.0, std=2.0), (raw[:50] - 1) / 2
    )
    with pytest.raises(ValueError, match='fewer than one'):
        clip_spectrogram(torch.zeros(0))
    with pytest.raises(ValueError, match='fewer than one'):
        clip_spectrogram(torch.zeros(100))
    with pytest.raises(ValueError, match='std'):
        clip_spectrogram(waveform, std=0)


# ---------------------------------------------------------------- frame-aligned windows


def test_window_bounds_released_setting():
    bounds = window_bounds(1024, 16, 416)
    expected_starts = [0, 0, 0, 0, 48, 112, 176, 240, 304, 368, 432, 496, 560, 608, 608, 608]
    assert bounds.dtype == torch.long and bounds.shape == (16, 2)
    assert bounds[:, 0].tolist() == expected_starts
    assert bounds[:, 1].tolist() == [s + 416 for s in expected_starts]


def test_window_bounds_rounding_and_edges():
    # S = 1000, T = 16: centres 62.5 t, Python round (half to even): t=1 -> 62, t=5 -> 312, t=7 -> 438, t=9 -> 562
    bounds = window_bounds(1000, 16, 100)
    assert bounds[1].tolist() == [12, 112] and bounds[5].tolist() == [262, 362]
    assert bounds[7].tolist() == [388, 488] and bounds[9].tolist() == [512, 612]
    assert bounds[15].tolist() == [888, 988]  # centre round(937.5) = 938
    assert window_bounds(1000, 16, 200)[15].tolist() == [
        800,
        1000,
    ]  # 938 - 100 + 200 > 1000: shifted back
    assert window_bounds(300, 4, 300).tolist() == [[0, 300]] * 4  # window = S
    assert window_bounds(10, 3, 1).tolist() == [
        [0, 1],
        [3, 4],
        [7, 8],
    ]  # centres round(0), round(3.33), round(6.67)
    assert window_bounds(10, 4, 3).tolist() == [
        [0, 3],
        [1, 4],
        [4, 7],
        [7, 10],
    ]  # centres 0, 2 (2.5), 5, 8 (7.5)
    with pytest.raises(ValueError, match="416 frames is longer than the spectrogram's 400"):
        window_bounds(400, 16, 416)
    with pytest.raises(ValueError, match='positive'):
        window_bounds(100, 0, 10)


@pytest.mark.parametrize(
    'frames,num_frames,window', [(1024, 16, 416), (1024, 1, 1024), (700, 5, 333)]
)
def test_frame_windows_are_slices(frames, num_frames, window):
    spectrogram = torch.randn(frames, 128)
    windows = frame_windows(spectrogram, num_frames, window)
    assert windows.shape == (num_frames, window, 128)
    for t, (start, end) in enumerate(window_bounds(frames, num_frames, window).tolist()):
        assert torch.equal(windows[t], spectrogram[start:end])
    batched = frame_windows(torch.stack([spectrogram, -spectrogram]), num_frames, window)
    assert batched.shape == (2, num_frames, window, 128) and torch.equal(batched[1], -windows)


def test_frame_windows_short_spectrogram():
    with pytest.raises(ValueError, match='longer than the spectrogram'):
        frame_windows(torch.zeros(300, 128))


# ---------------------------------------------------------------- normalization statistics


def test_audio_stats(media):
    paths = [media / 'mono_8k.wav', media / 'stereo_44k.m4a', media / 'surround_48k.m4a']
    stats = audio_stats(paths, target_length=200, progress=False)
    values = torch.stack([clip_fbank(load_audio(p), target_length=200) for p in paths]).double()
    assert isinstance(stats, AudioStats) and stats.num_clips == 3 and stats.num_frames == 600
    assert math.isclose(stats.mean, values.mean().item(), rel_tol=1e-9)
    assert math.isclose(stats.std, values.std().item(), rel_tol=1e-9)
    assert math.isclose(stats.mean_clip_std, values.flatten(1).std(1).mean().item(), rel_tol=1e-9)
    with pytest.raises(MediaError, match='no audio stream'):
        audio_stats(paths + [media / 'video_only.mp4'], target_length=200, progress=False)
    skipping = audio_stats(
        paths + [media / 'video_only.mp4', media / 'empty.mp4'],
        target_length=200,
        skip_errors=True,
        progress=False,
    )
    assert skipping.skipped == [str(media / 'video_only.mp4'), str(media / 'empty.mp4')]
    assert math.isclose(skipping.mean, stats.mean) and skipping.num_clips == 3
    with pytest.raises(ValueError, match='none of the'):
        audio_stats([media / 'empty.mp4'], skip_errors=True, progress=False)
    with pytest.raises(ValueError, match='at least one'):
        audio_stats([], progress=False)
