"""The reproduction notebooks' shared plumbing: the one-message stop on missing real data, checkpoint loading of either format,
output paths, and the paired bootstrap."""
import json

import numpy as np
import pytest
import torch

from cavmae_sync.checkpoint import CheckpointError, save_checkpoint
from cavmae_sync.model import CAVMAESync, tiny
from cavmae_sync.reproduce import (Outputs, check_dataset, data_file, is_classifier_checkpoint, load_model, missing_media,
                                   paired_bootstrap, require_video_data)


def write_datafile(folder, rows):
    path = folder / 'test.json'
    path.write_text(json.dumps({'data': rows}))
    return path


def test_require_video_data_names_every_problem_at_once(tmp_path):
    (tmp_path / 'present.mp4').write_bytes(b'x')
    datafile = write_datafile(tmp_path, [{'video_id': 'a', 'wav': '', 'video_path': 'present.mp4', 'labels': '/m/1'},
                                         {'video_id': 'b', 'wav': '', 'video_path': str(tmp_path / 'absent.mp4'), 'labels': '/m/1'}])
    with pytest.raises(FileNotFoundError) as error:
        require_video_data('audioset', tmp_path, {'test_datafile': datafile, 'label_csv': tmp_path / 'labels.csv', 'checkpoint': None},
                           splits=('train', 'test'))
    message = str(error.value)
    assert 'checkpoint is not set' in message
    assert f"{tmp_path / 'labels.csv'} (label_csv) does not exist" in message
    assert f"{tmp_path / 'absent.mp4'} (named by {datafile}) does not exist" in message
    assert 'present.mp4' not in message.split('Expected:')[0]
    assert '527 classes' in message
    assert f'--out {tmp_path} --datafile train.json' in message and f'--out {tmp_path} --datafile test.json' in message


def test_require_video_data_passes_when_everything_is_there(tmp_path):
    (tmp_path / 'clip.mp4').write_bytes(b'x')
    datafile = write_datafile(tmp_path, [{'video_id': 'a', 'wav': '', 'video_path': 'clip.mp4', 'labels': '/m/1'}])
    require_video_data('vggsound', tmp_path, {'test_datafile': datafile, 'checkpoint': datafile})
    assert missing_media(datafile) == []


def test_pre_extracted_layout_needs_frames_and_wav(tmp_path):
    (tmp_path / 'frames' / 'frame_0').mkdir(parents=True)
    datafile = write_datafile(tmp_path, [{'video_id': 'a', 'wav': 'a.wav', 'video_path': 'frames', 'labels': '/m/1'}])
    assert missing_media(datafile) == [str(tmp_path / 'a.wav')]
    (tmp_path / 'a.wav').write_bytes(b'x')
    assert missing_media(datafile) == []


def test_dataset_choice_and_file_defaults(tmp_path):
    assert check_dataset('audioset', ['synthetic', 'audioset'], 'classification') == 'AudioSet'
    with pytest.raises(ValueError, match="dataset='imagenet'"): check_dataset('imagenet', ['synthetic'], 'retrieval')
    assert data_file(None, tmp_path, 'train.json') == tmp_path / 'train.json'
    assert data_file(None, None, 'train.json') is None


def test_load_model_reads_both_formats_and_says_why_not(tmp_path):
    config = tiny(embed_dim=48, num_heads=12, modality_depth=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=16,
                  image_size=32, audio_length=64, num_frames=4, num_registers=2)
    model = CAVMAESync(config)
    save_checkpoint(tmp_path / 'ours.pt', model)
    torch.save({'module.' + k: v for k, v in model.state_dict().items()}, tmp_path / 'official.pth')
    for name in ('ours.pt', 'official.pth'):
        loaded = load_model(tmp_path / name)
        assert not loaded.training and not is_classifier_checkpoint(tmp_path / name)
        for key, value in model.state_dict().items(): assert torch.equal(loaded.state_dict()[key], value), key
    state = model.state_dict()
    missing = next(key for key in state if key.endswith('attn.proj.bias'))
    state.pop(missing)
    torch.save(state, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError, match='neither a cavmae_sync checkpoint') as error: load_model(tmp_path / 'broken.pth')
    assert missing in str(error.value)


def test_outputs_keep_real_data_apart(tmp_path):
    assert Outputs.create(tmp_path / 'f', 'synthetic')('maps.png') == tmp_path / 'f' / 'maps.png'
    assert Outputs.create(tmp_path / 'f', 'ade20k_sound')('maps.png') == tmp_path / 'f' / 'maps_ade20k_sound.png'


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    better, worse = (rng.random(400) < 0.6).astype(float), (rng.random(400) < 0.3).astype(float)
    gap = paired_bootstrap(better, worse)
    assert gap.gain == pytest.approx((better.mean() - worse.mean()) * 100)
    assert 0 < gap.low < gap.gain < gap.high
    assert paired_bootstrap(better, worse, seed=1).gain == gap.gain                 # the point estimate does not depend on the draws
    wide, narrow = paired_bootstrap(better, worse, confidence=0.99), paired_bootstrap(better, worse, confidence=0.5)
    assert wide.low < gap.low < narrow.low and narrow.high < gap.high < wide.high
    with pytest.raises(ValueError, match='same queries'): paired_bootstrap(better, worse[:10])
