"cavmae_sync.data: load_clip on real and generated media, the pre-extracted layout, and the data sets."

import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from torch.utils.data import DataLoader

import cavmae_sync.data as data
from cavmae_sync.audio import load_audio, clip_spectrogram, frame_windows, mel_center_frequencies
from cavmae_sync.config import PreprocessConfig, AUDIO_MEAN, AUDIO_STD
from cavmae_sync.data import (
    MediaError,
    Clip,
    load_clip,
    load_clip_from_frames,
    VideoDataset,
    DatafileDataset,
    collate_clips,
    read_label_csv,
    read_datafile,
    resolve_config,
)
from cavmae_sync.video import unnormalize
from media_factory import write_clip, numbered_frames, frame_number, channel_frequency, truncate


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
    "Three 2 s clips (20 frames at 10 fps) in two class folders."
    root = tmp_path_factory.mktemp('clips')
    return [
        write_clip(root / 'dog' / 'dog_a.mp4'),
        write_clip(root / 'dog' / 'dog_b.mp4', channels=1),
        write_clip(root / 'piano' / 'piano_a.mp4', sample_rate=44_100),
    ]


def frame_numbers(frames):  # (K, 3, S, S) normalized -> the index each frame shows
    return [frame_number(unnormalize(im).permute(1, 2, 0) * 255) for im in frames]


def dominant_frequency(
    audio,  # (K, L, mel) normalized windows -> centre frequency of the loudest mel bin
):
    return float(mel_center_frequencies()[audio[0, :100].mean(0).argmax()])


def test_media_error_is_reexported():
    from cavmae_sync.config import MediaError as ConfigMediaError

    assert data.MediaError is ConfigMediaError and 'MediaError' in data.__all__


def test_load_clip_generated(clips):
    clip = load_clip(clips[0])
    assert isinstance(clip, Clip) and clip.video_id == 'dog_a' and clip.path == str(clips[0])
    assert clip.frames.shape == (16, 3, 224, 224) and clip.audio.shape == (16, 416, 128)
    assert clip.frames.dtype == clip.audio.dtype == torch.float32
    assert frame_numbers(clip.frames) == [t * 20 // 16 for t in range(16)]
    assert clip.duration == pytest.approx(2.0, abs=1e-3) and clip.positions.tolist() == list(
        range(16)
    )
    np.testing.assert_allclose(
        clip.frame_times.numpy(), [t * 20 // 16 / 10 for t in range(16)], atol=1e-4
    )
    # the windows are the official slices of one spectrogram of the clip's first channel
    torch.testing.assert_close(
        clip.audio, frame_windows(clip_spectrogram(load_audio(clips[0])), 16, 416), rtol=0, atol=0
    )
    assert clip.window_bounds[[0, 1, 8, 15]].tolist() == [
        [0, 416],
        [0, 416],
        [304, 720],
        [608, 1024],
    ]


def test_load_clip_real_media(media_dir):
    for path in sorted(media_dir.glob('*.mp4')):
        clip = load_clip(path)
        assert clip.frames.shape == (16, 3, 224, 224) and clip.audio.shape == (16, 416, 128)
        assert 9.9 < clip.duration < 10.1
        torch.testing.assert_close(
            clip.audio, frame_windows(clip_spectrogram(load_audio(path)), 16, 416), rtol=0, atol=0
        )
        # normalized with ImageNet / AudioSet statistics: values of order 1
        assert -1.5 < clip.frames.mean() < 1.5 and 0.3 < clip.frames.std() < 1.6
        assert -1.5 < clip.audio.mean() < 1.5 and 0.3 < clip.audio.std() < 1.6
        raw = clip.audio * AUDIO_STD + AUDIO_MEAN  # back to log-mel energies
        assert -16 < raw.mean() < 2
        # consecutive windows overlap as the centring rule says: window 1 starts (round(S/T) - L/2) frames in
        assert torch.equal(clip.audio[8, :10], clip_spectrogram(load_audio(path))[304:314])


@pytest.mark.parametrize('channels', [1, 2, 6])
@pytest.mark.parametrize('sample_rate', [8_000, 22_050, 48_000])
def test_channels_and_rates(tmp_path, channels, sample_rate):
    path = write_clip(
        tmp_path / f'c{channels}_{sample_rate}.mp4',
        seconds=1.5,
        channels=channels,
        sample_rate=sample_rate,
    )
    clip = load_clip(path, num_frames=4, window=256)
    assert clip.frames.shape == (4, 3, 224, 224) and clip.audio.shape == (4, 256, 128)
    # the first channel's tone (440 Hz), not a mix: channel c plays (c + 1) x 440 Hz
    frequency = dominant_frequency(clip.audio)
    assert abs(frequency - channel_frequency(0)) < abs(frequency - channel_frequency(1))
    assert abs(frequency - 440) < 60


def test_clip_shorter_than_one_window(tmp_path):
    path = write_clip(tmp_path / 'short.mp4', seconds=1.0, fps=10)
    clip = load_clip(path)
    assert clip.frames.shape == (16, 3, 224, 224) and clip.audio.shape == (16, 416, 128)
    assert clip.duration == pytest.approx(1.0, abs=1e-3)
    assert frame_numbers(clip.frames) == [t * 10 // 16 for t in range(16)]
    # about 1 s of sound, then zero padding (normalized: -mean / std) up to 1024 frames
    padding = (0 - AUDIO_MEAN) / AUDIO_STD
    assert torch.allclose(clip.audio[15], torch.full((416, 128), padding))
    assert not torch.allclose(clip.audio[0, :90], torch.full((90, 128), padding))


def test_baseline_one_frame_whole_spectrogram(clips):
    clip = load_clip(clips[0], num_frames=1, window=1024)
    assert clip.frames.shape == (1, 3, 224, 224) and clip.audio.shape == (1, 1024, 128)
    torch.testing.assert_close(
        clip.audio[0], clip_spectrogram(load_audio(clips[0])), rtol=0, atol=0
    )
    dataset = VideoDataset(clips, mode='train', config=PreprocessConfig(num_frames=1, window=1024))
    item = dataset[0]
    assert (
        item['frames'].shape == (3, 224, 224)
        and item['audio'].shape == (1024, 128)
        and item['frame_index'] == 0
    )


def test_config_and_overrides(clips):
    config = PreprocessConfig(num_frames=4, window=200, image_size=96)
    clip = load_clip(clips[0], config=config)
    assert clip.frames.shape == (4, 3, 96, 96) and clip.audio.shape == (4, 200, 128)
    assert load_clip(clips[0], num_frames=8, config=config).frames.shape == (
        8,
        3,
        96,
        96,
    )  # explicit argument wins
    with pytest.raises(ValueError, match='window'):
        load_clip(clips[0], window=2048)
    assert resolve_config(None) == PreprocessConfig()


def test_positions_and_training(clips):
    full = load_clip(clips[0])
    one = load_clip(clips[0], positions=[11], train=True)
    assert one.frames.shape == (1, 3, 224, 224) and one.positions.tolist() == [11]
    assert torch.equal(one.audio[0], full.audio[11]) and torch.equal(
        one.window_bounds[0], full.window_bounds[11]
    )
    with pytest.raises(ValueError, match='positions'):
        load_clip(clips[0], positions=[16])


def test_separate_audio_file(clips, tmp_path):
    wav = tmp_path / 'other.wav'
    soundfile.write(wav, 0.2 * np.sin(2 * np.pi * 2000 * np.arange(32000) / 16000), 16000)
    clip = load_clip(clips[0], audio_path=wav)
    assert abs(dominant_frequency(clip.audio) - 2000) < 150
    assert frame_numbers(clip.frames) == [t * 20 // 16 for t in range(16)]


@pytest.mark.parametrize(
    'case, words',
    [
        ('video_only', ['no audio stream']),
        ('audio_only', ['no video stream']),
        ('empty', ['empty file']),
        ('truncated', ['truncated']),
        ('missing', ['not found']),
    ],
)
def test_broken_files(clips, tmp_path, case, words):
    path = tmp_path / f'{case}.mp4'
    if case == 'video_only':
        write_clip(path, audio=False)
    elif case == 'audio_only':
        write_clip(path, video=False)
    elif case == 'empty':
        path.touch()
    elif case == 'truncated':
        truncate(clips[0], path, 0.5)
    with pytest.raises(MediaError) as error:
        load_clip(path)
    assert str(path) in str(error.value) and all(w in str(error.value) for w in words)


def write_layout(root, video_id, num_extracted, seconds=2.0, size=64):
    "A hand-made official layout: num_extracted numbered jpgs and a 16 kHz wav."
    frames = numbered_frames(num_extracted, size, size)
    for i, frame in enumerate(frames):
        (root / 'frames' / f'frame_{i}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(root / 'frames' / f'frame_{i}' / f'{video_id}.jpg', quality=95)
    wav = root / 'audio' / f'{video_id}.wav'
    wav.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(
        wav,
        0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * 16000)) / 16000),
        16000,
        subtype='PCM_16',
    )
    return root / 'frames', wav


def test_layout_with_other_frame_count(tmp_path):
    frame_root, wav = write_layout(
        tmp_path, 'vid', 10
    )  # the official CAV-MAE extraction wrote 10 frames
    clip = load_clip_from_frames(frame_root, 'vid', wav)
    assert clip.frames.shape == (16, 3, 224, 224) and clip.audio.shape == (16, 416, 128)
    assert frame_numbers(clip.frames) == [t * 10 // 16 for t in range(16)]
    np.testing.assert_allclose(
        clip.frame_times.numpy(), [t * 10 // 16 * 0.2 for t in range(16)], atol=1e-6
    )
    torch.testing.assert_close(
        clip.audio, frame_windows(clip_spectrogram(load_audio(wav)), 16, 416), rtol=0, atol=0
    )
    (frame_root / 'frame_7' / 'vid.jpg').write_bytes(b'')
    with pytest.raises(MediaError, match='frame_7.*empty file'):
        load_clip_from_frames(frame_root, 'vid', wav)
    (frame_root / 'frame_7' / 'vid.jpg').write_bytes(b'\xff\xd8\xff garbage')
    with pytest.raises(MediaError, match='frame_7.*corrupt'):
        load_clip_from_frames(frame_root, 'vid', wav)
    with pytest.raises(MediaError, match='frame_0.*not found'):
        load_clip_from_frames(frame_root, 'other', wav)
    with pytest.raises(MediaError, match='no extracted frames'):
        load_clip_from_frames(tmp_path / 'nothing', 'vid', wav)


# ---- data sets ----


def test_video_dataset_eval_and_train(clips):
    folder = clips[0].parent.parent
    dataset = VideoDataset(folder, mode='eval', labels=[0, 0, 1])
    assert len(dataset) == 3 and [s.video_id for s in dataset.sources] == [
        'dog_a',
        'dog_b',
        'piano_a',
    ]
    item = dataset[2]
    assert set(item) == {'frames', 'audio', 'index', 'video_id', 'labels'}
    assert item['frames'].shape == (16, 3, 224, 224) and item['audio'].shape == (16, 416, 128)
    assert item['index'] == 2 and item['video_id'] == 'piano_a' and item['labels'] == 1
    train = VideoDataset(clips, mode='train')
    torch.manual_seed(0)
    items = [train[0] for _ in range(6)]
    assert all(i['frames'].shape == (3, 224, 224) and i['audio'].shape == (416, 128) for i in items)
    assert len({i['frame_index'] for i in items}) > 1  # a random frame each time
    full = load_clip(clips[0])
    for i in items:
        assert torch.equal(i['audio'], full.audio[i['frame_index']])  # its own window
    with pytest.raises(ValueError, match='mode'):
        VideoDataset(clips, mode='test')
    with pytest.raises(ValueError, match='labels'):
        VideoDataset(clips, labels=[1])
    with pytest.raises(FileNotFoundError):
        VideoDataset(folder / 'nope')


def test_dataloader_with_two_workers(clips):
    dataset = VideoDataset(clips, mode='eval', labels=[0, 0, 1])
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert [b['frames'].shape for b in batches] == [(2, 16, 3, 224, 224), (1, 16, 3, 224, 224)]
    assert torch.cat([b['index'] for b in batches]).tolist() == [0, 1, 2]
    assert torch.equal(batches[1]['audio'][0], load_clip(clips[2]).audio)
    train = list(VideoDataset(clips, mode='train').loader(batch_size=3, num_workers=2))
    assert train[0]['frames'].shape == (3, 3, 224, 224) and train[0]['audio'].shape == (3, 416, 128)


def write_label_csv(path, mids):
    path.write_text(
        'index,mid,display_name\n' + ''.join(f'{k},{m},"name {k}"\n' for k, m in enumerate(mids))
    )
    return path


def test_datafile_dataset_labels(clips, tmp_path):
    label_csv = write_label_csv(tmp_path / 'labels.csv', ['/m/09x0r', '/m/05zppz', '/m/0bt9lr'])
    rows = [
        {
            'video_id': 'dog_a',
            'wav': str(clips[0]),
            'video_path': str(clips[0]),
            'labels': '/m/09x0r,/m/05zppz',
        },
        {
            'video_id': 'piano_a',
            'wav': str(clips[2]),
            'video_path': str(clips[2]),
            'labels': '/m/0bt9lr',
        },
    ]
    datafile = tmp_path / 'data.json'
    datafile.write_text(json.dumps({'data': rows}))
    dataset = DatafileDataset(datafile, label_csv, mode='eval')
    assert dataset.classes == ['name 0', 'name 1', 'name 2']
    assert dataset[0]['labels'].tolist() == [1, 1, 0] and dataset[1]['labels'].tolist() == [0, 0, 1]
    assert dataset[0]['labels'].dtype == torch.float32
    assert 'labels' not in DatafileDataset(datafile, mode='eval')[0]
    # an unknown label names the label, the row and the files
    rows[1]['labels'] = '/m/0bt9lr,/m/unknown'
    datafile.write_text(json.dumps({'data': rows}))
    with pytest.raises(ValueError) as error:
        DatafileDataset(datafile, label_csv)
    message = str(error.value)
    assert (
        "'/m/unknown'" in message
        and 'row 1' in message
        and "'piano_a'" in message
        and str(label_csv) in message
    )


def test_datafile_relative_paths_and_layout(clips, tmp_path):
    frame_root, wav = write_layout(tmp_path, 'laid_out', 16)
    rows = [
        {'video_id': 'laid_out', 'wav': 'audio/laid_out.wav', 'video_path': 'frames', 'labels': ''},
        {'video_id': 'dog_b', 'wav': str(clips[1]), 'video_path': str(clips[1]), 'labels': ''},
    ]
    datafile = tmp_path / 'data.json'
    datafile.write_text(json.dumps({'data': rows}))
    dataset = DatafileDataset(datafile, mode='eval')
    assert dataset.sources[0].frame_root == frame_root and dataset.sources[0].audio == wav
    assert dataset.sources[1].video == clips[1] and dataset.sources[1].audio is None
    item = dataset[0]
    assert frame_numbers(item['frames']) == list(range(16))
    train = DatafileDataset(datafile, mode='train')
    item = train[0]
    assert item['frames'].shape == (3, 224, 224) and item['audio'].shape == (416, 128)


@pytest.mark.parametrize(
    'content, match',
    [('[]', "'data' list"), ('{"data": [{"wav": "a.wav"}]}', 'lacks'), ('{oops', 'not valid JSON')],
)
def test_bad_datafiles(tmp_path, content, match):
    datafile = tmp_path / 'bad.json'
    datafile.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_datafile(datafile)


@pytest.mark.parametrize(
    'content, match',
    [
        ('index,mid\n0,a\n', 'header'),
        ('index,mid,display_name\n1,a,A\n', 'expected 0'),
        ('index,mid,display_name\n0,a,A\n1,a,B\n', 'repeated'),
        ('index,mid,display_name\nx,a,A\n', 'not an integer'),
    ],
)
def test_bad_label_csv(tmp_path, content, match):
    path = tmp_path / 'labels.csv'
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_label_csv(path)


def test_skip_errors_reports_across_workers(clips, tmp_path):
    broken = truncate(clips[0], tmp_path / 'broken.mp4', 0.5)
    empty = tmp_path / 'empty.mp4'
    empty.touch()
    paths = [clips[0], broken, clips[1], empty, clips[2]]
    strict = VideoDataset(paths, mode='eval')
    with pytest.raises(MediaError, match='broken.mp4'):
        strict[1]
    # a worker's MediaError is re-raised in the main process as a MediaError that still names the file
    with pytest.raises(MediaError, match='broken.mp4: truncated'):
        list(DataLoader(strict, batch_size=2, num_workers=2))
    assert strict.skipped == [] and strict.report().startswith('no file skipped')

    dataset = VideoDataset(paths, mode='eval', skip_errors=True)
    batches = list(dataset.loader(batch_size=2, num_workers=2))
    loaded = [i for b in batches if b is not None for i in b['index'].tolist()]
    assert loaded == [0, 2, 4]
    skipped = dict(dataset.skipped)
    assert set(skipped) == {str(broken), str(empty)}
    assert 'truncated' in skipped[str(broken)] and skipped[str(empty)] == 'empty file'
    report = dataset.report()
    assert report.startswith('skipped 2 unreadable files of 5 clips') and str(broken) in report
    list(dataset.loader(batch_size=2))  # a second epoch does not list them twice
    assert len(dataset.skipped) == 2
    assert collate_clips([None, None]) is None


def test_skip_log_is_removed_with_the_dataset(clips):
    import gc
    import os

    dataset = VideoDataset(clips, mode='eval', skip_errors=True)
    log = dataset._skip_log.path
    assert os.path.exists(log)
    del dataset
    gc.collect()
    assert not os.path.exists(log)
