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


# ---------------------------------------------------------------------------------------------- verdicts on hand-made tables
from cavmae_sync.reproduce import (CLASSIFICATION_HEADLINES, LOCALIZATION_HEADLINES, RETRIEVAL_HEADLINES, ablation_claim,
                                   above_chance, cache_lock, classification_verdict, gap_direction, in_test, localization_verdict,
                                   quick_sizes, retrieval_verdict)
import pandas as pd


def retrieval_table(sync, cavmae, low, clips=200):
    "One row per direction, as retrieval.ipynb writes retrieval_verdict.csv."
    sync, cavmae = np.asarray(sync, float), np.asarray(cavmae, float)
    return pd.DataFrame({'direction': ['audio_to_video', 'video_to_audio'], 'sync R@1': sync, 'cavmae R@1': cavmae,
                         'clips': clips, 'gain': sync - cavmae, 'gain 95% low': low, 'gain 95% high': sync - cavmae + 5})


@pytest.mark.parametrize('sync, cavmae, low, outcome, sentence', [
    ([17.0, 67.0], [0.5, 0.5], [11.0, 60.0], 'held',
     "**The paper's claim held on the testbed**: CAV-MAE Sync retrieves better than CAV-MAE in both directions, and the gap is "
     "larger than the bootstrap noise."),
    ([17.0, 8.0], [0.5, 6.0], [11.0, -1.0], 'held weakly',
     "**The paper's claim held only weakly on the testbed**: CAV-MAE Sync is ahead in both directions, but the bootstrap interval "
     "of at least one gap includes zero."),
    ([17.0, 5.0], [0.5, 6.0], [11.0, -6.0], 'did not hold',
     "**The paper's claim did not hold on the testbed**: CAV-MAE Sync is not ahead of CAV-MAE in both directions."),
    ([0.5, 67.0], [17.0, 0.5], [-20.0, 60.0], 'did not hold',                  # ahead in one direction only
     "**The paper's claim did not hold on the testbed**: CAV-MAE Sync is not ahead of CAV-MAE in both directions."),
    ([1.5, 1.0], [0.5, 0.0], [-1.0, -0.5], 'no verdict',                       # 3 and 2 hits of 200 where 1 is expected: both at chance
     "**No verdict on the testbed**: neither CAV-MAE Sync nor CAV-MAE retrieves above chance in either direction, so the gap "
     "between them is noise; give both a longer budget (-p train_minutes ...)."),
])
def test_retrieval_verdict(sync, cavmae, low, outcome, sentence):
    verdict = retrieval_verdict(retrieval_table(sync, cavmae, low))
    assert verdict.outcome == outcome and verdict.headline == sentence
    if outcome in ('held', 'held weakly'):                                     # the same numbers with the models swapped never hold
        assert retrieval_verdict(retrieval_table(cavmae, sync, [-g for g in low])).outcome == 'did not hold'


def test_retrieval_verdict_needs_its_columns():
    with pytest.raises(ValueError, match='clips'): retrieval_verdict(retrieval_table([1, 1], [1, 1], [0, 0]).drop(columns='clips'))


def test_above_chance_is_a_binomial_test():
    # 200 queries, chance 1/200: 4 hits (P = 0.019 by chance) are above chance, 3 (P = 0.080) are not
    assert above_chance(2.0, 200, 0.5) and not above_chance(1.5, 200, 0.5)
    assert not above_chance(0.0, 12, 100 / 12) and not above_chance(100 / 12, 12, 100 / 12)
    assert above_chance(100 * 4 / 12, 12, 100 / 12) and not above_chance(100 * 3 / 12, 12, 100 / 12)
    with pytest.raises(ValueError, match='n=0'): above_chance(10.0, 0, 1.0)


def test_classification_verdict():
    runs = pd.DataFrame({'model': ['CAV-MAE Sync (tiny)', 'CAV-MAE (tiny)', 'random init (tiny)'] * 2,
                         'method': ['linear_probe'] * 3 + ['finetune'] * 3, 'metric': [100.0, 98.2, 94.1, 90.8, 58.6, np.nan]})
    held = classification_verdict(runs)
    assert held.outcome == 'held' and held.headline == ("**The paper's claim held on the testbed**: CAV-MAE Sync classified better "
                                                        "than CAV-MAE in every protocol run here.")
    partly = classification_verdict(runs.assign(metric=[100.0, 98.2, 94.1, 50.0, 58.6, np.nan]))
    assert partly.outcome == 'held partly' and partly.headline == CLASSIFICATION_HEADLINES['held partly']
    assert partly.headline.startswith("**The paper's claim held only partly on the testbed**")
    reversed_ = classification_verdict(runs.assign(metric=[98.2, 100.0, 94.1, 58.6, 90.8, np.nan]))
    assert reversed_.outcome == 'did not hold' and reversed_.headline.startswith("**The paper's claim did not hold on the testbed**")
    with pytest.raises(ValueError, match="rows of 'CAV-MAE Sync"): classification_verdict(runs[runs['model'] != 'CAV-MAE Sync (tiny)'])


def localization_table(sync, cavmae, low, chance=(3.6, 3.6, 2.0)):
    sync, cavmae = np.asarray(sync, float), np.asarray(cavmae, float)
    return pd.DataFrame({'metric': ['mAP', 'mIoU', 'pointing_accuracy'], 'CAV-MAE Sync': sync, 'CAV-MAE': cavmae, 'gain': sync - cavmae,
                         'gain 95% low': [np.nan, np.nan, low], 'gain 95% high': [np.nan, np.nan, low + 10], 'chance': chance})


def test_localization_verdict():
    held = localization_verdict(localization_table([30, 20, 60], [10, 8, 20], 25.0))
    assert held.outcome == 'held' and held.headline == LOCALIZATION_HEADLINES['held']
    assert held.headline.startswith("**The paper's claim held on the testbed**: CAV-MAE Sync's maps find the sounding source better")
    assert localization_verdict(localization_table([30, 20, 60], [10, 8, 20], -2.0)).outcome == 'held partly'   # pointing gap in the noise
    assert localization_verdict(localization_table([30, 5, 60], [10, 8, 20], 25.0)).outcome == 'held partly'    # one measure behind
    readme = localization_verdict(localization_table([2.3, 5.0, 3.5], [4.4, 6.0, 20.0], -20.0))                  # the README's run
    assert readme.outcome == 'did not hold' and readme.headline.startswith("**The paper's claim did not hold on the testbed**")
    reversed_ = localization_verdict(localization_table([10, 8, 20], [30, 20, 60], -45.0))
    assert reversed_.outcome == 'did not hold'
    at_chance = localization_verdict(localization_table([3.0, 3.1, 1.5], [3.5, 2.9, 1.0], -1.0))
    assert at_chance.outcome == 'no verdict' and at_chance.headline.startswith('**No verdict on the testbed**')


def test_ablation_claims_and_gap_direction():
    gaps = pd.DataFrame({'gain': [-5.0, 4.0, 0.5], 'gain 95% low': [-8.0, 1.0, -2.0], 'gain 95% high': [-2.0, 7.0, 3.0]})
    assert [gap_direction(r) for _, r in gaps.iterrows()] == ['worse', 'better', 'no clear difference']
    assert [ablation_claim(gaps.iloc[[i]]) for i in range(3)] == [
        'held (-5.0 points)', 'did not hold: the opposite (+4.0 points)', 'not shown: within the bootstrap noise (+0.5 points)']
    assert ablation_claim(gaps.iloc[:0]) == 'not run'


# ---------------------------------------------------------------------------------------------- test runs
def test_quick_sizes_and_scratch_outputs(monkeypatch, tmp_path):
    for name in ('retrieval', 'classification', 'localization', 'ablations'):
        sizes = quick_sizes(name)
        assert sizes['num_test'] <= 12 and sizes['train_minutes'] <= 0.5 and sizes['num_workers'] == 0
    with pytest.raises(ValueError, match="notebook='train'"): quick_sizes('train')
    monkeypatch.delenv('IN_TEST', raising=False)
    assert not in_test() and in_test(True)
    monkeypatch.setenv('IN_TEST', '1')
    assert in_test() and not in_test(False)
    from cavmae_sync.config import project_root
    scratch = Outputs.create(None, 'synthetic', scratch=True)
    try: assert scratch.folder.is_dir() and (project_root() / 'figures') not in (scratch.folder, *scratch.folder.parents)
    finally: scratch.folder.rmdir()
    assert Outputs.create(tmp_path / 'mine', 'synthetic', scratch=True).folder == tmp_path / 'mine'      # a folder given wins


def test_cache_lock_excludes_another_process(monkeypatch, tmp_path):
    "While one process holds the lock, another one waits for it."
    import subprocess, sys, time
    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(tmp_path))
    script = ("import time; from cavmae_sync.reproduce import cache_lock\n"
              "with cache_lock('models'): print(time.time(), flush=True)")
    with cache_lock('models'):
        other = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        released = time.time()
    assert float(other.communicate(timeout=60)[0]) >= released
