"""Localization: maps against the definition, the ADE20K Sound scoring on hand-made cases, the
loader on a fake set, the viewer."""

from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use('Agg')
import numpy as np
import pandas as pd
import pytest
import soundfile
import torch
import torch.nn.functional as F
from PIL import Image

from cavmae_sync.config import PreprocessConfig, MediaError
from cavmae_sync.metrics import best_iou
from cavmae_sync.localization import (
    similarity_maps,
    localization_scores,
    ADE20KSound,
    ade20k_class_map,
    localization_maps,
    evaluate_localization,
    overlay,
    to_image,
    clip_similarity_maps,
    LocalizationViewer,
    ADE20K_SOUND_FOLDER,
)


def test_similarity_maps_match_per_patch_cosine():
    gen = torch.Generator().manual_seed(0)
    audio, tokens = torch.randn(3, 8, generator=gen), torch.randn(3, 12, 8, generator=gen)
    maps = similarity_maps(audio, tokens, grid=(3, 4))
    for b in range(3):
        for n in range(12):
            assert torch.isclose(
                maps[b, n // 4, n % 4],
                F.cosine_similarity(audio[b], tokens[b, n], dim=0),
                atol=1e-6,
            )
    up = similarity_maps(audio, tokens, grid=(3, 4), size=(30, 40))
    torch.testing.assert_close(
        up, F.interpolate(maps[:, None], size=(30, 40), mode='bilinear', align_corners=False)[:, 0]
    )
    assert similarity_maps(audio, tokens[:, :9]).shape == (3, 3, 3)  # square grid inferred
    with pytest.raises(ValueError, match='square'):
        similarity_maps(audio, tokens)
    with pytest.raises(ValueError):
        similarity_maps(audio[:2], tokens, grid=(3, 4))


def test_perfect_and_inverted_maps():
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(10, 10, generator=gen) < 0.4 for _ in range(5)]
    classes = [1, 1, 2, 2, 3]
    perfect = localization_scores([m.float() for m in masks], masks, classes)
    assert np.isclose(perfect.mAP, 100) and np.isclose(perfect.mIoU, 100)
    inverted = localization_scores([1 - m.float() for m in masks], masks, classes)
    assert inverted.mAP < 50 and inverted.mIoU < 1e-9
    assert len(perfect.per_class) == 3 and list(perfect.per_class['images']) == [2, 2, 1]


def test_hand_computed_case():
    maps = [
        torch.tensor([[0.0, 0.5], [1.0, 0.25]]),
        torch.tensor([[0.75, 0.0], [0.0, 0.0]]),
        torch.tensor([[0.2, 0.4], [0.6, 0.8]]),
    ]
    masks = [
        torch.tensor([[0, 1], [1, 0]]),
        torch.tensor([[0, 0], [0, 1]]),
        torch.tensor([[0, 0], [1, 1]]),
    ]
    result = localization_scores(maps, masks, ['a', 'a', 'b'], class_names={'a': 'dog'})
    table = result.per_class.set_index('class')
    assert np.isclose(table.loc['a', 'ap'], 49 / 72 * 100) and np.isclose(table.loc['a', 'iou'], 50)
    assert np.isclose(table.loc['b', 'ap'], 100) and np.isclose(table.loc['b', 'iou'], 100)
    assert np.isclose(result.mAP, (49 / 72 + 1) / 2 * 100) and np.isclose(result.mIoU, 75)
    assert table.loc['a', 'name'] == 'dog' and table.loc['a', 'positive_pixels'] == 3


def test_normalization_is_over_the_whole_set_not_per_image():
    "Per-image min-max would lift image 1's faint map to the same range as image 0's; over the set it stays faint."
    maps = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.1]])]
    masks = [torch.tensor([[0, 1]]), torch.tensor([[1, 0]])]
    pooled = localization_scores(maps, masks, [5, 5]).per_class.iloc[0]
    # pooled values (0, 1, 0, .1), positives at 1 and the first 0: thresholds from 0 to 1
    assert np.isclose(pooled['ap'], (1 + 2 / 4) / 2 * 100)
    per_image = localization_scores([m / m.max() for m in maps], masks, [5, 5]).per_class.iloc[0]
    assert not np.isclose(per_image['ap'], pooled['ap'])


def test_scoring_errors_and_empty_classes():
    with pytest.raises(ValueError, match='upsample'):
        localization_scores([torch.zeros(14, 14)], [torch.zeros(28, 28)], [1])
    with pytest.raises(ValueError, match='one mask'):
        localization_scores([torch.zeros(2, 2)], [torch.zeros(2, 2)], [1, 2])
    with pytest.raises(ValueError, match='NaN'):
        localization_scores([torch.full((2, 2), float('nan'))], [torch.ones(2, 2)], [1])
    result = localization_scores(
        [torch.rand(2, 2), torch.rand(2, 2)], [torch.ones(2, 2), torch.zeros(2, 2)], [1, 2]
    )
    assert (
        result.empty_classes == [2] and result.excluded_classes == [] and not np.isnan(result.mAP)
    )
    result = localization_scores(
        [torch.rand(2, 2), torch.rand(2, 2)],
        [torch.ones(2, 2), torch.zeros(2, 2)],
        [1, 2],
        empty_classes='exclude',
    )
    assert result.excluded_classes == [2] and not np.isnan(result.mAP)
    for rule in ('zero', 'exclude'):
        with pytest.raises(ValueError, match='no mask'):
            localization_scores([torch.rand(2, 2)], [torch.zeros(2, 2)], [1], empty_classes=rule)
    with pytest.raises(ValueError, match='empty_classes must be one of'):
        localization_scores([torch.rand(2, 2)], [torch.ones(2, 2)], [1], empty_classes='drop')


def test_empty_classes_count_zero_as_denseav_hand_computed():
    "The hand-computed case plus class 'c', whose only mask is empty (and 'd', whose two masks are)."
    maps = [
        torch.tensor([[0.0, 0.5], [1.0, 0.25]]),
        torch.tensor([[0.75, 0.0], [0.0, 0.0]]),
        torch.tensor([[0.2, 0.4], [0.6, 0.8]]),
        torch.tensor([[0.9, 0.1], [0.3, 0.3]]),
        torch.tensor([[1.0, 1.0], [0.0, 0.5]]),
        torch.tensor([[0.4, 0.4], [0.4, 0.4]]),
    ]
    masks = [
        torch.tensor([[0, 1], [1, 0]]),
        torch.tensor([[0, 0], [0, 1]]),
        torch.tensor([[0, 0], [1, 1]]),
        torch.zeros(2, 2),
        torch.zeros(2, 2),
        torch.zeros(2, 2),
    ]
    classes = ['a', 'a', 'b', 'c', 'd', 'd']
    denseav = localization_scores(maps, masks, classes)  # default: DenseAV's rule
    assert denseav.empty_classes == ['c', 'd'] and denseav.empty_classes_rule == 'zero'
    assert np.isclose(denseav.mAP, (49 / 72 + 1 + 0 + 0) / 4 * 100) and np.isclose(
        denseav.mIoU, (0.5 + 1 + 0 + 0) / 4 * 100
    )
    table = denseav.per_class.set_index('class')
    assert (
        table.loc['c', 'ap'] == table.loc['d', 'iou'] == 0
        and table.loc['d', 'positive_pixels'] == 0
    )
    assert 'counted as AP 0 and IoU 0' in repr(denseav)
    excluded = localization_scores(
        maps, masks, classes, empty_classes='exclude'
    )  # the earlier rule, as an option
    assert excluded.excluded_classes == ['c', 'd']
    assert (
        np.isclose(excluded.mAP, (49 / 72 + 1) / 2 * 100)
        and np.isclose(excluded.mIoU, 75)
        and 'left out' in repr(excluded)
    )
    # an empty class's IoU is 0 under DenseAV's thresholding too: every threshold has intersection 0
    assert best_iou(torch.tensor([0.9, 0.1, 0.3, 0.3]), torch.zeros(4, dtype=torch.bool))[0] == 0.0


def write_ade20k_sound(root, classes=((300, 'dog'), (1020, 'car')), per_class=2, size=(64, 48)):
    "The assumed DenseAV layout: prompted_segmentation.csv, frames/, annotations/ (full-ontology RGB), audio/."
    root = Path(root)
    for sub in ('frames/validation', 'annotations/validation', 'audio'):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows, rng = [], np.random.default_rng(0)
    for k, (class_id, name) in enumerate(classes):
        t = np.arange(16000 * 2) / 16000
        soundfile.write(
            root / 'audio' / f'{name}_000030.flac',
            0.2 * np.sin(2 * np.pi * 300 * (k + 1) * t),
            16000,
        )
        for j in range(per_class):
            w, h = size
            image = np.zeros((h, w, 3), np.uint8)
            segmentation = np.zeros((h, w, 3), np.uint8)
            segmentation[..., 0], segmentation[..., 1] = (
                10 * (2978 // 256),
                2978 % 256,
            )  # background: another class
            top, left = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            box = (slice(top, top + h // 2), slice(left, left + w // 3))
            image[box] = 255  # the object is white
            segmentation[box[0], box[1], 0] = 10 * (class_id // 256) + 7
            segmentation[box[0], box[1], 1] = class_id % 256
            location = f'validation/ADE_val_{k}{j}.jpg'
            Image.fromarray(image).save(root / 'frames' / location, quality=100)
            Image.fromarray(segmentation).save(
                root / 'annotations' / location.replace('.jpg', '_seg.png')
            )
            rows.append(
                {
                    'image_location': location,
                    'ade_class_id': class_id,
                    'ade_class_name': name,
                    'vggsound_file': f'/data/vggsound/{name}_000030.flac',
                }
            )
    rows.append(
        {
            'image_location': rows[0]['image_location'],
            'ade_class_id': 0,
            'ade_class_name': '-',
            'vggsound_file': rows[0]['vggsound_file'],
        }
    )
    rows.append(
        {
            'image_location': rows[0]['image_location'],
            'ade_class_id': 300,
            'ade_class_name': 'dog',
            'vggsound_file': None,
        }
    )
    pd.DataFrame(rows).to_csv(root / 'prompted_segmentation.csv', index=False)
    return root


def test_ade20k_class_decoding():
    rgb = np.array([[[0, 0, 0], [10, 44, 3], [119, 255, 1], [9, 1, 0]]], np.uint8)
    assert ade20k_class_map(rgb).tolist() == [[0, 256 + 44, 11 * 256 + 255, 1]]


def test_ade20k_sound_loader(tmp_path):
    write_ade20k_sound(tmp_path / ADE20K_SOUND_FOLDER)
    config = PreprocessConfig(num_frames=3, window=96, image_size=32)
    data = ADE20KSound(tmp_path, config=config)  # parent folder accepted
    assert (
        len(data) == 4 and data.num_dropped == 2 and data.class_names == {300: 'dog', 1020: 'car'}
    )
    item = data[2]
    assert (
        item['class_id'] == 1020
        and item['frame'].shape == (3, 32, 32)
        and item['audio'].shape == (3, 96, 128)
    )
    assert item['mask'].dtype == torch.bool and item['mask'].shape == (32, 32)
    # geometry: the mask covers the white object of the (identically resized and cropped) frame
    brightness = to_image(item['frame']).mean(-1)
    inside, outside = brightness[item['mask'].numpy()], brightness[~item['mask'].numpy()]
    assert inside.mean() > 0.9 and outside.mean() < 0.1 and item['mask'].float().mean() > 0.05
    assert data.audio_path(0).name == 'dog_000030.flac'


def test_mask_resize_rules_match_their_references(tmp_path):
    "PIL nearest (DenseAV's default) against Pillow's own resize; nearest-exact against floor((x + 0.5) * scale)."
    root = write_ade20k_sound(tmp_path / 'stripes')
    stripes = np.zeros((256, 320, 3), np.uint8)  # 1-pixel columns of class 44, other class between
    stripes[:, ::2, 1] = 44
    stripes[:, 1::2, 1] = 45
    location = pd.read_csv(root / 'prompted_segmentation.csv')['image_location'][0]
    Image.fromarray(stripes).save(root / 'annotations' / location.replace('.jpg', '_seg.png'))
    table = pd.read_csv(root / 'prompted_segmentation.csv')
    table.loc[0, 'ade_class_id'] = 44
    table.to_csv(root / 'prompted_segmentation.csv', index=False)
    config = PreprocessConfig(num_frames=2, window=96, image_size=224)
    pil_mask = ADE20KSound(root, config=config).load_mask(0)
    exact_mask = ADE20KSound(root, config=config, mask_resize='nearest_exact').load_mask(0)
    # 256 x 320 -> short side 224: 224 x 280 (torchvision: int(224 * 320 / 256)), then the centre 224 columns (from 28)
    resized = (
        np.asarray(Image.fromarray(stripes).resize((280, 224), Image.NEAREST))[:, 28 : 28 + 224, 1]
        == 44
    )
    assert np.array_equal(pil_mask.numpy(), resized)
    columns = np.floor((np.arange(280) + 0.5) * 320 / 280).astype(int)[28 : 28 + 224]
    assert np.array_equal(exact_mask.numpy(), np.broadcast_to(columns % 2 == 0, (224, 224)))
    assert 0 < (pil_mask != exact_mask).float().mean() < 0.5  # the two rules really differ here
    with pytest.raises(ValueError, match='mask_resize must be one of'):
        ADE20KSound(root, config=config, mask_resize='bilinear')


def test_ade20k_sound_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='prompted_segmentation.csv'):
        ADE20KSound(tmp_path)
    root = write_ade20k_sound(tmp_path / 'a')
    pd.read_csv(root / 'prompted_segmentation.csv').drop(columns=['vggsound_file']).to_csv(
        root / 'prompted_segmentation.csv', index=False
    )
    with pytest.raises(ValueError, match=r"missing column\(s\) \['vggsound_file'\]"):
        ADE20KSound(root)
    root = write_ade20k_sound(tmp_path / 'b')
    (root / 'annotations' / 'validation' / 'ADE_val_11_seg.png').unlink()
    with pytest.raises(FileNotFoundError, match='1 segmentations missing.*ADE_val_11_seg.png'):
        ADE20KSound(root)
    root = write_ade20k_sound(tmp_path / 'c')
    (root / 'frames' / 'validation' / 'ADE_val_00.jpg').write_bytes(b'not a jpeg')
    data = ADE20KSound(root, config=PreprocessConfig(num_frames=2, window=96, image_size=32))
    with pytest.raises(MediaError, match='ADE_val_00.jpg'):
        data[0]


def test_evaluate_localization_end_to_end(tmp_path):
    from cavmae_sync.model import CAVMAESync, tiny

    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=2))
    c = model.config
    data = ADE20KSound(
        write_ade20k_sound(tmp_path),
        config=PreprocessConfig(num_frames=2, window=c.audio_length, image_size=c.image_size),
    )
    evaluated = localization_maps(model, data, batch_size=3, progress=False)
    assert evaluated.maps.shape == (4, c.image_size, c.image_size) and evaluated.classes == [
        300,
        300,
        1020,
        1020,
    ]
    # the map of prompt 1 is its audio embedding (mean of its normalized window embeddings) against its patch tokens
    item = data[1]
    with torch.no_grad():
        audio = F.normalize(model.eval().encode_audio(item['audio']).embedding, dim=-1).mean(
            0, keepdim=True
        )
        tokens = model.encode_video(item['frame'][None]).tokens
    expected = similarity_maps(audio, tokens, size=(c.image_size, c.image_size))[0]
    torch.testing.assert_close(evaluated.maps[1], expected, rtol=1e-4, atol=1e-5)
    result = evaluate_localization(model, data, progress=False)
    assert 0 <= result.mAP <= 100 and 0 <= result.mIoU <= 100 and len(result.per_class) == 2
    same = evaluate_localization(
        model, data, progress=False, precision='bf16', empty_classes='exclude'
    )  # CPU: fp32 either way
    assert same.mAP == result.mAP and same.mIoU == result.mIoU
    with pytest.raises(ValueError, match='precision'):
        localization_maps(model, data, progress=False, precision='fp64')


def test_overlay_and_viewer():
    from cavmae_sync.model import CAVMAESync, tiny

    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=3))
    c = model.config
    clip = SimpleNamespace(
        frames=torch.randn(3, 3, c.image_size, c.image_size),
        audio=torch.randn(3, c.audio_length, c.num_mel_bins),
        frame_times=torch.tensor([1.0, 5.0, 9.0]),
        video_id='x',
        path='x.mp4',
    )
    maps = clip_similarity_maps(model, clip.frames, clip.audio)
    assert maps.shape == (3, c.image_size, c.image_size) and maps.abs().max() <= 1 + 1e-5
    ax = overlay(clip.frames[0], maps[0][:6, :6])
    assert len(ax.images) == 2
    viewer = LocalizationViewer(clip, model)
    torch.testing.assert_close(viewer.maps, maps)
    first = viewer.image.value
    viewer.slider.value = 2
    assert (
        viewer.current == 2 and viewer.image.value[:4] == b'\x89PNG' and viewer.image.value != first
    )
    viewer.update(1)
    assert viewer.slider.value == 1
    with pytest.raises(IndexError):
        viewer.update(3)
    with pytest.raises(ValueError, match='model'):
        LocalizationViewer(clip)
