"""Broken inputs fail loudly, naming the file or value, and lose nothing: one test per finding of the hostile-input review."""
import json, os, shutil, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cavmae_sync import clip_cache, pretraining, train, train_config
from cavmae_sync.config import MediaError, PreprocessConfig
from cavmae_sync.data import DatafileDataset, count_extracted_frames, load_clip, prepare_dataset
from cavmae_sync.model import tiny

MINI = dict(embed_dim=32, num_heads=2, modality_depth=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
            image_size=32, audio_length=64, num_frames=4, num_registers=2)


def mini_config(clips: Path, out: Path, **overrides) -> train_config.PretrainConfig:
    return train_config.PretrainConfig(model=tiny(**MINI), train_data=str(clips / 'train.json'), eval_data='', output_dir=str(out),
                                batch_size=4, lr=1e-3, lr_reference_batch=4, epochs=1, log_every=1, progress=False,
                                tensorboard=False, seed=3, **overrides)


def copy_set(clips: Path, dest: Path) -> Path:
    shutil.copytree(clips, dest)
    datafile = json.loads((dest / 'train.json').read_text())
    for row in datafile['data']: row['video_path'] = str(dest / Path(row['video_path']).relative_to(clips))
    (dest / 'train.json').write_text(json.dumps(datafile))
    return dest


def test_a_missing_frame_folder_is_named_not_read_around(clips, tmp_path):
    prepared = prepare_dataset(clips / 'clips' if (clips / 'clips').is_dir() else clips, out=tmp_path / 'layout', extract=True,
                               config=PreprocessConfig(num_frames=8, image_size=32), workers=1, progress=False)
    frames = tmp_path / 'layout' / 'frames'
    assert count_extracted_frames(frames) == 8
    shutil.rmtree(frames / 'frame_5')
    with pytest.raises(MediaError, match='frame_5') as error: count_extracted_frames(frames)
    assert 'missing' in str(error.value)
    dataset = DatafileDataset(prepared.datafile, mode='eval', config=PreprocessConfig(num_frames=8, image_size=32, window=64))
    with pytest.raises(MediaError, match='frame_5'): dataset[0]


def test_extracting_another_frame_count_into_an_old_layout_is_refused(clips, tmp_path):
    videos = clips / 'clips' if (clips / 'clips').is_dir() else clips
    prepare_dataset(videos, out=tmp_path / 'layout', extract=True, config=PreprocessConfig(num_frames=8, image_size=32),
                    workers=1, progress=False)
    with pytest.raises(ValueError, match='8 frames per clip') as error:
        prepare_dataset(videos, out=tmp_path / 'layout', extract=True, config=PreprocessConfig(num_frames=4, image_size=32),
                        workers=1, progress=False)
    assert str(tmp_path / 'layout' / 'frames') in str(error.value)
    assert count_extracted_frames(tmp_path / 'layout' / 'frames') == 8      # nothing of the old extraction was touched


def test_the_decode_cache_takes_labels_from_the_data_set_and_notices_replaced_files(clips, tmp_path):
    root = copy_set(clips, tmp_path / 'set')
    config = mini_config(root, tmp_path / 'unused')
    first = train.clip_dataset(config, root / 'train.json', 'eval')
    assert isinstance(first, clip_cache.DecodedClips)
    labels = pd.read_csv(root / 'labels.csv')
    datafile = json.loads((root / 'train.json').read_text())
    datafile['data'][0]['labels'] = labels['mid'].iloc[-1]                   # a corrected label for clip 0
    (root / 'train.json').write_text(json.dumps(datafile))
    second = train.clip_dataset(config, root / 'train.json', 'eval')
    expected = torch.zeros(len(labels)); expected[-1] = 1
    assert torch.equal(second[0]['labels'], expected) and not torch.equal(first[0]['labels'], expected)
    # a media file replaced under the same name is decoded again
    video = Path(datafile['data'][0]['video_path'])
    other = Path(datafile['data'][1]['video_path'])
    before = second[0]['frames']
    shutil.copyfile(other, video); os.utime(video, ns=(1, 1))
    third = train.clip_dataset(config, root / 'train.json', 'eval')
    assert torch.equal(third[0]['frames'], third[1]['frames']) and not torch.equal(third[0]['frames'], before)


def test_unlabelled_rows_of_a_labelled_set_are_refused(clips, tmp_path):
    root = copy_set(clips, tmp_path / 'set')
    datafile = json.loads((root / 'train.json').read_text())
    datafile['data'][2]['labels'] = ''
    (root / 'train.json').write_text(json.dumps(datafile))
    video_id = datafile['data'][2]['video_id']
    with pytest.raises(ValueError, match='has no labels') as error: DatafileDataset(root / 'train.json', root / 'labels.csv')
    assert 'row 2' in str(error.value) and video_id in str(error.value)
    DatafileDataset(root / 'train.json')                                   # without classes the rows need no labels


def test_audio_that_starts_late_is_aligned_to_the_frames_and_named(tmp_path):
    from cavmae_sync.video import write_video
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(6 * 16_000) / 16_000)[None]               # (1, S): 6 s of 440 Hz
    path = write_video(tmp_path / 'late.mp4', np.zeros((80, 48, 64, 3), np.uint8), 10, tone, audio_start=2.0)   # 8 s of video
    config = PreprocessConfig(num_frames=4, window=64, image_size=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        clip = load_clip(path, config=config)
    assert any(str(path) in str(w.message) and 'starts +1.9' in str(w.message) for w in caught)
    # window 0 is centred at 0 s: silence (the sound starts at 2 s); window 2 (centre 4 s) hears the tone
    assert clip.audio[0].std() < 1e-3 < clip.audio[2].std()


def test_two_runs_into_one_output_dir_cannot_interleave(clips, tmp_path):
    out = tmp_path / 'run'
    with train.output_dir_lock(out):
        with pytest.raises(FileExistsError, match='another run is writing') as error: pretraining.pretrain(mini_config(clips, out))
        assert str(out) in str(error.value)
    assert not (out / 'last.pt').exists()
    # a lock left by a killed run of this host is taken over
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True).stdout.strip()
    import socket
    (out / '.lock').write_text(f'{socket.gethostname()} {dead}')
    result = pretraining.pretrain(mini_config(clips, out))
    assert result.checkpoint_path.is_file() and not (out / '.lock').exists()


def test_skip_errors_survives_an_unreadable_first_clip_and_lists_it(clips, tmp_path):
    root = copy_set(clips, tmp_path / 'set')
    first = Path(json.loads((root / 'train.json').read_text())['data'][0]['video_path'])
    first.write_bytes(b'not a video at all')
    out = tmp_path / 'run'
    result = pretraining.pretrain(mini_config(root, out, skip_errors=True))       # default cache ('auto')
    listed = (out / 'skipped_files.tsv').read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(first)) and result.checkpoint_path.is_file()
    with pytest.raises(MediaError, match=str(first)): pretraining.pretrain(mini_config(root, tmp_path / 'strict'))


def test_cache_budget_is_the_running_total(clips, capsys):
    config = mini_config(clips, Path('unused'), cache_max_gb=1e-4)          # 100 KiB: less than two decoded clips
    dataset = train.clip_dataset(config, clips / 'train.json', 'train')
    assert not isinstance(dataset, clip_cache.DecodedClips)
    assert 'not kept in memory' in capsys.readouterr().out
    assert isinstance(train.clip_dataset(mini_config(clips, Path('unused')), clips / 'train.json', 'train'), clip_cache.DecodedClips)
