"Synthetic testbed: determinism, read-back through cavmae_sync.data, masks and sounding labels against the decoded files."
import json, os, shutil, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from cavmae_sync import synthetic
from cavmae_sync.synthetic import (COMPLETE_FILE, IDLE_BRIGHTNESS, SHADE, SyntheticConfig, SyntheticDataset,
                                   default_synthetic, load_ground_truth, make_synthetic, source_classes, synthetic_cli)
from cavmae_sync.audio import clip_spectrogram, load_audio, mel_center_frequencies
from cavmae_sync.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from cavmae_sync.data import DatafileDataset, load_clip, read_datafile, read_label_csv
from cavmae_sync.video import read_frames

NUM_TRAIN, NUM_TEST = 6, 4


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> SyntheticDataset:
    # two class sets for the test clips: clips 0 and 2 share one, 1 and 3 the other
    return make_synthetic(tmp_path_factory.mktemp('synthetic') / 'set', NUM_TRAIN, NUM_TEST, seed=0, workers=2,
                          num_test_class_sets=2)


def video_ids(dataset): return dataset.video_ids('train') + dataset.video_ids('test')


def decode_all(path):
    "Every video frame (N, H, W, 3) uint8 and every audio sample, as the package decodes them."
    video = read_frames(path, num_frames=80)
    assert video.num_video_frames == 80 and video.indices.tolist() == list(range(80))
    return video.frames.numpy(), load_audio(path).numpy()


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_clips_different_seed_different(dataset, tmp_path):
    again = make_synthetic(tmp_path / 'again', NUM_TRAIN, NUM_TEST, seed=0, workers=1, num_test_class_sets=2)   # other scheduling
    other = make_synthetic(tmp_path / 'other', 2, 1, seed=1, workers=2, num_test_class_sets=2)
    for vid in video_ids(dataset):
        frames, audio = decode_all(dataset.video_path(vid))
        frames_again, audio_again = decode_all(again.video_path(vid))
        np.testing.assert_array_equal(frames, frames_again, err_msg=vid)
        np.testing.assert_array_equal(audio, audio_again, err_msg=vid)
        assert dataset.video_path(vid).read_bytes() == again.video_path(vid).read_bytes(), vid
        np.testing.assert_array_equal(dataset.ground_truth(vid).source_masks, again.ground_truth(vid).source_masks)
    assert dataset.train_datafile.read_text().replace(str(dataset.root), '') == again.train_datafile.read_text().replace(str(again.root), '')
    for vid in video_ids(other):
        frames, audio = decode_all(dataset.video_path(vid))
        frames_other, audio_other = decode_all(other.video_path(vid))
        assert frames.shape == frames_other.shape and np.abs(frames.astype(int) - frames_other).mean() > 5, vid
        assert not np.allclose(audio[:160_000], audio_other[:160_000], atol=1e-3), vid


# ---------------------------------------------------------------------------------------------- read back
def test_every_clip_decodes_with_load_clip(dataset):
    for vid in video_ids(dataset):
        truth = dataset.ground_truth(vid)
        clip = load_clip(dataset.video_path(vid), num_frames=16, window=256, image_size=96)     # the tiny preset's input
        assert clip.frames.shape == (16, 3, 96, 96) and clip.audio.shape == (16, 256, 128), clip
        assert torch.isfinite(clip.frames).all() and torch.isfinite(clip.audio).all()
        assert clip.duration == pytest.approx(10.0)
        np.testing.assert_allclose(clip.frame_times.numpy(), truth.frame_times, atol=1e-6)    # same sampled frames
        assert clip.audio.std() > 0.1                                                          # not silence, not zeros
        full = load_clip(dataset.video_path(vid))                                              # the released model's input
        assert full.frames.shape == (16, 3, 224, 224) and full.audio.shape == (16, 416, 128)


def test_datafiles_and_label_csv_read_back(dataset):
    classes = source_classes(10)
    assert read_label_csv(dataset.label_csv) == [(c.mid, c.display_name) for c in classes]
    for split, count in (('train', NUM_TRAIN), ('test', NUM_TEST)):
        rows = read_datafile(dataset.datafile(split))
        assert [r['video_id'] for r in rows] == dataset.video_ids(split)
        for row in rows:
            assert set(row) == {'video_id', 'wav', 'video_path', 'labels'}
            assert row['wav'] == row['video_path'] == str(dataset.video_path(row['video_id']))
            assert row['labels'] == ','.join(classes[c].mid for c in dataset.ground_truth(row['video_id']).labels)
    config = PreprocessConfig(window=256, image_size=96)
    test_set = DatafileDataset(dataset.test_datafile, dataset.label_csv, mode='eval', config=config)
    assert len(test_set) == NUM_TEST and test_set.classes == [c.display_name for c in classes]
    for index in range(NUM_TEST):
        item = test_set[index]
        truth = dataset.ground_truth(item['video_id'])
        assert item['frames'].shape == (16, 3, 96, 96) and item['audio'].shape == (16, 256, 128)
        assert torch.nonzero(item['labels']).flatten().tolist() == truth.labels
    train_item = DatafileDataset(dataset.train_datafile, dataset.label_csv, mode='train', config=config)[0]
    assert train_item['frames'].shape == (3, 96, 96) and train_item['audio'].shape == (256, 128)


def test_test_clips_share_class_sets_but_not_timing(dataset):
    truths = [dataset.ground_truth(vid) for vid in dataset.video_ids('test')]
    assert truths[0].labels == truths[2].labels and truths[1].labels == truths[3].labels
    assert truths[0].labels != truths[1].labels
    assert not np.array_equal(truths[0].sounding, truths[2].sounding)          # same classes, different timeline
    assert not np.allclose(truths[0].centres.mean(1), truths[2].centres.mean(1), atol=2)   # and different places


# ---------------------------------------------------------------------------------------------- ground truth
def test_ground_truth_is_consistent(dataset):
    for vid in video_ids(dataset):
        truth = load_ground_truth(dataset.root, vid)
        K, T, H, W = truth.source_masks.shape
        assert (T, H, W) == (16, 112, 112) and 2 <= K <= 3 and len(set(truth.classes.tolist())) == K
        assert truth.source_masks.sum((2, 3)).min() > 80                        # every source visible in every frame
        assert not (truth.source_masks.sum(0) > 1).any()                        # sources never overlap
        np.testing.assert_array_equal(truth.sounding, truth.sounding_at(truth.frame_times))
        np.testing.assert_array_equal(truth.sounding_mask.any((1, 2)), truth.sounding >= 0)
        np.testing.assert_array_equal(truth.frame_indices, np.arange(16) * 5)
        starts, ends = truth.segments[:, 1], truth.segments[:, 2]
        assert (np.diff(starts) > 0).all() and (starts[1:] >= ends[:-1] + 0.2 - 1e-9).all()   # one source at a time
        assert ((ends - starts) <= 3 + 1e-9).all() and set(truth.segments[:, 0].astype(int)) == set(truth.classes.tolist())


def _erode(mask, steps):
    out = mask.copy()
    for _ in range(steps):
        out[1:] &= out[:-1].copy(); out[:-1] &= out[1:].copy(); out[:, 1:] &= out[:, :-1].copy(); out[:, :-1] &= out[:, 1:].copy()
    return out


def _dilate(mask, steps): return ~_erode(~mask, steps)


def _distance_to_segment(pixels, a, b):
    "Distance of each RGB pixel (..., 3) to the segment of colours from a to b (blends of a texture's two colours)."
    along = np.clip(((pixels - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)[..., None]
    return np.linalg.norm(pixels - (a + along * (b - a)), axis=-1)


def test_masks_cover_the_drawn_sources_in_the_decoded_frames(dataset):
    classes = source_classes(10)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for vid in video_ids(dataset):
        truth = dataset.ground_truth(vid)
        clip = load_clip(dataset.video_path(vid), num_frames=16, window=256, image_size=112)   # the written size
        frames = ((clip.frames * std + mean) * 255).permute(0, 2, 3, 1).numpy()               # (T, H, W, 3) 0..255
        for t in range(16):
            for k, cls in enumerate(truth.classes):
                brightness = 1.0 if truth.sounding[t] == cls else IDLE_BRIGHTNESS
                lit = np.array(classes[cls].colour) * brightness
                distance = _distance_to_segment(frames[t], lit * SHADE, lit)                   # (H, W) to the texture's colours
                inner = _erode(truth.source_masks[k, t], 1)
                assert (distance[inner] < 50).mean() > 0.85, (vid, t, classes[cls].display_name)
                if brightness == 1.0:                                        # just outside the sounding source: not its colours
                    ring = _dilate(truth.source_masks[k, t], 4) & ~_dilate(truth.source_masks[k, t], 1)
                    assert (distance[ring] < 50).mean() < 0.2, (vid, t, classes[cls].display_name)
                    assert frames[t][inner].max(-1).mean() > 1.3 * frames[t][_dilate(truth.sounding_mask[t], 6) & ~truth.sounding_mask[t]].max(-1).mean()


def test_sounding_labels_agree_with_the_audio(dataset):
    classes, centres_hz = source_classes(10), mel_center_frequencies().numpy()
    checked_sound = checked_silence = 0
    for vid in video_ids(dataset):
        truth, path = dataset.ground_truth(vid), dataset.video_path(vid)
        bands = [(centres_hz >= classes[c].band_hz[0]) & (centres_hz <= classes[c].band_hz[1]) for c in truth.classes]
        energy = lambda fbank: np.stack([fbank[..., band].mean(-1) for band in bands], -1)    # (..., K) per class band
        spectrogram = clip_spectrogram(load_audio(path)).numpy()                               # (1024, 128), normalized
        times = np.arange(len(spectrogram)) * 0.01 + 0.0125                                    # centre of each fbank frame
        real = times < truth.duration - 0.0125                                                 # not the zero padding
        floor = np.median(energy(spectrogram)[real & (truth.sounding_at(times) < 0)], 0)      # (K,) noise floor per band
        clip = load_clip(path, num_frames=16, window=24)                                        # short windows: 0.24 s
        for t in range(16):
            start, end = clip.window_bounds[t].tolist()
            labels = truth.sounding_at(times[start:end])
            if (labels != labels[0]).any() or not real[start:end].all(): continue              # straddles a boundary
            excess = energy(clip.audio[t].numpy()).mean(0) - floor                             # (K,)
            if labels[0] >= 0:
                k = list(truth.classes).index(labels[0])
                assert excess.argmax() == k and excess[k] - np.delete(excess, k).max() > 0.3, (vid, t, excess)
                checked_sound += 1
            else:
                assert excess.max() < 0.3, (vid, t, excess)
                checked_silence += 1
    assert checked_sound >= 8 * len(video_ids(dataset)) and checked_silence >= 5, (checked_sound, checked_silence)


# ---------------------------------------------------------------------------------------------- caching, errors, CLI
def test_default_synthetic_is_cached_and_regenerated_when_parameters_change(tmp_path):
    root = tmp_path / 'cached'
    assert default_synthetic(root, num_train=2, num_test=1) == root.resolve()
    marker = (root / COMPLETE_FILE).stat().st_mtime_ns
    start = time.perf_counter()
    default_synthetic(root, num_train=2, num_test=1)
    assert (root / COMPLETE_FILE).stat().st_mtime_ns == marker and time.perf_counter() - start < 0.5   # reused
    default_synthetic(root, num_train=2, num_test=1, seed=3, force=True)                                  # new seed: regenerated
    assert SyntheticDataset.from_root(root).seed == 3
    (root / COMPLETE_FILE).unlink()                                       # an incomplete set is never reused
    default_synthetic(root, num_train=2, num_test=1, seed=3)
    assert (root / COMPLETE_FILE).exists()
    stale = tmp_path / '.cached.partial-999999999-1'                      # left by a killed run (no such process)
    (stale / 'videos').mkdir(parents=True)
    default_synthetic(root, num_train=1, num_test=1, seed=3, force=True)
    assert not stale.exists() and SyntheticDataset.from_root(root).num_train == 1
    assert sorted(p.name for p in (root / 'videos').iterdir()) == ['test_00000.mp4', 'train_00000.mp4']   # the old set's extra clip is gone


def test_other_parameters_are_refused_and_user_files_survive(tmp_path):
    "Rerunning on the same folder with another parameter never deletes anything without force, and force removes only the set's files."
    root = tmp_path / 'mine'
    default_synthetic(root, num_train=2, num_test=1)
    user_files = {'notes.txt': 'my notes', 'videos/holiday.mp4': 'not a generated clip', 'ground_truth/labels_v2.csv': 'a,b'}
    for name, text in user_files.items(): (root / name).write_text(text)
    before = {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}
    with pytest.raises(FileExistsError) as refused: default_synthetic(root, num_train=3, num_test=1, seed=1)
    message = str(refused.value)
    assert str(root.resolve()) in message and 'num_train: 2 -> 3' in message and 'seed: 0 -> 1' in message and 'force' in message
    assert {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()} == before                    # nothing touched
    assert default_synthetic(root, num_train=2, num_test=1) == root.resolve()                              # same parameters: reused
    default_synthetic(root, num_train=1, num_test=2, seed=1, force=True)
    for name, text in user_files.items(): assert (root / name).read_text() == text, name
    data = SyntheticDataset.from_root(root)
    assert (data.num_train, data.num_test, data.seed) == (1, 2, 1)
    generated = sorted(p.name for p in (root / 'videos').glob('*_0*.mp4'))
    assert generated == ['test_00000.mp4', 'test_00001.mp4', 'train_00000.mp4']
    assert not list(tmp_path.glob('.mine.*partial*')) and not list(tmp_path.glob('.mine.old*'))
    # make_synthetic(overwrite=True) keeps them too; a set written before manifests existed is known from its params.json
    (root / 'MANIFEST.json').unlink()
    make_synthetic(root, 1, 1, seed=2, workers=1, overwrite=True)
    for name, text in user_files.items(): assert (root / name).read_text() == text, name
    assert sorted(p.name for p in (root / 'videos').glob('t*.mp4')) == ['test_00000.mp4', 'train_00000.mp4']


def test_cli_refuses_other_parameters_on_the_same_root(tmp_path, capsys):
    root = tmp_path / 'cli'
    assert synthetic_cli(['--root', str(root), '--num-train', '1', '--num-test', '1', '--quiet']) == 0
    (root / 'keep.txt').write_text('x')
    with pytest.raises(SystemExit) as exit_:
        synthetic_cli(['--root', str(root), '--num-train', '2', '--num-test', '1', '--quiet'])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and str(root.resolve()) in err and 'num_train: 1 -> 2' in err and '--force' in err
    assert synthetic_cli(['--root', str(root), '--num-train', '2', '--num-test', '1', '--quiet', '--force']) == 0
    assert (root / 'keep.txt').read_text() == 'x' and SyntheticDataset.from_root(root).num_train == 2


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2: raise RuntimeError('disk full')
        return original(*args, **kwargs)
    original = synthetic.write_mp4
    monkeypatch.setattr(synthetic, 'write_mp4', failing_write)
    with pytest.raises(RuntimeError, match='disk full'):
        make_synthetic(tmp_path / 'broken', 3, 0, workers=1)
    assert list(tmp_path.iterdir()) == []                                 # neither the set nor a partial folder


def test_bad_input_is_refused_with_a_reason(dataset, tmp_path):
    with pytest.raises(ValueError, match='num_classes'): source_classes(1)
    with pytest.raises(ValueError, match='num_classes'): SyntheticConfig(num_classes=13)
    with pytest.raises(ValueError, match='image_size'): SyntheticConfig(image_size=111)
    with pytest.raises(ValueError, match='at least one clip'): make_synthetic(tmp_path / 'empty', 0, 0)
    with pytest.raises(ValueError, match='num_train'): make_synthetic(tmp_path / 'negative', -1, 2)
    with pytest.raises(FileExistsError, match='already exists'): make_synthetic(dataset.root, 1, 1)
    precious = tmp_path / 'precious'; precious.mkdir(); (precious / 'thesis.tex').write_text('...')
    with pytest.raises(FileExistsError, match='not a synthetic data set'): make_synthetic(precious, 1, 1, overwrite=True)
    with pytest.raises(FileExistsError, match='not a synthetic data set'): default_synthetic(precious, 1, 1)
    assert (precious / 'thesis.tex').exists()
    with pytest.raises(FileNotFoundError, match="no ground truth for video 'test_09999'"): load_ground_truth(dataset.root, 'test_09999')
    with pytest.raises(FileNotFoundError, match='not a complete synthetic data set'): SyntheticDataset.from_root(tmp_path)


def test_cli(tmp_path, capsys):
    command = shutil.which('cavmae-sync-synthetic')
    args = ['--root', str(tmp_path / 'cli'), '--num-train', '2', '--num-test', '1', '--quiet']
    if command is not None:                                               # the installed console script
        result = subprocess.run([command, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        bad = subprocess.run([command, *args, '--num-classes', '20'], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and 'num_classes' in bad.stderr
    else:
        assert synthetic_cli(args) == 0
        summary = json.loads(capsys.readouterr().out)
    assert summary['num_train'] == 2 and summary['num_test'] == 1 and Path(summary['test_datafile']).exists()
    assert len(read_datafile(summary['train_datafile'])) == 2
