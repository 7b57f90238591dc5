"""The reproduction notebooks' shared plumbing: the one-message stop on missing real data,
checkpoint loading of either format,
output paths, and the paired bootstrap."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cavmae_sync.checkpoint import (
    CheckpointError,
    holds_classifier,
    load_model_file,
    save_checkpoint,
)
from cavmae_sync.model import CAVMAESync, tiny
from cavmae_sync.reproduce import (
    Outputs,
    check_dataset,
    data_file,
    missing_media,
    require_video_data,
)


def write_datafile(folder, rows):
    path = folder / 'test.json'
    path.write_text(json.dumps({'data': rows}))
    return path


def test_require_video_data_names_every_problem_at_once(tmp_path):
    (tmp_path / 'present.mp4').write_bytes(b'x')
    datafile = write_datafile(
        tmp_path,
        [
            {'video_id': 'a', 'wav': '', 'video_path': 'present.mp4', 'labels': '/m/1'},
            {
                'video_id': 'b',
                'wav': '',
                'video_path': str(tmp_path / 'absent.mp4'),
                'labels': '/m/1',
            },
        ],
    )
    with pytest.raises(FileNotFoundError) as error:
        require_video_data(
            'audioset',
            tmp_path,
            {'test_datafile': datafile, 'label_csv': tmp_path / 'labels.csv', 'checkpoint': None},
            splits=('train', 'test'),
        )
    message = str(error.value)
    assert 'checkpoint is not set' in message
    assert f"{tmp_path / 'labels.csv'} (label_csv) does not exist" in message
    assert f"{tmp_path / 'absent.mp4'} (named by {datafile}) does not exist" in message
    assert 'present.mp4' not in message.split('Expected:')[0]
    assert '527 classes' in message
    assert (
        f'--out {tmp_path} --datafile train.json' in message
        and f'--out {tmp_path} --datafile test.json' in message
    )


def test_require_video_data_passes_when_everything_is_there(tmp_path):
    (tmp_path / 'clip.mp4').write_bytes(b'x')
    datafile = write_datafile(
        tmp_path, [{'video_id': 'a', 'wav': '', 'video_path': 'clip.mp4', 'labels': '/m/1'}]
    )
    require_video_data('vggsound', tmp_path, {'test_datafile': datafile, 'checkpoint': datafile})
    assert missing_media(datafile) == []


def test_pre_extracted_layout_needs_frames_and_wav(tmp_path):
    (tmp_path / 'frames' / 'frame_0').mkdir(parents=True)
    datafile = write_datafile(
        tmp_path, [{'video_id': 'a', 'wav': 'a.wav', 'video_path': 'frames', 'labels': '/m/1'}]
    )
    assert missing_media(datafile) == [str(tmp_path / 'a.wav')]
    (tmp_path / 'a.wav').write_bytes(b'x')
    assert missing_media(datafile) == []


def test_dataset_choice_and_file_defaults(tmp_path):
    assert check_dataset('audioset', ['synthetic', 'audioset'], 'classification') == 'AudioSet'
    with pytest.raises(ValueError, match="dataset='imagenet'"):
        check_dataset('imagenet', ['synthetic'], 'retrieval')
    assert data_file(None, tmp_path, 'train.json') == tmp_path / 'train.json'
    assert data_file(None, None, 'train.json') is None


def test_load_model_reads_both_formats_and_says_why_not(tmp_path):
    config = tiny(
        embed_dim=48,
        num_heads=12,
        modality_depth=1,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=16,
        image_size=32,
        audio_length=64,
        num_frames=4,
        num_registers=2,
    )
    model = CAVMAESync(config)
    save_checkpoint(tmp_path / 'ours.pt', model)
    torch.save({'module.' + k: v for k, v in model.state_dict().items()}, tmp_path / 'official.pth')
    for name in ('ours.pt', 'official.pth'):
        loaded = load_model_file(
            tmp_path / name, num_heads=12, decoder_num_heads=16, verbose=True
        )  # 48 wide: heads passed, not guessed
        assert not loaded.training and not holds_classifier(tmp_path / name)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    state = model.state_dict()
    missing = next(key for key in state if key.endswith('attn.proj.bias'))
    state.pop(missing)
    torch.save(state, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError, match='neither a cavmae_sync checkpoint') as error:
        load_model_file(tmp_path / 'broken.pth', num_heads=12, decoder_num_heads=16, verbose=True)
    assert missing in str(error.value)


def test_outputs_keep_real_data_apart(tmp_path):
    assert Outputs.create(tmp_path / 'f', 'synthetic')('maps.png') == tmp_path / 'f' / 'maps.png'
    assert (
        Outputs.create(tmp_path / 'f', 'ade20k_sound')('maps.png')
        == tmp_path / 'f' / 'maps_ade20k_sound.png'
    )


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    better, worse = (rng.random(400) < 0.6).astype(float), (rng.random(400) < 0.3).astype(float)
    gap = paired_bootstrap(better, worse)
    assert gap.gain == pytest.approx((better.mean() - worse.mean()) * 100)
    assert 0 < gap.low < gap.gain < gap.high
    assert (
        paired_bootstrap(better, worse, seed=1).gain == gap.gain
    )  # the point estimate does not depend on the draws
    wide, narrow = (
        paired_bootstrap(better, worse, confidence=0.99),
        paired_bootstrap(better, worse, confidence=0.5),
    )
    assert wide.low < gap.low < narrow.low and narrow.high < gap.high < wide.high
    with pytest.raises(ValueError, match='same queries'):
        paired_bootstrap(better, worse[:10])


# ----------------------------------------------------------------------------------------------
# verdicts on hand-made hits
from cavmae_sync.claims import (
    chance_check,
    judge_claim,
    retrieval_check,
    retrieval_claim,
    localization_claim,
    trained_check,
)
from cavmae_sync.files import cache_lock
from cavmae_sync.metrics import PairedGain, above_chance, paired_bootstrap
from cavmae_sync.reproduce import in_test, quick_sizes

from cavmae_sync.retrieval import DIRECTIONS, RetrievalEvidence


def hits(rate_a2v, rate_v2a, n=200, seed=0):
    "Per-query R@1 hits with exactly these rates (percent), in a shuffled order."
    rng = np.random.default_rng(seed)
    return {
        d: rng.permutation((np.arange(n) < round(rate * n / 100)).astype(float))
        for d, rate in zip(DIRECTIONS, (rate_a2v, rate_v2a))
    }


def evidence(name, rates, trained=True, n=200, seed=0):
    "Hand-made retrieval evidence: R@1 at `rates`; the other true matches rank 2..40 (trained) or anywhere (untrained)."
    rng = np.random.default_rng(seed + 100)
    top = hits(*rates, n=n, seed=seed)
    high = 41 if trained else n + 1
    return RetrievalEvidence(
        name, top, {d: np.where(h > 0, 1.0, rng.integers(2, high, n)) for d, h in top.items()}
    )


LEARNED = SimpleNamespace(contrastive_end=2.9, contrastive_chance=math.log(32))


@pytest.mark.parametrize(
    'sync, cavmae, cavmae_trained, outcome',
    [
        ((40.0, 70.0), (8.0, 9.0), True, 'held'),  # both trained, Sync far ahead
        ((12.0, 9.0), (8.0, 9.0), True, 'not shown'),  # both trained, the gaps are within the noise
        ((5.0, 4.0), (30.0, 40.0), True, 'did not hold'),  # both trained, CAV-MAE ahead
        (
            (40.0, 70.0),
            (1.0, 1.0),
            True,
            'held',
        ),  # R@1 under 5x chance, but its ranks show it trained
        (
            (40.0, 70.0),
            (0.5, 0.0),
            False,
            'no verdict',
        ),  # CAV-MAE's ranks no better than random, whatever the gap
    ],
)
def test_retrieval_claim_on_hand_made_ranks(sync, cavmae, cavmae_trained, outcome):
    "Retrieval verdicts are gated by the rank test of each model (has it trained?), not by R@1 against chance."
    a, b = evidence('Sync', sync), evidence('CAV-MAE', cavmae, cavmae_trained, seed=1)
    checks = [trained_check(a, LEARNED), trained_check(b, LEARNED)]
    verdict = retrieval_claim('frame-aligned windows beat the whole clip', a, b, checks)
    assert verdict.outcome == outcome, verdict.headline
    if outcome == 'no verdict':
        assert (
            verdict.headline.startswith('**No verdict**')
            and 'CAV-MAE has not trained' in verdict.headline
        )
        assert not verdict.table()['all passed checks'].all()
    else:
        assert 'No verdict' not in verdict.headline and verdict.table()['all passed checks'].all()
    gains = verdict.table().set_index('measure')['gain']
    for d, x, y in zip(DIRECTIONS, sync, cavmae):  # the gain is Sync minus CAV-MAE, in points
        assert gains[f'{d} R@1'] == pytest.approx(x - y, abs=1e-9)


def test_a_loss_at_log_batch_is_not_trained():
    "Good ranks alone are not enough: the training contrastive loss must have ended below log(batch)."
    stuck = SimpleNamespace(contrastive_end=3.47, contrastive_chance=math.log(32))
    check = trained_check(evidence('m', (10.0, 10.0)), stuck)
    assert not check.passed and check.failed_measures == ['contrastive loss']


def test_an_ablation_reference_needs_ten_times_chance():
    at_six, variant = (
        evidence('reference', (3.0, 3.0)),
        evidence('variant', (3.0, 3.5), seed=1),
    )  # 6x chance of 0.5%
    trained = [trained_check(at_six, LEARNED), trained_check(variant, LEARNED)]
    assert retrieval_claim('c', at_six, variant, trained).outcome != 'no verdict'
    strict = retrieval_claim(
        'c', at_six, variant, [*trained, retrieval_check('reference', at_six.hits, 10.0)]
    )
    assert strict.outcome == 'no verdict' and 'reference did not leave chance' in strict.headline


def test_chance_check_is_a_multiple_of_chance_beyond_binomial_noise():
    assert above_chance(2.0, 200, 0.5) and not above_chance(
        1.5, 200, 0.5
    )  # 4 hits where 1 is expected: P = 0.019; 3: P = 0.080
    assert (
        chance_check('m', {'R@1': 2.5}, 0.5, 200).passed
        and not chance_check('m', {'R@1': 2.0}, 0.5, 200).passed
    )
    assert not chance_check('m', {'R@1': 5.0}, 1.0, 20).passed  # 1 hit of 20: 5x chance, but noise
    with pytest.raises(ValueError, match='n=0'):
        above_chance(10.0, 0, 1.0)


def test_a_failed_control_is_no_verdict():
    learned = [
        chance_check('A', {'R@1': 30.0}, 0.5, 200),
        chance_check('B', {'R@1': 20.0}, 0.5, 200),
    ]
    up = PairedGain(10.0, 4.0, 16.0)
    assert judge_claim('c', {'pointing accuracy': up}, learned).outcome == 'held'
    gated = judge_claim(
        'c', {'pointing accuracy': up}, learned, gates=['neither model localizes by sound']
    )
    assert gated.outcome == 'no verdict' and 'neither model localizes by sound' in gated.headline


class Evidence:
    """Stands in for `testbed_localization.LocalizationEvidence`: hits per prompt, clips, and
    whether the controls passed."""

    def __init__(self, model, rate, passed, clips=40, frames=10, seed=0):
        rng = np.random.default_rng(seed)
        self.model, self.controls_passed = model, passed
        self.clips = np.repeat(np.arange(clips), frames)
        self.hits = (rng.random(clips * frames) < rate).astype(float)
        self.control_failure = '' if passed else 'does not beat the brightness map'
        self.control_evidence = f'pointing accuracy {self.hits.mean() * 100:.1f}%'


def test_localization_claim_needs_each_model_to_pass_its_controls():
    "Each compared model must pass localization's own controls; retrieval does not enter."
    assert (
        localization_claim('c', Evidence('A', 0.7, True), Evidence('B', 0.2, True, seed=1)).outcome
        == 'held'
    )
    one = localization_claim('c', Evidence('A', 0.7, True), Evidence('B', 0.2, False, seed=1))
    assert (
        one.outcome == 'no verdict'
        and 'B fails its control (does not beat the brightness map)' in one.headline
    )
    assert 'A fails' not in one.headline and [c.passed for c in one.checks] == [True, False]
    with pytest.raises(ValueError, match='different prompts'):
        localization_claim('c', Evidence('A', 0.7, True), Evidence('B', 0.2, True, clips=20))


# ---------------------------------------------------------------------------------------------- test runs
def test_quick_sizes_and_scratch_outputs(monkeypatch, tmp_path):
    for name in ('retrieval', 'classification', 'localization', 'ablations'):
        sizes = quick_sizes(name)
        assert sizes['num_test'] <= 12 and sizes['train_steps'] <= 10 and sizes['num_workers'] == 0
    with pytest.raises(ValueError, match="notebook='train'"):
        quick_sizes('train')
    monkeypatch.delenv('IN_TEST', raising=False)
    assert not in_test() and in_test(True)
    monkeypatch.setenv('IN_TEST', '1')
    assert in_test() and not in_test(False)
    from cavmae_sync.config import project_root

    scratch = Outputs.create(None, 'synthetic', scratch=True)
    try:
        assert scratch.folder.is_dir() and (project_root() / 'figures') not in (
            scratch.folder,
            *scratch.folder.parents,
        )
    finally:
        scratch.folder.rmdir()
    assert (
        Outputs.create(tmp_path / 'mine', 'synthetic', scratch=True).folder == tmp_path / 'mine'
    )  # a folder given wins


def test_cache_lock_excludes_another_process(monkeypatch, tmp_path):
    "While one process holds the lock, another one waits for it."
    import subprocess
    import sys
    import time

    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(tmp_path))
    script = (
        "import time; from cavmae_sync.files import cache_lock\n"
        "with cache_lock('models'): print(time.time(), flush=True)"
    )
    with cache_lock('models'):
        other = subprocess.Popen([sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
        time.sleep(3)
        released = time.time()
    assert float(other.communicate(timeout=60)[0]) >= released
