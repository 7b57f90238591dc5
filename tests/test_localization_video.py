"""The localization video (`cavmae_sync.localization_video`, `cavmae-sync-localize`): every frame of the input at its
rate, the input's sound unchanged, maps that follow the sound, the model's own pairing on request, and one clear line
for a video it cannot render. A small untrained CAV-MAE Sync keeps it fast: the checks are about frames, windows and
sound, not about what a trained model sees."""

import contextlib
import io

import av
import numpy as np
import pytest
import torch

from cavmae_sync.audio import load_audio
from cavmae_sync.checkpoint import save_checkpoint
from cavmae_sync.config import MediaError
from cavmae_sync.data import load_clip
from cavmae_sync.localization import clip_similarity_maps
from cavmae_sync.localization_video import localization_video, localize_cli, probe_video
from cavmae_sync.model import CAVMAESync, tiny
from cavmae_sync.synthetic import make_synthetic
from cavmae_sync.video import write_video

SMALL = dict(
    embed_dim=48,
    num_heads=3,
    modality_depth=1,
    decoder_embed_dim=32,
    decoder_num_heads=2,
    decoder_depth=1,
    image_size=32,
    audio_length=64,
)  # windows of 0.64 s, 4 x 4 visual patches


@pytest.fixture(scope='module')
def testbed(tmp_path_factory):
    "Two 6 s testbed clips (64 px, 8 fps, 16 kHz mono AAC)."
    root = tmp_path_factory.mktemp('localize') / 'testbed'
    make_synthetic(root, num_train=0, num_test=2, image_size=64, duration=6.0, workers=1)
    return sorted((root / 'videos').glob('test_*.mp4'))


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return CAVMAESync(tiny(**SMALL)).eval()


@pytest.fixture(scope='module')
def rendered(testbed, model, tmp_path_factory):
    "The first testbed clip rendered whole."
    return localization_video(
        testbed[0], model, tmp_path_factory.mktemp('rendered') / 'clip.mp4', progress=False
    )


def decoded_frames(path) -> int:
    "Frames a decoder gets out of the file's video stream."
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def stream_seconds(path) -> float:
    "The video stream's duration as the container states it."
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


def test_every_frame_at_the_source_rate_with_the_input_sound(testbed, rendered):
    clip, source, written = testbed[0], probe_video(testbed[0]), probe_video(rendered.path)
    assert decoded_frames(rendered.path) == decoded_frames(clip) == rendered.frames == 48
    assert written.fps == source.fps == rendered.fps
    assert abs(stream_seconds(rendered.path) - stream_seconds(clip)) < 1 / float(source.fps)
    assert abs(written.seconds - source.seconds) < 1 / float(source.fps) and rendered.seconds == 6.0
    assert rendered.sound == 'copied' and rendered.size == (written.width, written.height)
    assert torch.equal(load_audio(rendered.path), load_audio(clip))
    assert torch.equal(
        load_audio(rendered.path, align_to_video=True), load_audio(clip, align_to_video=True)
    )


def test_a_real_clip_keeps_its_stereo_sound_sample_for_sample(media_dir, model, tmp_path):
    clip = media_dir / '00W1lcxW-WU_40.000.mp4'  # 256 x 144, 12.5 fps, stereo AAC 44.1 kHz
    result = localization_video(clip, model, tmp_path / 'real.mp4', batch_size=64, progress=False)
    assert decoded_frames(result.path) == decoded_frames(clip) == result.frames
    assert abs(stream_seconds(result.path) - stream_seconds(clip)) < 1 / float(result.fps)
    for rate in (16_000, 44_100):
        assert torch.equal(load_audio(result.path, rate), load_audio(clip, rate))
    with av.open(str(result.path)) as container:
        assert container.streams.audio[0].codec_context.channels == 2
    assert result.size[0] > 256 and result.size[1] > 144 and (result.maps[:, :, :] != 0).any()


def test_the_map_changes_when_the_sound_is_swapped(testbed, model, rendered, tmp_path):
    swapped = localization_video(
        testbed[0],
        model,
        tmp_path / 'swapped.mp4',
        audio_from=testbed[1],
        duration=2.0,
        progress=False,
    )
    assert (swapped.maps - rendered.maps[:16]).abs().amax(
        (1, 2)
    ).min() > 1e-4  # every frame's map moved
    assert (swapped.audio_patch_cosines - rendered.audio_patch_cosines[:16]).abs().amax(
        (1, 2)
    ).min() > 1e-4
    sound = load_audio(swapped.path)
    assert len(sound) >= 32_000 and torch.equal(
        sound, load_audio(testbed[1])[: len(sound)]
    )  # the other clip's, cut
    assert swapped.sound_source == str(testbed[1]) and decoded_frames(swapped.path) == 16


def test_a_cut_has_its_frames_and_its_sound(testbed, model, rendered, tmp_path):
    cut = localization_video(
        testbed[0], model, tmp_path / 'cut.mp4', start=1.1, duration=2.0, progress=False
    )
    assert (
        (cut.frames, cut.start, cut.seconds)
        == (16, 1.125, 2.0)
        == (decoded_frames(cut.path), 1.125, 2.0)
    )
    assert torch.allclose(
        cut.maps, rendered.maps[9:25], atol=1e-5
    )  # frames 9 .. 24: 1.125 .. 3.0 s
    sound, cut_sound = load_audio(testbed[0]), load_audio(cut.path)
    assert len(cut_sound) >= 2.0 * 16_000 and torch.equal(
        cut_sound, sound[18_000 : 18_000 + len(cut_sound)]
    )


def test_a_codec_mp4_does_not_hold_is_stored_losslessly(model, tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (30, 48, 64, 3), dtype=np.uint8)
    audio = (0.1 * rng.standard_normal((2, 3 * 16_000))).astype(np.float32)
    clip = write_video(
        tmp_path / 'pcm.mkv',
        frames,
        fps=10,
        audio=audio,
        sample_rate=16_000,
        audio_codec='pcm_s16le',
    )
    whole = localization_video(clip, model, tmp_path / 'pcm.mp4', progress=False)
    cut = localization_video(
        clip, model, tmp_path / 'pcm_cut.mp4', start=1.0, duration=1.5, progress=False
    )
    assert whole.sound.startswith('stored as lossless FLAC') and (whole.frames, cut.frames) == (
        30,
        15,
    )
    sound = load_audio(clip)
    assert torch.equal(load_audio(whole.path), sound)
    assert torch.equal(load_audio(cut.path), sound[16_000 : 16_000 + 24_000])


def test_model_pairing_is_the_windows_load_clip_cuts(testbed, model, tmp_path):
    "With pairing='model' the model's 16 frames hear load_clip's windows; frames='pairing' centres them on the frames."
    clip = load_clip(testbed[0], config=model.config.preprocess_config())
    result = localization_video(
        testbed[0], model, tmp_path / 'model.mp4', pairing='model', progress=False
    )
    index = torch.searchsorted(
        result.frame_times, clip.frame_times - 1e-6
    )  # the 16 frames among all 48
    inside = clip.window_bounds[:, 1] <= int(
        result.window_bounds[:, 1].max()
    )  # load_clip pads 6 s to 10.24 s
    assert inside.sum() >= 8 and torch.equal(
        result.window_bounds[index][inside], clip.window_bounds[inside]
    )
    maps = clip_similarity_maps(model, clip.frames, clip.audio, upsample=False)
    assert torch.allclose(
        result.maps[index][inside], maps[inside], atol=0.05
    )  # PyAV's pixels differ from decord's
    frames = localization_video(
        testbed[0], model, tmp_path / 'frames.mp4', duration=1.0, progress=False
    )
    assert torch.equal(
        frames.window_bounds[:, 0], (frames.frame_times * 100 - 32).round().long().clamp_min(0)
    )


def test_what_it_cannot_render_is_named(testbed, model, tmp_path):
    blank = np.zeros((10, 32, 32, 3), np.uint8)
    picture_only = write_video(tmp_path / 'picture_only.mp4', blank, fps=10)
    short = write_video(
        tmp_path / 'short.mp4', blank, fps=10, audio=np.zeros((1, 8000), np.float32)
    )
    broken = tmp_path / 'broken.mp4'
    broken.write_bytes(b'\x00' * 2000)
    for video, reason in (
        (picture_only, 'no audio stream'),
        (short, 'shorter than one audio window of the model'),
        (broken, 'unreadable or corrupt container'),
    ):
        with pytest.raises(MediaError, match=reason) as error:
            localization_video(video, model, tmp_path / 'x.mp4')
        assert str(video) in str(error.value)
    with pytest.raises(ValueError, match='past the end'):
        localization_video(testbed[0], model, tmp_path / 'x.mp4', start=7)
    clip_level = CAVMAESync(
        tiny(
            **{
                **SMALL,
                'audio_length': 1024,
                'num_frames': 1,
                'global_tokens': False,
                'num_registers': 0,
            }
        )
    )
    with pytest.raises(ValueError, match='hears the whole clip'):
        localization_video(testbed[0], clip_level, tmp_path / 'x.mp4')
    assert not (tmp_path / 'x.mp4').exists()


def run_cli(*argv):
    "localize_cli in this process: exit status, stdout, stderr."
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            localize_cli([str(a) for a in argv])
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def test_the_command_renders_and_refuses_in_one_line(testbed, model, tmp_path):
    checkpoint = save_checkpoint(tmp_path / 'small.pt', model)
    silent = write_video(tmp_path / 'silent.mp4', np.zeros((10, 32, 32, 3), np.uint8), fps=10)
    status, out, err = run_cli(
        testbed[0],
        silent,
        '-o',
        tmp_path / 'out',
        '--checkpoint',
        checkpoint,
        '--duration',
        1,
        '--quiet',
    )
    assert status == 1 and f'{testbed[0].stem}.localization.mp4: 8 frames at 8 fps (1.00 s)' in out
    assert err.strip() == (
        f'cavmae-sync-localize: {silent}: no audio stream: the maps need its sound (or the sound '
        'of another file: audio_from= / --audio FILE)'
    )
    for argv, message in (
        (('--size', 'big'), 'argument --size'),
        (('--start', 'soon'), 'argument --start'),
        (('--alpha', 3), '--alpha must be in 0 .. 1'),
        (('--duration', 0), 'duration must be a positive number'),
        (('--checkpoint', tmp_path / 'none.pt'), 'checkpoint not found'),
    ):
        status, out, err = run_cli(testbed[0], '-o', tmp_path / 'x.mp4', *argv)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_without_a_checkpoint_the_testbed_model_says_what_it_is(tmp_path):
    "The shipped testbed model, with the offset tool's warning; then one line for a video too short for its window."
    short = write_video(
        tmp_path / 'short.mp4',
        np.zeros((10, 32, 32, 3), np.uint8),
        fps=10,
        audio=np.zeros((1, 8000), np.float32),
    )
    status, out, err = run_cli(short, '-o', tmp_path / 'x.mp4')
    lines = err.strip().splitlines()
    assert status == 1 and out == '' and len(lines) == 2, err
    assert 'using the tiny testbed model' in lines[0] and 'tiny_sync_73e3aefe336c' in lines[0]
    assert lines[0].endswith('(trained on synthetic clips: only meaningful on them)')
    assert lines[1].startswith(f'cavmae-sync-localize: {short}: the audio lasts 0.5')
    assert lines[1].endswith('s, shorter than one audio window of the model (2.56 s)')
