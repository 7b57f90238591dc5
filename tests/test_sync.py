"""Audio-visual offset (`cavmae_sync.sync`): the sign convention and known offsets on a time-coded clip read by a model
whose answer is known, the batched windows against a brute-force computation, edge cases and the CLI."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cavmae_sync.audio import load_audio
from cavmae_sync.checkpoint import save_checkpoint
from cavmae_sync.model import CAVMAESync, tiny
from cavmae_sync.embeddings import model_preprocess_config
from cavmae_sync.config import PreprocessConfig
from cavmae_sync import testbed
from cavmae_sync.sync import (
    TimeCodedModel,
    av_offset,
    cached_tiny_model,
    decode_for_offset,
    offset_cli,
    offset_grid,
    score_offsets,
    shift_waveform,
    time_coded_clip,
    window_bank,
    write_shifted_clip,
    num_fbank_frames,
    zero_centres,
)
from cavmae_sync.audio import kaldi_fbank
from cavmae_sync.video import write_video


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp('sync')
    clip = time_coded_clip(folder / 'in_sync.mp4')
    return {
        'folder': folder,
        'clip': clip,
        'late': write_shifted_clip(clip, folder / 'late.mp4', 0.6),
        'early': write_shifted_clip(clip, folder / 'early.mp4', -0.4),
    }


@pytest.fixture(scope='module')
def oracle():
    return TimeCodedModel()


def test_offset_grid():
    assert offset_grid(0.2, 0.1).tolist() == [-20, -10, 0, 10, 20]
    assert len(offset_grid(2.0, 0.04)) == 101 and offset_grid(2.0, 0.04)[50] == 0
    assert offset_grid(0.0, 0.04).tolist() == [0]
    for step in (0.015, 0.005, 0.0, -0.04):
        with pytest.raises(ValueError, match='step'):
            offset_grid(2.0, step)
    with pytest.raises(ValueError, match='max_offset'):
        offset_grid(-1.0, 0.04)


def test_window_bank_by_hand():
    grid = offset_grid(0.2, 0.1)  # [-20, -10, 0, 10, 20] fbank frames
    own = lambda b, t: [int(b.starts[j]) if v else None for j, v in zip(b.lower[t], b.valid[t])]
    exact = window_bank([0, 60, 120], grid, num_spectrogram_frames=200, window=100)
    assert own(exact, 0) == [None] * 5  # a window centred on frame 0 starts before the audio
    assert own(exact, 1) == [None, 0, 10, 20, 30]  # 60 + k - 50, kept when >= 0
    assert own(exact, 2) == [50, 60, 70, 80, 90]  # ends at 150 .. 190 <= 200
    assert exact.exact and exact.starts.tolist() == sorted(
        set(exact.starts.tolist())
    )  # each distinct window once
    short = window_bank([0, 60, 120], grid, num_spectrogram_frames=185, window=100)
    assert own(short, 2) == [50, 60, 70, 80, None]  # past the end: dropped
    bank = window_bank(
        [0, 60, 120], grid, 200, 100, spacing=16
    )  # a grid every 16 frames, read by interpolation
    assert bank.starts.tolist() == [0, 16, 32, 48, 64, 80, 96] and not bank.exact
    assert [int(bank.starts[j]) for j in bank.lower[2]] == [48, 48, 64, 80, 80]
    assert [int(bank.starts[j]) for j in bank.upper[2]] == [64, 64, 80, 80, 96]
    assert torch.allclose(bank.weight[2], torch.tensor([2, 12, 6, 0, 10], dtype=torch.float64) / 16)
    linear = bank.read(
        torch.arange(7.0)[None].repeat(3, 1) * 16
    )  # a score linear in the start is read back exactly
    assert torch.allclose(linear[2], torch.tensor([50, 60, 70, 80, 90], dtype=torch.float64))
    assert (linear[0] == 0).all() and not bank.valid[0].any()
    assert window_bank([140], torch.arange(-40, 9, 4), 200, 100, spacing=16).starts.tolist() == [
        48,
        64,
        80,
        96,
        100,
    ]  # last start kept
    assert window_bank(
        [150], torch.tensor([0]), 1000, 100, spacing=16
    ).exact  # a grid dearer than the own windows is not used
    with pytest.raises(ValueError, match='spacing'):
        window_bank([150], torch.tensor([0]), 1000, 100, spacing=0)


def test_zero_centres():
    config = PreprocessConfig(num_frames=4, window=100, target_length=400)
    assert zero_centres([0.0, 0.9, 1.9, 2.9], config).tolist() == [
        0,
        100,
        200,
        300,
    ]  # load_clip's t * S / T
    assert zero_centres([0.0, 0.9, 1.9, 2.9], config, 'frames').tolist() == [0, 90, 190, 290]
    with pytest.raises(ValueError, match='4 frames'):
        zero_centres([0.0, 1.0], config)
    with pytest.raises(ValueError, match='zero'):
        zero_centres([0.0, 1.0], config, 'audio')


def test_score_offsets_by_hand():
    offsets = torch.tensor([-0.2, -0.1, 0.0, 0.1, 0.2], dtype=torch.float64)
    cos = torch.tensor(
        [[0.1, 0.2, 0.3, 0.9, 0.4], [0.0, 0.1, 0.2, 0.8, 0.3], [0.2, 0.7, 0.1, 0.5, 0.5]]
    )
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    r = score_offsets(cos, valid, offsets, min_frames=2)
    assert torch.allclose(
        r.curve, torch.tensor([0.1, 1 / 3, 0.2, 0.85, 0.35], dtype=torch.float64), atol=1e-6
    )
    assert r.offset == pytest.approx(0.1) and r.confidence == pytest.approx(0.85 - 1 / 3, abs=1e-6)
    assert r.frame_offsets.tolist() == pytest.approx(
        [0.1, 0.1, -0.1]
    ) and r.frames_used.tolist() == [3, 3, 3, 2, 2]
    assert score_offsets(cos, valid, offsets, min_frames=3).offset == pytest.approx(
        -0.1
    )  # too few frames at +0.1 s
    none = score_offsets(cos, valid, offsets, min_frames=4)
    assert none.offset is None and none.confidence is None and 'too short' in none.reason


def test_shift_waveform():
    x = torch.arange(1, 11, dtype=torch.float32)
    assert shift_waveform(x, 0.3, 10).tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]  # positive: later
    assert shift_waveform(x, -0.2, 10).tolist() == [3, 4, 5, 6, 7, 8, 9, 10, 0, 0]
    with pytest.raises(ValueError):
        shift_waveform(x, 2.0, 10)


def test_shifted_clip_moves_the_samples(clips):
    source = load_audio(clips['clip'], 16000, align_to_video=True)
    late = load_audio(clips['late'], 16000, align_to_video=True)
    lag = 9600  # 0.6 s
    a, b = source[16000:100000], late[16000 + lag : 100000 + lag]
    assert F.cosine_similarity(a, b, dim=0) > 0.95  # the late copy is the source, 0.6 s later
    assert F.cosine_similarity(a, late[16000:100000], dim=0) < 0.5
    assert late[: lag - 2000].abs().max() < 0.05  # silence before it


def test_known_offsets_and_sign(clips, oracle):
    base = av_offset(
        clips['clip'], oracle, zero='frames'
    )  # the oracle reads the frames' presentation times
    late, early = (
        av_offset(clips['late'], oracle, zero='frames'),
        av_offset(clips['early'], oracle, zero='frames'),
    )
    assert abs(base.offset) <= 0.08, base.summary()
    assert late.offset - base.offset == pytest.approx(0.6, abs=0.041), (
        late.summary()
    )  # positive: audio late
    assert early.offset - base.offset == pytest.approx(-0.4, abs=0.041), early.summary()
    assert (
        late.confidence > 0.2
        and 'audio late' in late.summary()
        and 'audio early' in early.summary()
    )
    assert late.zero == 'frames' and late.to_dict(curve=False)['zero'] == 'frames'
    assert len(late.curve) == 101 and late.curve.shape == late.offsets.shape
    answered = late.frame_offsets[~torch.isnan(late.frame_offsets)]
    assert (
        len(answered) >= 12 and (answered - late.offset).abs().median() <= 0.08
    )  # the frames agree


def test_no_estimate_for_silent_or_short(tmp_path, oracle):
    silent = write_video(
        tmp_path / 'silent.mp4',
        np.full((100, 32, 32, 3), 128, np.uint8),
        fps=10,
        audio=np.zeros((1, 160_000), np.float32),
    )
    r = av_offset(silent, oracle)
    assert r.offset is None and 'silent' in r.reason and torch.isnan(r.curve).all()
    r = av_offset(time_coded_clip(tmp_path / 'short.mp4', duration=0.5), oracle)
    assert r.offset is None and 'shorter' in r.reason and 'no estimate' in r.summary()
    assert json.loads(json.dumps(r.to_dict()))['offset'] is None


def test_refusals(clips, oracle):
    with pytest.raises(ValueError, match='multiple of the fbank hop'):
        av_offset(clips['clip'], oracle, step=0.025)
    with pytest.raises(ValueError, match='whole clip'):
        av_offset(clips['clip'], CAVMAESync(tiny(audio_length=1024, num_frames=1)))
    with pytest.raises(Exception, match='missing.mp4'):
        av_offset(clips['folder'] / 'missing.mp4', oracle)


def _brute_force_curve(model, inputs, max_offset, step, spacing):
    """diagonal_mean per offset, every (frame, offset) pair cut and encoded on its own, read between
    grid windows `spacing` apart."""
    T, L, S = len(inputs.frames), model.config.audio_length, len(inputs.spectrogram)
    config = model_preprocess_config(model)
    with torch.inference_mode():
        frames = F.normalize(model.encode_video(inputs.frames).embedding, dim=-1)
        cos = lambda t, start: float(
            F.normalize(
                model.encode_audio(inputs.spectrogram[start : start + L][None]).embedding, dim=-1
            )[0]
            @ frames[t]
        )
        curve = []
        for k in offset_grid(max_offset, step).tolist():
            values = []
            for t in range(T):
                start = round(t * config.target_length / T) + k - L // 2
                if not (0 <= start and start + L <= S):
                    continue
                low = start if start == S - L else start // spacing * spacing
                high = low if low == start else min(low + spacing, S - L)
                w = 0.0 if high == low else (start - low) / (high - low)
                values.append((1 - w) * cos(t, low) + w * cos(t, high))
            curve.append(np.mean(values))
    return torch.tensor(curve, dtype=torch.float64)


def test_bank_equals_direct_computation(clips):
    torch.manual_seed(0)
    model = CAVMAESync(tiny(num_frames=4, audio_length=64, image_size=32)).eval()
    inputs = decode_for_offset(clips['clip'], model_preprocess_config(model), 40)
    assert inputs.spectrogram.shape[0] == num_fbank_frames(int(inputs.audio_seconds * 16000), 16000)
    exact = av_offset(
        inputs, model, max_offset=0.2, step=0.1, min_frames=1, batch_size=3, bank_step=0.01
    )  # several batches
    assert torch.allclose(exact.curve, _brute_force_curve(model, inputs, 0.2, 0.1, 1), atol=1e-5)
    fast = av_offset(
        inputs, model, max_offset=0.4, step=0.04, min_frames=1
    )  # default bank: 16 frames apart
    assert torch.allclose(fast.curve, _brute_force_curve(model, inputs, 0.4, 0.04, 16), atol=1e-5)
    direct = av_offset(inputs, model, max_offset=0.4, step=0.04, min_frames=1, bank_step=0.01)
    assert not torch.equal(fast.curve, direct.curve)  # the bank really interpolates ...
    assert (fast.curve - direct.curve).abs().max() < 0.05  # ... close to the direct curve (cosines)


def test_bank_on_known_offsets(clips, oracle):
    "On the time-coded clip the default bank (one window per 0.16 s) and the exact computation find the same offsets."
    for name, shift in (('clip', 0.0), ('late', 0.6), ('early', -0.4)):
        bank = av_offset(clips[name], oracle, zero='frames')
        exact = av_offset(clips[name], oracle, zero='frames', bank_step=0.01)
        assert abs(bank.offset - exact.offset) <= 0.041 and abs(bank.offset - shift) <= 0.081, (
            name,
            bank.summary(),
            exact.summary(),
        )
        assert (bank.curve - exact.curve).abs().max() < 0.06  # peak ~0.97: within ~5% of it
        assert (
            bank.frames_used.tolist() == exact.frames_used.tolist()
        )  # the same frames count at every offset


def test_bank_keeps_refusals(tmp_path, oracle):
    silent = write_video(
        tmp_path / 'silent.mp4',
        np.full((100, 32, 32, 3), 128, np.uint8),
        fps=10,
        audio=np.zeros((1, 160_000), np.float32),
    )
    short = time_coded_clip(tmp_path / 'short.mp4', duration=0.5)
    for bank_step in (None, 0.01, 0.32):
        assert 'silent' in av_offset(silent, oracle, bank_step=bank_step).reason
        assert 'shorter' in av_offset(short, oracle, bank_step=bank_step).reason
    with pytest.raises(ValueError, match='bank_step'):
        av_offset(silent, oracle, bank_step=0.015)
    with pytest.raises(ValueError, match='zero'):
        av_offset(silent, oracle, zero='audio')


def test_fbank_frame_count():
    for n in (399, 400, 559, 560, 16000):
        assert (
            num_fbank_frames(n, 16000)
            == kaldi_fbank(torch.zeros(n) + 0.1 * torch.randn(n), 16000).shape[0]
        )


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            offset_cli(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_cli(clips, tmp_path):
    model = CAVMAESync(tiny(num_frames=4, audio_length=64, image_size=32))
    checkpoint = save_checkpoint(tmp_path / 'model.pt', model)
    files = [str(clips['clip']), str(clips['late']), str(tmp_path / 'missing.mp4')]
    code, out, _ = _cli(
        files + ['--checkpoint', str(checkpoint), '--max-offset', '0.4', '--step', '0.1']
    )
    lines = out.splitlines()
    assert code == 1 and len(lines) == 3  # one line per file; a failed file sets the exit status
    assert (
        lines[0].startswith(files[0] + '\t')
        and 'confidence' in lines[0]
        and 'missing.mp4' in lines[2]
        and 'error' in lines[2]
    )
    code, out, _ = _cli(
        files[:2]
        + ['--checkpoint', str(checkpoint), '--json', '--max-offset', '0.4', '--step', '0.1']
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert (
        code == 0
        and [r['path'] for r in rows] == files[:2]
        and len(rows[0]['curve']) == 9
        and rows[0]['zero'] == 'model'
    )
    code, _, err = _cli(files[:1] + ['--checkpoint', str(checkpoint), '--step', '0.015'])
    assert code == 2 and 'multiple of the fbank hop' in err


def test_cli_without_checkpoint_never_trains(clips, tmp_path, monkeypatch):
    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(tmp_path / 'empty'))
    monkeypatch.setattr(testbed, 'SHIPPED_DIR', tmp_path / 'none shipped')
    code, out, err = _cli([str(clips['clip'])])
    assert code == 2 and 'pretrained_tiny' in err and '--checkpoint' in err and out == ''
    assert not (tmp_path / 'empty').exists()  # nothing generated, nothing trained


def test_cached_tiny_model_picks_the_most_trained_of_the_default_recipe(tmp_path, monkeypatch):
    "Cached and shipped models compete on steps; an ablation variant (here: no registers) is never the default model."
    monkeypatch.setenv('CAVMAE_SYNC_DATA', str(tmp_path))
    monkeypatch.setattr(testbed, 'SHIPPED_DIR', tmp_path / 'shipped')
    assert cached_tiny_model() is None
    recipe = {
        kind: testbed.tiny_pretrain_config(kind, data_root=tmp_path).model.to_dict()
        for kind in ('sync', 'cavmae')
    }
    for folder, name, steps, model in (
        ('models', 'tiny_sync_a', 34, recipe['sync']),
        ('models', 'tiny_sync_b', 900, recipe['sync']),
        ('models', 'tiny_sync_c', 5000, {**recipe['sync'], 'num_registers': 0}),
        ('models', 'tiny_cavmae_d', 5000, recipe['cavmae']),
    ):
        (tmp_path / folder / name).mkdir(parents=True)
        (tmp_path / folder / name / 'model.pt').write_bytes(b'x')
        (tmp_path / folder / name / 'config.json').write_text(
            json.dumps({'config': {'max_steps': steps, 'model': model}})
        )
    assert cached_tiny_model('sync') == tmp_path / 'models' / 'tiny_sync_b' / 'model.pt'
    assert cached_tiny_model('cavmae') == tmp_path / 'models' / 'tiny_cavmae_d' / 'model.pt'
    (tmp_path / 'shipped' / 'tiny_sync_e').mkdir(parents=True)
    (tmp_path / 'shipped' / 'tiny_sync_e' / 'model.pt').write_bytes(b'x')
    (tmp_path / 'shipped' / 'tiny_sync_e' / 'config.json').write_text(
        json.dumps({'config': {'max_steps': 1500, 'model': recipe['sync']}})
    )
    assert (
        cached_tiny_model('sync') == tmp_path / 'shipped' / 'tiny_sync_e' / 'model.pt'
    )  # a fresh clone has the shipped one
