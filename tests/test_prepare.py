"The cavmae-sync-prepare command: datafile + label CSV, the official pre-extracted layout, errors and skipping."

import json
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from cavmae_sync.audio import load_audio
from cavmae_sync.config import PreprocessConfig
from cavmae_sync.prepare import prepare_cli
from cavmae_sync.data import (
    prepare_dataset,
    load_clip,
    load_clip_from_frames,
    DatafileDataset,
    read_label_csv,
    read_datafile,
    MediaError,
)
from media_factory import write_clip, truncate, frame_number


def run_cli(*args):
    "The installed console script when there is one, else the same entry point through python."
    script = shutil.which('cavmae-sync-prepare')
    command = (
        [script]
        if script
        else [
            sys.executable,
            '-c',
            'import sys; from cavmae_sync.prepare import prepare_cli; sys.exit(prepare_cli())',
        ]
    )
    return subprocess.run(
        command + [str(a) for a in args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope='module')
def extracted(media_dir, tmp_path_factory):
    "The two real clips prepared with --extract by two worker processes, with multi-labels from a CSV."
    root = tmp_path_factory.mktemp('prepare')
    videos = root / 'videos'
    videos.mkdir()
    for path in sorted(media_dir.glob('*.mp4')):
        shutil.copy(path, videos / path.name)
    labels = root / 'labels.csv'
    labels.write_text(
        'video_id,labels\n00W1lcxW-WU_40.000,"Speech,Music"\nKlsG1EnBEjc_000361,Engine\n'
    )
    result = run_cli(
        videos,
        '--out',
        root / 'out',
        '--labels',
        labels,
        '--extract',
        '--workers',
        2,
        '--no-progress',
    )
    assert result.returncode == 0, result.stderr
    return root, result


def test_extract_writes_the_official_layout(extracted):
    root, result = extracted
    out = root / 'out'
    assert 'wrote' in result.stdout and '2 clips' in result.stdout
    rows = read_datafile(out / 'datafile.json')
    assert [r['video_id'] for r in rows] == ['00W1lcxW-WU_40.000', 'KlsG1EnBEjc_000361']
    assert rows[0]['labels'] == 'Speech,Music'  # as the labels CSV gives them
    assert rows[1]['labels'] == 'Engine'
    for row in rows:
        assert row['video_path'] == str((out / 'frames').resolve())
        for t in range(16):
            assert (out / 'frames' / f'frame_{t}' / f"{row['video_id']}.jpg").stat().st_size > 0
        info = soundfile.info(row['wav'])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, 'PCM_16')
    assert not (out / 'frames' / 'frame_16').exists()
    assert not list(out.rglob('*.partial'))
    assert read_label_csv(out / 'class_labels_indices.csv') == [
        ('Engine', 'Engine'),
        ('Music', 'Music'),
        ('Speech', 'Speech'),
    ]


def test_extracted_wav_is_the_first_channel_at_16k(extracted, media_dir):
    root, _ = extracted
    for path in sorted(media_dir.glob('*.mp4')):
        wav, rate = soundfile.read(root / 'out' / 'audio' / f'{path.stem}.wav', dtype='int16')
        reference = load_audio(path, 16000, pcm16=True)  # k / 32768, ffmpeg's s16 rounding
        assert rate == 16000 and wav.shape == reference.shape
        np.testing.assert_array_equal(wav, (reference * 32768).round().numpy().astype(np.int16))


def test_extracted_layout_loads_like_the_video(extracted, media_dir):
    root, _ = extracted
    out = root / 'out'
    dataset = DatafileDataset(out / 'datafile.json', out / 'class_labels_indices.csv', mode='eval')
    assert dataset.classes == ['Engine', 'Music', 'Speech']
    released = PreprocessConfig(
        frame_preset='released'
    )  # what --extract writes, read from the mp4 directly
    for k, path in enumerate(sorted(media_dir.glob('*.mp4'))):
        item, direct = dataset[k], load_clip(path, config=released)
        assert item['frames'].shape == direct.frames.shape == (16, 3, 224, 224)
        assert (item['frames'] - direct.frames).abs().max() < 1e-6  # the same JPEG round trip
        assert (item['audio'] - direct.audio).abs().max() < 1e-4  # the same 16-bit samples
    assert dataset[0]['labels'].tolist() == [0, 1, 1] and dataset[1]['labels'].tolist() == [1, 0, 0]


def test_extracted_layout_training_items(extracted):
    root, _ = extracted
    dataset = DatafileDataset(
        root / 'out' / 'datafile.json', root / 'out' / 'class_labels_indices.csv', mode='train'
    )
    item = dataset[1]
    assert (
        item['frames'].shape == (3, 224, 224)
        and item['audio'].shape == (416, 128)
        and 0 <= item['frame_index'] < 16
    )
    clip = load_clip_from_frames(
        root / 'out' / 'frames',
        'KlsG1EnBEjc_000361',
        root / 'out' / 'audio' / 'KlsG1EnBEjc_000361.wav',
    )
    assert torch.equal(item['audio'], clip.audio[item['frame_index']])


@pytest.fixture()
def class_folders(tmp_path):
    videos = tmp_path / 'videos'
    for name, k in [('dog', 0), ('dog', 1), ('piano', 2)]:
        write_clip(videos / name / f'{name}{k}.mp4', seconds=1.5)
    return videos


def test_probe_only_with_folder_labels(class_folders, tmp_path, capsys):
    assert (
        prepare_cli(
            [
                str(class_folders),
                '--out',
                str(tmp_path / 'out'),
                '--folder-labels',
                '--workers',
                '1',
                '--no-progress',
            ]
        )
        == 0
    )
    rows = read_datafile(tmp_path / 'out' / 'datafile.json')
    assert [(r['video_id'], r['labels']) for r in rows] == [
        ('dog0', 'dog'),
        ('dog1', 'dog'),
        ('piano2', 'piano'),
    ]
    assert all(r['video_path'] == r['wav'] and r['video_path'].endswith('.mp4') for r in rows)
    assert not (tmp_path / 'out' / 'frames').exists()
    dataset = DatafileDataset(
        tmp_path / 'out' / 'datafile.json',
        tmp_path / 'out' / 'class_labels_indices.csv',
        mode='eval',
    )
    item = dataset[2]
    assert item['labels'].tolist() == [0, 1] and item['frames'].shape == (16, 3, 224, 224)


def test_extract_in_process_with_other_settings(class_folders, tmp_path):
    from cavmae_sync.config import PreprocessConfig

    result = prepare_dataset(
        class_folders,
        tmp_path / 'out',
        extract=True,
        workers=1,
        progress=False,
        config=PreprocessConfig(num_frames=4, image_size=64),
    )
    assert result.num_clips == 3 and result.label_csv is None and result.skipped == []
    frame_root = tmp_path / 'out' / 'frames'
    assert sorted(p.name for p in frame_root.iterdir()) == [
        'frame_0',
        'frame_1',
        'frame_2',
        'frame_3',
    ]
    clip = load_clip_from_frames(
        frame_root, 'dog0', tmp_path / 'out' / 'audio' / 'dog0.wav', num_frames=4, image_size=64
    )
    assert clip.frames.shape == (4, 3, 64, 64)
    from cavmae_sync.video import unnormalize

    released_indices = (
        np.linspace(0, 15 - 1, 4).astype(int).tolist()
    )  # the released extractor's: [0, 4, 9, 14] of 15 frames
    assert [
        frame_number(unnormalize(f).permute(1, 2, 0) * 255) for f in clip.frames
    ] == released_indices


def test_broken_file_stops_or_is_skipped(class_folders, tmp_path):
    broken = truncate(
        class_folders / 'dog' / 'dog0.mp4', class_folders / 'piano' / 'broken.mp4', 0.4
    )
    (class_folders / 'dog' / 'silent.mp4').write_bytes(b'')
    result = run_cli(
        class_folders, '--out', tmp_path / 'strict', '--extract', '--workers', '1', '--no-progress'
    )
    assert result.returncode == 1 and 'error' in result.stderr
    assert 'broken.mp4' in result.stderr or 'silent.mp4' in result.stderr
    assert not (tmp_path / 'strict' / 'datafile.json').exists()
    result = run_cli(
        class_folders,
        '--out',
        tmp_path / 'lenient',
        '--folder-labels',
        '--skip-errors',
        '--workers',
        '1',
        '--no-progress',
    )
    assert result.returncode == 0, result.stderr
    assert (
        'skipped 2 unreadable files' in result.stderr
        and str(broken) in result.stderr
        and 'silent.mp4: empty file' in result.stderr
    )
    assert [r['video_id'] for r in read_datafile(tmp_path / 'lenient' / 'datafile.json')] == [
        'dog0',
        'dog1',
        'piano2',
    ]


def test_label_and_id_errors(class_folders, tmp_path, capsys):
    labels = tmp_path / 'labels.csv'
    labels.write_text('video_id,labels\ndog0,dog\ndog1,dog\n')  # piano2 has none
    assert (
        prepare_cli(
            [
                str(class_folders),
                '--out',
                str(tmp_path / 'o'),
                '--labels',
                str(labels),
                '--workers',
                '1',
                '--no-progress',
            ]
        )
        == 1
    )
    assert 'piano2' in capsys.readouterr().err
    labels.write_text('video_id,labels\ndog0,"a,b"\ndog1,dog\npiano2,"x"""\n')
    with pytest.raises(ValueError, match='commas or quotes'):
        prepare_dataset(class_folders, tmp_path / 'o', labels=labels, workers=1)
    write_clip(class_folders / 'piano' / 'dog0.mkv', seconds=1.0)  # same id as dog/dog0.mp4
    with pytest.raises(ValueError, match="unique.*dog0"):
        prepare_dataset(class_folders, tmp_path / 'o', workers=1)
    with pytest.raises(SystemExit):
        prepare_cli([str(class_folders), '--labels', str(labels), '--folder-labels'])
    assert (
        prepare_cli([str(tmp_path / 'nowhere')]) == 1 and 'not a folder' in capsys.readouterr().err
    )


def test_prepare_and_load_clip_share_one_readability_rule(tmp_path):
    """A header declaring one frame more than the file holds is readable by both; truncated,
    audio-less and empty files by neither."""
    from media_factory import avi_declaring_more_frames

    folder = tmp_path / 'videos'
    files = {
        'gap': avi_declaring_more_frames(folder / 'gap.avi', frames=20, extra=1),
        'good': write_clip(folder / 'good.mp4', seconds=2.0),
        'truncated': truncate(
            write_clip(tmp_path / 'whole.mp4', seconds=4.0), folder / 'truncated.mp4', 0.5
        ),
        'no_audio': write_clip(folder / 'no_audio.mp4', audio=False),
        'empty': folder / 'empty.mp4',
    }
    files['empty'].touch()
    readable = {}
    for name, path in files.items():
        try:
            load_clip(path, num_frames=4, window=64, image_size=32)
            readable[name] = True
        except MediaError as e:
            readable[name] = False
            assert str(path) in str(e)
    assert readable == {
        'gap': True,
        'good': True,
        'truncated': False,
        'no_audio': False,
        'empty': False,
    }
    result = prepare_dataset(
        folder, out=tmp_path / 'out', skip_errors=True, workers=1, progress=False
    )
    kept = {row['video_id'] for row in json.loads(result.datafile.read_text())['data']}
    assert kept == {name for name, ok in readable.items() if ok}
    assert sorted(Path(p).name for p, _ in result.skipped) == [
        'empty.mp4',
        'no_audio.mp4',
        'truncated.mp4',
    ]
    assert result.frame_gaps == [(str(files['gap']), 1)]  # counted in the report
