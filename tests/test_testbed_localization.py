"""Testbed localization: the prompted frames leave no audio-free shortcut, a map that follows the sound scores high,
and a model is scored end to end through the ADE20K Sound path."""

import numpy as np
import pytest
import torch

from cavmae_sync.claims import localization_claim
from cavmae_sync.config import PreprocessConfig
from cavmae_sync.localization import LocalizationMaps, localization_maps
from cavmae_sync.model import CAVMAESync, tiny
from cavmae_sync.synthetic import make_synthetic
from cavmae_sync.testbed_localization import (
    localization_evidence,
    localization_table,
    peak_counts,
    prompted_set,
    sound_averaged_maps,
)
from cavmae_sync.testbed_prompts import prompted_frame

CONFIG = PreprocessConfig(num_frames=4, window=256, image_size=96)


@pytest.fixture(scope='module')
def prompted(tmp_path_factory):
    testbed = make_synthetic(
        tmp_path_factory.mktemp('prompts') / 'set', num_train=0, num_test=6, workers=1
    )
    return prompted_set(testbed.root, CONFIG)


def as_maps(maps, prompted):
    return LocalizationMaps(
        maps, prompted.masks, list(prompted.table['ade_class_id']), prompted.class_names
    )


def test_every_object_of_a_prompted_frame_is_drawn_equally_active():
    "No object stands out by colour or brightness: every object's lit pixels have the same brightness and full colour."
    from cavmae_sync.synthetic_classes import object_colours, source_classes
    from cavmae_sync.synthetic_scenes import SyntheticConfig, sample_scene

    config = SyntheticConfig()
    for index in range(3):
        shown = prompted_frame(config, index, 7)
        scene = sample_scene(config, 'test', index)
        assert len(shown.object_masks) == len(scene.classes) == 4 and shown.num_sources == 2
        brightness = [
            np.percentile(shown.image[m].astype(float).mean(1), 90) for m in shown.object_masks
        ]
        assert np.ptp(brightness) <= 2, brightness
        # the active colour, not the idle one
        for mask, c in zip(shown.object_masks, shown.object_classes):
            active = object_colours(source_classes(config.num_classes)[c])[0] * 255
            lit = shown.image[mask].astype(float)
            assert np.abs(lit - active).sum(1).min() < 4, (c, active)


def test_no_audio_free_map_finds_the_prompted_object(prompted):
    "An audio-free map peaks at the same place for every prompt of an image: 1 in `objects` of its on-object peaks."
    rng = torch.Generator().manual_seed(0)
    image_noise = torch.rand(
        (int(prompted.images.max()) + 1, *prompted.masks.shape[1:]), generator=rng
    )
    per_prompt_noise = image_noise[torch.from_numpy(prompted.images)]
    salient = prompted.any_object.float() + 0.5 * per_prompt_noise  # every object, no sound
    for maps in (prompted.brightness, salient):
        peaks = peak_counts(maps, prompted)
        assert peaks.prompted_share == pytest.approx(25.0) and peaks.pointing <= 25.0 + 1e-9
        evidence = localization_evidence('audio-free', as_maps(maps, prompted), prompted)
        assert not evidence.swap.passed and not evidence.controls_passed
        assert evidence.common_share == pytest.approx(100.0)


def test_a_map_that_follows_the_prompted_sound_scores_high(prompted):
    "The prompted object's mask (plus noise) as the map: pointing and share 100%, mAP near 100, every control passed."
    noise = 0.2 * torch.rand(prompted.masks.shape, generator=torch.Generator().manual_seed(1))
    follows = as_maps(prompted.masks.float() + noise, prompted)
    table = localization_table({'follows': follows}, prompted).set_index('model')
    assert (
        table.loc['follows', 'pointing_accuracy'] == 100
        and table.loc['follows', 'prompted_share'] == 100
    )
    assert (
        table.loc['follows', 'mAP'] > 95
        and table.loc['brightness (audio-free control)', 'mAP'] < 50
    )
    evidence = localization_evidence('follows', follows, prompted)
    assert evidence.controls_passed and evidence.swap.passed and evidence.common_share < 40
    # against a model that only sees saliency: the claim is judged, and the saliency model is named as failing
    saliency = as_maps(sound_averaged_maps(follows.maps, prompted.images), prompted)
    deaf = localization_evidence('saliency', saliency, prompted)
    verdict = localization_claim('c', evidence, deaf)
    assert verdict.outcome == 'no verdict' and 'saliency fails its control' in verdict.headline


def test_a_model_maps_the_prompts_through_the_ade20k_sound_path(prompted):
    "An untrained tiny model: one map per prompt at the masks' size, its masks those of the prompted set."
    torch.manual_seed(0)
    model = CAVMAESync(tiny()).eval()
    config = model.config.preprocess_config()
    maps = localization_maps(model, prompted.for_model(config), batch_size=8, progress=False)
    assert maps.maps.shape == prompted.masks.shape and torch.equal(maps.masks, prompted.masks)
    # the same prompt's map does not depend on which other prompts share its image (each image is encoded once)
    single = prompted.for_model(config)
    single.table = single.table.iloc[[5]].reset_index(drop=True)
    alone = localization_maps(model, single, progress=False).maps[0]
    assert torch.allclose(alone, maps.maps[5], atol=1e-5)
    evidence = localization_evidence('untrained', maps, prompted)
    assert evidence.hits.shape == (len(prompted),) and 0 <= evidence.swap.share <= 100


def test_peak_relations_sort_peaks_by_the_played_objects_pair(prompted):
    "Peaks on the played object, on its partner (the source/decoy active with it), on the other pair, or on none."
    from cavmae_sync.testbed_localization import peak_relations

    partner_rows = []
    for i in range(len(prompted)):  # a map that peaks on the played object's partner
        same = np.flatnonzero(prompted.images == prompted.images[i])
        follows = prompted.table['follows'].to_numpy()
        partner = [j for j in same if j != i and follows[j] == follows[i]]
        partner_rows.append(partner[0])
    noise = 0.01 * torch.rand(prompted.masks.shape, generator=torch.Generator().manual_seed(2))
    on_partner = prompted.masks[partner_rows].float() + noise
    relations = peak_relations(on_partner, prompted)
    assert (
        relations.partner == pytest.approx(100.0)
        and relations.prompted == 0
        and relations.other == 0
    )
