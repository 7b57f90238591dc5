"""Synthetic testbed: determinism, read-back through cavmae_sync.data, masks, equal activity of
sources and decoys, sounding labels and class sounds against the decoded files."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cavmae_sync import synthetic
from cavmae_sync.synthetic import (
    COMPLETE_FILE,
    SyntheticDataset,
    default_synthetic,
    make_synthetic,
    synthetic_cli,
)
from cavmae_sync.synthetic_classes import SHADE, object_colours, sound_ingredients, source_classes
from cavmae_sync.synthetic_render import class_waveform, class_window, load_ground_truth
from cavmae_sync.synthetic_scenes import SyntheticConfig, sample_scene
from cavmae_sync.localization import localization_scores
from cavmae_sync.audio import clip_spectrogram, load_audio, mel_center_frequencies
from cavmae_sync.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from cavmae_sync.files import partial_path
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
    return make_synthetic(
        tmp_path_factory.mktemp('synthetic') / 'set',
        NUM_TRAIN,
        NUM_TEST,
        seed=0,
        workers=2,
        num_test_class_sets=2,
    )


def video_ids(dataset):
    return dataset.video_ids('train') + dataset.video_ids('test')


def decode_all(path):
    "Every video frame (N, H, W, 3) uint8 and every audio sample, as the package decodes them."
    video = read_frames(path, num_frames=80)
    assert video.num_video_frames == 80 and video.indices.tolist() == list(range(80))
    return video.frames.numpy(), load_audio(path).numpy()


# ---------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_clips_different_seed_different(dataset, tmp_path):
    again = make_synthetic(
        tmp_path / 'again', NUM_TRAIN, NUM_TEST, seed=0, workers=1, num_test_class_sets=2
    )  # other scheduling
    other = make_synthetic(tmp_path / 'other', 2, 1, seed=1, workers=2, num_test_class_sets=2)
    for vid in video_ids(dataset):
        frames, audio = decode_all(dataset.video_path(vid))
        frames_again, audio_again = decode_all(again.video_path(vid))
        np.testing.assert_array_equal(frames, frames_again, err_msg=vid)
        np.testing.assert_array_equal(audio, audio_again, err_msg=vid)
        assert dataset.video_path(vid).read_bytes() == again.video_path(vid).read_bytes(), vid
        np.testing.assert_array_equal(
            dataset.ground_truth(vid).source_masks, again.ground_truth(vid).source_masks
        )
    assert dataset.train_datafile.read_text().replace(
        str(dataset.root), ''
    ) == again.train_datafile.read_text().replace(str(again.root), '')
    for vid in video_ids(other):
        frames, audio = decode_all(dataset.video_path(vid))
        frames_other, audio_other = decode_all(other.video_path(vid))
        assert (
            frames.shape == frames_other.shape
            and np.abs(frames.astype(int) - frames_other).mean() > 5
        ), vid
        assert not np.allclose(audio[:160_000], audio_other[:160_000], atol=1e-3), vid


# ---------------------------------------------------------------------------------------------- read back
def test_every_clip_decodes_with_load_clip(dataset):
    for vid in video_ids(dataset):
        truth = dataset.ground_truth(vid)
        clip = load_clip(
            dataset.video_path(vid), num_frames=16, window=256, image_size=96
        )  # the tiny preset's input
        assert clip.frames.shape == (16, 3, 96, 96) and clip.audio.shape == (16, 256, 128), clip
        assert torch.isfinite(clip.frames).all() and torch.isfinite(clip.audio).all()
        assert clip.duration == pytest.approx(10.0)
        np.testing.assert_allclose(
            clip.frame_times.numpy(), truth.frame_times, atol=1e-6
        )  # same sampled frames
        assert clip.audio.std() > 0.1  # not silence, not zeros
        full = load_clip(dataset.video_path(vid))  # the released model's input
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
            assert row['labels'] == ','.join(
                classes[c].mid for c in dataset.ground_truth(row['video_id']).labels
            )
    config = PreprocessConfig(window=256, image_size=96)
    test_set = DatafileDataset(dataset.test_datafile, dataset.label_csv, mode='eval', config=config)
    assert len(test_set) == NUM_TEST and test_set.classes == [c.display_name for c in classes]
    for index in range(NUM_TEST):
        item = test_set[index]
        truth = dataset.ground_truth(item['video_id'])
        assert item['frames'].shape == (16, 3, 96, 96) and item['audio'].shape == (16, 256, 128)
        assert torch.nonzero(item['labels']).flatten().tolist() == truth.labels
    train_item = DatafileDataset(
        dataset.train_datafile, dataset.label_csv, mode='train', config=config
    )[0]
    assert train_item['frames'].shape == (3, 96, 96) and train_item['audio'].shape == (256, 128)


def test_test_clips_share_class_sets_but_not_timing(dataset):
    truths = [dataset.ground_truth(vid) for vid in dataset.video_ids('test')]
    assert truths[0].labels == truths[2].labels and truths[1].labels == truths[3].labels
    assert truths[0].labels != truths[1].labels
    assert not np.array_equal(
        truths[0].sounding, truths[2].sounding
    )  # same classes, different timeline
    assert not np.allclose(
        truths[0].centres.mean(1), truths[2].centres.mean(1), atol=2
    )  # and different places


# ---------------------------------------------------------------------------------------------- ground truth
def test_ground_truth_is_consistent(dataset):
    for vid in video_ids(dataset):
        truth = load_ground_truth(dataset.root, vid)
        O, T, H, W = truth.object_masks.shape
        K = truth.num_sources
        assert (
            (T, H, W) == (16, 112, 112)
            and 2 <= K <= 3
            and O == 2 * K
            and len(set(truth.object_classes.tolist())) == O
        )
        assert truth.object_masks.sum((2, 3)).min() > 80  # every object visible in every frame
        assert not (truth.object_masks.sum(0) > 1).any()  # objects never overlap
        np.testing.assert_array_equal(truth.classes, truth.object_classes[:K])
        np.testing.assert_array_equal(truth.source_masks, truth.object_masks[:K])
        np.testing.assert_array_equal(truth.object_sounds, np.arange(O) < K)
        np.testing.assert_array_equal(truth.sounding, truth.sounding_at(truth.frame_times))
        np.testing.assert_array_equal(truth.sounding_mask.any((1, 2)), truth.sounding >= 0)
        sounding = truth.sounding_object
        for t in range(T):
            assert sounding[t] == (
                list(truth.classes).index(truth.sounding[t]) if truth.sounding[t] >= 0 else -1
            )
            if sounding[t] >= 0:
                np.testing.assert_array_equal(
                    truth.sounding_mask[t], truth.object_masks[sounding[t], t]
                )
        np.testing.assert_array_equal(truth.frame_indices, np.arange(16) * 5)
        starts, ends = truth.segments[:, 1], truth.segments[:, 2]
        assert (np.diff(starts) > 0).all() and (
            starts[1:] >= ends[:-1] + 0.2 - 1e-9
        ).all()  # one source at a time
        assert ((ends - starts) <= 3 + 1e-9).all() and set(truth.segments[:, 0].astype(int)) == set(
            truth.classes.tolist()
        )


def test_decoys_pair_the_sources_ingredients_differently_and_sources_sound_equally_long(dataset):
    """Sources' sounds share no ingredient; the decoys are another pairing of the same ingredients;
    every source sounds equally long."""
    classes = source_classes(10)
    for vid in video_ids(dataset):
        truth = dataset.ground_truth(vid)
        sources, decoys = truth.classes.tolist(), truth.object_classes[truth.num_sources :].tolist()
        assert not set(sources) & set(decoys) and truth.labels == sorted(
            sources
        )  # labels: the sounding classes only
        heard = [i for c in sources for i in classes[c].ingredients]
        paired = [i for c in decoys for i in classes[c].ingredients]
        assert len(set(heard)) == len(heard) and sorted(heard) == sorted(paired), (
            vid,
            sources,
            decoys,
        )
        seconds = [
            sum(end - start for c, start, end in truth.segments if c == source)
            for source in sources
        ]
        np.testing.assert_allclose(seconds, seconds[0], atol=1e-9, err_msg=vid)


def test_a_silent_object_is_exactly_as_active_whenever_a_source_sounds(dataset):
    """Activity: a source is active while it sounds, and so is a silent decoy with the same pulse;
    idle objects are all alike."""
    for vid in video_ids(dataset):
        truth = dataset.ground_truth(vid)
        active = truth.object_active
        sounding = truth.sounding_object
        for t in range(16):
            if sounding[t] < 0:
                assert not active[:, t].any(), (vid, t)  # nothing sounds: nothing is active
                continue
            assert active[sounding[t], t] and active[:, t].sum() == 2, (
                vid,
                t,
            )  # the source and one decoy ...
            decoy = int(np.flatnonzero(active[:, t] & ~truth.object_sounds)[0])
            scale = lambda o: (
                truth.object_radii[o, t] / np.median(truth.object_radii[o])
            )  # ... pulsing alike
            assert scale(decoy) == pytest.approx(scale(sounding[t]), abs=0.005), (vid, t)
        idle = truth.object_radii[~active] / np.repeat(
            np.median(truth.object_radii, 1), (~active).sum(1)
        )
        np.testing.assert_allclose(idle, 1.0, atol=0.03)  # idle: the steady mean size


def _object_stats(frames, truth):
    """Per object and sampled frame: mean brightness (mean of R, G, B) and colourfulness (mean
    spread of R, G, B) of its eroded pixels."""
    O, T = truth.object_masks.shape[:2]
    brightness, colourfulness = np.zeros((O, T)), np.zeros((O, T))
    for o in range(O):
        for t in range(T):
            pixels = frames[t][_erode(truth.object_masks[o, t], 1)]  # (P, 3)
            brightness[o, t] = pixels.mean()
            colourfulness[o, t] = (pixels.max(-1) - pixels.min(-1)).mean()
    return brightness, colourfulness


def test_activity_shows_in_colour_not_in_brightness_in_the_decoded_frames(dataset):
    """An active object is more colourful than it is idle, and as bright; a source and its active
    decoy are both more colourful."""
    for vid in video_ids(dataset):
        truth = dataset.ground_truth(vid)
        frames = (
            read_frames(dataset.video_path(vid), 16).frames.numpy().astype(np.float64)
        )  # (T, H, W, 3) decoded
        brightness, colourfulness = _object_stats(frames, truth)
        for o in range(len(truth.object_classes)):
            on, off = truth.object_active[o], ~truth.object_active[o]
            if not on.any() or not off.any():
                continue
            assert abs(brightness[o, on].mean() - brightness[o, off].mean()) < 4, (
                vid,
                o,
                brightness[o],
            )  # 0..255 units
            assert colourfulness[o, on].min() > 1.8 * colourfulness[o, off].max(), (
                vid,
                o,
                colourfulness[o],
            )


def test_pixel_brightness_does_not_localize_the_sounding_object(dataset):
    """The audio-free brightness control (map = mean of R, G, B of the decoded frame) scores near a
    map of ones, far below a map of the active objects."""
    maps, masks, classes, active_maps, ones = [], [], [], [], []
    for vid in video_ids(dataset):
        truth = dataset.ground_truth(vid)
        frames = read_frames(dataset.video_path(vid), 16).frames.numpy().astype(np.float32)
        for t, o in enumerate(truth.sounding_object):
            if o < 0:
                continue
            maps.append(torch.tensor(frames[t].mean(-1)))
            masks.append(torch.tensor(truth.object_masks[o, t]))
            classes.append(int(truth.sounding[t]))
            ones.append(torch.ones(112, 112))
            active_maps.append(
                torch.tensor(
                    (truth.object_masks[:, t] & truth.object_active[:, t, None, None]).any(0)
                ).float()
            )
    brightness = localization_scores(maps, masks, classes).mAP
    ones_map = localization_scores(ones, masks, classes).mAP
    oracle = localization_scores(active_maps, masks, classes).mAP
    assert 35 < oracle < 65, oracle  # two equally active objects: about half
    assert brightness < ones_map + 6 and brightness < oracle / 4, (brightness, ones_map, oracle)


def _erode(mask, steps):
    out = mask.copy()
    for _ in range(steps):
        out[1:] &= out[:-1].copy()
        out[:-1] &= out[1:].copy()
        out[:, 1:] &= out[:, :-1].copy()
        out[:, :-1] &= out[:, 1:].copy()
    return out


def _dilate(mask, steps):
    return ~_erode(~mask, steps)


def _distance_to_segment(pixels, a, b):
    "Distance of each RGB pixel (..., 3) to the segment of colours from a to b (blends of a texture's two colours)."
    along = np.clip(((pixels - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)[..., None]
    return np.linalg.norm(pixels - (a + along * (b - a)), axis=-1)


def test_masks_cover_the_drawn_objects_in_the_decoded_frames(dataset):
    classes = source_classes(10)
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    for vid in video_ids(dataset):
        truth = dataset.ground_truth(vid)
        clip = load_clip(
            dataset.video_path(vid), num_frames=16, window=256, image_size=112
        )  # the written size
        frames = (
            ((clip.frames * std + mean) * 255).permute(0, 2, 3, 1).numpy()
        )  # (T, H, W, 3) 0..255
        for t in range(16):
            for o, cls in enumerate(truth.object_classes):
                lit = object_colours(classes[cls])[0 if truth.object_active[o, t] else 1] * 255
                distance = _distance_to_segment(
                    frames[t], lit * SHADE, lit
                )  # (H, W) to the texture's colours
                inner = _erode(truth.object_masks[o, t], 1)
                assert (distance[inner] < 50).mean() > 0.85, (vid, t, classes[cls].display_name)
                if truth.object_active[o, t]:  # just outside an active object: not its colours
                    ring = _dilate(truth.object_masks[o, t], 4) & ~_dilate(
                        truth.object_masks[o, t], 1
                    )
                    assert (distance[ring] < 50).mean() < 0.2, (vid, t, classes[cls].display_name)


def _band_energy(fbank, centres_hz):
    "(..., B) mean fbank value in each ingredient band."
    return np.stack(
        [
            fbank[..., (centres_hz >= low) & (centres_hz <= high)].mean(-1)
            for low, high in (part.band_hz for part in sound_ingredients(10))
        ],
        -1,
    )


def _class_excess(band_excess, classes):
    "(..., C) how much each class sounds: the smaller of its two bands' excess over their noise floors."
    return np.stack(
        [np.minimum(*(band_excess[..., i] for i in c.ingredients)) for c in classes], -1
    )


def test_sounding_labels_agree_with_the_audio(dataset):
    classes, centres_hz = source_classes(10), mel_center_frequencies().numpy()
    checked_sound = checked_silence = 0
    for vid in video_ids(dataset):
        truth, path = dataset.ground_truth(vid), dataset.video_path(vid)
        candidates = [classes[c] for c in truth.object_classes]  # sources and decoys
        spectrogram = clip_spectrogram(load_audio(path)).numpy()  # (1024, 128), normalized
        times = np.arange(len(spectrogram)) * 0.01 + 0.0125  # centre of each fbank frame
        real = times < truth.duration - 0.0125  # not the zero padding
        bands = _band_energy(spectrogram, centres_hz)  # (1024, B)
        floor = np.median(
            bands[real & (truth.sounding_at(times) < 0)], 0
        )  # (B,) noise floor per band
        clip = load_clip(path, num_frames=16, window=24)  # short windows: 0.24 s
        for t in range(16):
            start, end = clip.window_bounds[t].tolist()
            labels = truth.sounding_at(times[start:end])
            if (labels != labels[0]).any() or not real[start:end].all():
                continue  # straddles a boundary
            excess = _class_excess(
                _band_energy(clip.audio[t].numpy(), centres_hz).mean(0) - floor, candidates
            )  # (O,)
            if labels[0] >= 0:
                o = list(truth.object_classes).index(labels[0])
                assert excess.argmax() == o and excess[o] - np.delete(excess, o).max() > 0.3, (
                    vid,
                    t,
                    excess,
                )  # never the decoy
                checked_sound += 1
            else:
                assert excess.max() < 0.3, (vid, t, excess)
                checked_silence += 1
    assert checked_sound >= 8 * len(video_ids(dataset)) and checked_silence >= 5, (
        checked_sound,
        checked_silence,
    )


def test_class_sound_helpers_render_what_the_clips_contain(dataset):
    """class_waveform / class_window: deterministic, the class's two bands lit, matching the decoded
    clip's sound of that class."""
    classes, centres_hz = source_classes(10), mel_center_frequencies().numpy()
    wave = class_waveform(6)
    assert wave.shape == (160_000,) and wave.dtype == np.float32 and np.abs(wave).max() <= 1
    np.testing.assert_array_equal(class_waveform(6), wave)
    assert not np.allclose(class_waveform(6, seed=1), wave)
    assert class_waveform(6, seconds=2.5).shape == (40_000,)
    window = class_window(6, window=256).numpy()  # (256, 128) model input
    assert window.shape == (256, 128)
    np.testing.assert_allclose(
        window,
        clip_spectrogram(torch.from_numpy(wave), target_length=1000).numpy()[372:628],
        atol=1e-5,
    )  # the middle
    noise = clip_spectrogram(
        torch.from_numpy(class_waveform(6, gain=0.0)), target_length=1000
    ).numpy()
    floor = _band_energy(noise, centres_hz).mean(0)  # (B,) the noise alone
    excess = _class_excess(_band_energy(window, centres_hz).mean(0) - floor, classes)  # (C,)
    assert excess.argmax() == 6 and excess[6] - np.delete(excess, 6).max() > 0.3, excess
    # the same class inside a decoded clip: its bands stand out as much as in the helper's sound
    truth = dataset.ground_truth('test_00000')
    c = int(truth.segments[0, 0])
    start, end = truth.segments[0, 1:]
    spectrogram = clip_spectrogram(load_audio(dataset.video_path('test_00000'))).numpy()
    silent = (
        spectrogram[: int(truth.segments[0, 1] * 100)][:-3]
        if truth.segments[0, 1] > 0.2
        else spectrogram[990:1000]
    )
    inside = spectrogram[int(start * 100) + 5 : int(end * 100) - 5]
    in_clip = _class_excess(
        _band_energy(inside, centres_hz).mean(0) - _band_energy(silent, centres_hz).mean(0), classes
    )
    helper = _class_excess(
        _band_energy(class_window(c, window=len(inside)).numpy(), centres_hz).mean(0) - floor,
        classes,
    )
    assert in_clip.argmax() == helper.argmax() == c and abs(in_clip[c] - helper[c]) < 1.0, (
        in_clip,
        helper,
    )
    with pytest.raises(ValueError, match='class_index'):
        class_waveform(10)
    with pytest.raises(ValueError, match='window'):
        class_window(0, window=5000)


# ---------------------------------------------------------------------------------------------- caching, errors, CLI
def test_default_synthetic_is_cached_and_regenerated_when_parameters_change(tmp_path):
    root = tmp_path / 'cached'
    assert default_synthetic(root, num_train=2, num_test=1) == root.resolve()
    marker = (root / COMPLETE_FILE).stat().st_mtime_ns
    start = time.perf_counter()
    default_synthetic(root, num_train=2, num_test=1)
    assert (
        root / COMPLETE_FILE
    ).stat().st_mtime_ns == marker and time.perf_counter() - start < 0.5  # reused
    default_synthetic(root, num_train=2, num_test=1, seed=3, force=True)  # new seed: regenerated
    assert SyntheticDataset.from_root(root).seed == 3
    (root / COMPLETE_FILE).unlink()  # an incomplete set is never reused
    default_synthetic(root, num_train=2, num_test=1, seed=3)
    assert (root / COMPLETE_FILE).exists()
    live = partial_path(root).name  # this host's name, this process
    stale = tmp_path / live.replace(
        f'-{os.getpid()}-', '-999999999-'
    )  # left by a killed run (no such process)
    elsewhere = (
        tmp_path / f'.cached.other_host-{os.getpid()}-0123abcd.partial'
    )  # another machine's writer
    elsewhere.mkdir()
    (stale / 'videos').mkdir(parents=True)
    default_synthetic(root, num_train=1, num_test=1, seed=3, force=True)
    assert not stale.exists() and SyntheticDataset.from_root(root).num_train == 1
    assert elsewhere.exists()  # never another host's
    assert sorted(p.name for p in (root / 'videos').iterdir()) == [
        'test_00000.mp4',
        'train_00000.mp4',
    ]  # the old set's extra clip is gone


def test_other_parameters_are_refused_and_user_files_survive(tmp_path):
    """Rerunning on the same folder with another parameter never deletes anything without force, and
    force removes only the set's files."""
    root = tmp_path / 'mine'
    default_synthetic(root, num_train=2, num_test=1)
    user_files = {
        'notes.txt': 'my notes',
        'videos/holiday.mp4': 'not a generated clip',
        'ground_truth/labels_v2.csv': 'a,b',
    }
    for name, text in user_files.items():
        (root / name).write_text(text)
    before = {p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()}
    with pytest.raises(FileExistsError) as refused:
        default_synthetic(root, num_train=3, num_test=1, seed=1)
    message = str(refused.value)
    assert (
        str(root.resolve()) in message
        and 'num_train: 2 -> 3' in message
        and 'seed: 0 -> 1' in message
        and 'force' in message
    )
    assert {
        p: p.stat().st_mtime_ns for p in root.rglob('*') if p.is_file()
    } == before  # nothing touched
    assert (
        default_synthetic(root, num_train=2, num_test=1) == root.resolve()
    )  # same parameters: reused
    default_synthetic(root, num_train=1, num_test=2, seed=1, force=True)
    for name, text in user_files.items():
        assert (root / name).read_text() == text, name
    data = SyntheticDataset.from_root(root)
    assert (data.num_train, data.num_test, data.seed) == (1, 2, 1)
    generated = sorted(p.name for p in (root / 'videos').glob('*_0*.mp4'))
    assert generated == ['test_00000.mp4', 'test_00001.mp4', 'train_00000.mp4']
    assert not list(tmp_path.glob('.mine.*partial*')) and not list(tmp_path.glob('.mine.old*'))
    # make_synthetic(overwrite=True) keeps them too; a set written before manifests existed is known
    # from its params.json
    (root / 'MANIFEST.json').unlink()
    make_synthetic(root, 1, 1, seed=2, workers=1, overwrite=True)
    for name, text in user_files.items():
        assert (root / name).read_text() == text, name
    assert sorted(p.name for p in (root / 'videos').glob('t*.mp4')) == [
        'test_00000.mp4',
        'train_00000.mp4',
    ]


def test_cli_refuses_other_parameters_on_the_same_root(tmp_path, capsys):
    root = tmp_path / 'cli'
    assert (
        synthetic_cli(['--root', str(root), '--num-train', '1', '--num-test', '1', '--quiet']) == 0
    )
    (root / 'keep.txt').write_text('x')
    with pytest.raises(SystemExit) as exit_:
        synthetic_cli(['--root', str(root), '--num-train', '2', '--num-test', '1', '--quiet'])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and str(root.resolve()) in err
        and 'num_train: 1 -> 2' in err
        and '--force' in err
    )
    assert (
        synthetic_cli(
            ['--root', str(root), '--num-train', '2', '--num-test', '1', '--quiet', '--force']
        )
        == 0
    )
    assert (root / 'keep.txt').read_text() == 'x' and SyntheticDataset.from_root(
        root
    ).num_train == 2


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('disk full')
        return original(*args, **kwargs)

    original = synthetic.write_mp4
    monkeypatch.setattr(synthetic, 'write_mp4', failing_write)
    with pytest.raises(RuntimeError, match='disk full'):
        make_synthetic(tmp_path / 'broken', 3, 0, workers=1)
    assert list(tmp_path.iterdir()) == []  # neither the set nor a partial folder


def test_bad_input_is_refused_with_a_reason(dataset, tmp_path):
    with pytest.raises(ValueError, match='num_classes'):
        source_classes(1)
    with pytest.raises(ValueError, match='num_classes'):
        SyntheticConfig(num_classes=13)
    with pytest.raises(ValueError, match='image_size'):
        SyntheticConfig(image_size=111)
    with pytest.raises(ValueError, match='decoys_per_source'):
        SyntheticConfig(decoys_per_source=3)
    with pytest.raises(ValueError, match='at least 4 classes'):
        SyntheticConfig(num_classes=3)  # 2 sources + 2 decoys
    with pytest.raises(ValueError, match='without a shared ingredient'):
        SyntheticConfig(max_sources=3)  # 3 disjoint pairs: 6 ingredients
    with pytest.raises(ValueError, match='at least one clip'):
        make_synthetic(tmp_path / 'empty', 0, 0)
    with pytest.raises(ValueError, match='num_train'):
        make_synthetic(tmp_path / 'negative', -1, 2)
    with pytest.raises(FileExistsError, match='already exists'):
        make_synthetic(dataset.root, 1, 1)
    precious = tmp_path / 'precious'
    precious.mkdir()
    (precious / 'thesis.tex').write_text('...')
    with pytest.raises(FileExistsError, match='not a synthetic data set'):
        make_synthetic(precious, 1, 1, overwrite=True)
    with pytest.raises(FileExistsError, match='not a synthetic data set'):
        default_synthetic(precious, 1, 1)
    assert (precious / 'thesis.tex').exists()
    with pytest.raises(FileNotFoundError, match="no ground truth for video 'test_09999'"):
        load_ground_truth(dataset.root, 'test_09999')
    with pytest.raises(FileNotFoundError, match='not a complete synthetic data set'):
        SyntheticDataset.from_root(tmp_path)


def test_cli(tmp_path, capsys):
    command = shutil.which('cavmae-sync-synthetic')
    args = ['--root', str(tmp_path / 'cli'), '--num-train', '2', '--num-test', '1', '--quiet']
    if command is not None:  # the installed console script
        result = subprocess.run([command, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        bad = subprocess.run(
            [command, *args, '--num-classes', '20'], capture_output=True, text=True, timeout=60
        )
        assert bad.returncode == 2 and 'num_classes' in bad.stderr
    else:
        assert synthetic_cli(args) == 0
        summary = json.loads(capsys.readouterr().out)
    assert (
        summary['num_train'] == 2
        and summary['num_test'] == 1
        and Path(summary['test_datafile']).exists()
    )
    assert len(read_datafile(summary['train_datafile'])) == 2


def test_loosely_coupled_decoys_are_sometimes_idle_while_their_source_sounds():
    "decoy_coupling < 1: a decoy is active in only some of its source's segments; everything else is drawn as in v2."
    loose = SyntheticConfig(decoy_coupling=0.3)
    times = np.arange(loose.num_video_frames) / loose.fps
    idle = []
    for index in range(30):
        strict, scene = (
            sample_scene(SyntheticConfig(), 'train', index),
            sample_scene(loose, 'train', index),
        )
        active, coupled = scene.active(times), strict.active(times)  # (O, N)
        sources = scene.num_sources
        assert (active[:sources] == coupled[:sources]).all() and (active <= coupled).all()
        np.testing.assert_array_equal(scene.segments, strict.segments)
        idle.append(scene.decoy_off[sources:].mean())
    assert 0.6 < np.mean(idle) < 0.8, np.mean(idle)  # idle in about 70% of segments
    assert 'decoy_coupling' not in SyntheticConfig().to_dict()  # version-2 identities unchanged
    with pytest.raises(ValueError, match='decoy_coupling'):
        SyntheticConfig(decoy_coupling=-0.1)
