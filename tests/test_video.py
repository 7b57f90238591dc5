"cavmae_sync.video: the frame sampling rule, decord vs PyAV, broken files, and the image transforms."

import av
import numpy as np
import pytest
import torch
from PIL import Image

from cavmae_sync.config import MediaError, IMAGENET_MEAN, IMAGENET_STD
from cavmae_sync.video import (
    read_frames,
    sample_times,
    frames_on_screen,
    eval_transform,
    train_transform,
    unnormalize,
    write_video,
    _pyav_decode,
    demux_frame_times,
)
from media_factory import (
    write_clip,
    numbered_frames,
    frame_number,
    shift_before_zero,
    truncate,
    pyav_frames,
)


@pytest.fixture(scope='module')
def clip(tmp_path_factory):
    return write_clip(
        tmp_path_factory.mktemp('video') / 'clip.mp4', seconds=4.0, fps=15
    )  # 60 frames


def test_sampling_rule():
    np.testing.assert_allclose(sample_times(10.0, 4), [0, 2.5, 5.0, 7.5])
    # constant frame rate: frame floor(t * N / T)
    for n, t in [(250, 16), (125, 16), (299, 16), (7, 16), (100, 1)]:
        expected = [k * n // t for k in range(t)]
        assert frames_on_screen(np.arange(n) / 25, sample_times(n / 25, t)).tolist() == expected
    # variable frame rate: the frame on screen, never one that has not started yet
    assert frames_on_screen([0.0, 0.1, 1.0, 1.05], [0.0, 0.5, 1.0, 1.02, 3.0]).tolist() == [
        0,
        1,
        2,
        2,
        3,
    ]
    with pytest.raises(ValueError, match='duration'):
        sample_times(0, 16)
    with pytest.raises(ValueError, match='num_frames'):
        sample_times(1.0, 0)


def test_read_frames_returns_the_rule_frames(clip):
    video = read_frames(clip, 16)
    assert (
        video.backend == 'decord'
        and video.frames.shape == (16, 96, 128, 3)
        and video.frames.dtype == torch.uint8
    )
    assert video.num_video_frames == 60 and video.fps == pytest.approx(15)
    assert video.duration == pytest.approx(4.0, abs=1e-3)
    expected = [t * 60 // 16 for t in range(16)]
    assert video.indices.tolist() == expected
    assert [frame_number(f) for f in video.frames.numpy()] == expected
    np.testing.assert_allclose(video.times.numpy(), np.array(expected) / 15, atol=1e-4)
    np.testing.assert_allclose(video.sample_times.numpy(), np.arange(16) * 4.0 / 16)
    # decord's frames are PyAV's, pixel for pixel
    reference = pyav_frames(clip)
    assert all(
        np.array_equal(frame, reference[i]) for frame, i in zip(video.frames.numpy(), expected)
    )


def test_positions_max_duration_and_repeats(clip):
    assert read_frames(clip, 16, positions=[15, 3]).indices.tolist() == [56, 11]
    assert [frame_number(f) for f in read_frames(clip, 16, positions=[15, 3]).frames.numpy()] == [
        56,
        11,
    ]
    capped = read_frames(clip, 4, max_duration=2.0)
    assert capped.duration == 2.0 and capped.indices.tolist() == [0, 7, 15, 22]
    many = read_frames(clip, 100)  # more frames than the clip has: repeats
    assert many.indices.tolist() == [t * 60 // 100 for t in range(100)]
    assert [frame_number(f) for f in many.frames.numpy()] == many.indices.tolist()
    with pytest.raises(ValueError, match='positions'):
        read_frames(clip, 16, positions=[16])


def test_pyav_path_matches_decord(clip):
    video = read_frames(clip, 16)
    times, fps = demux_frame_times(clip, threads=1)
    assert len(times) == 60 and fps == pytest.approx(15)
    assert torch.equal(
        torch.from_numpy(_pyav_decode(clip, video.indices.numpy(), threads=1)), video.frames
    )


def test_edit_list_clip_is_read_as_players_show_it(clip, tmp_path):
    import decord

    cut = shift_before_zero(clip, tmp_path / 'cut.mp4', 1.0)  # 15 frames hidden before time 0
    reader = decord.VideoReader(str(cut))
    assert reader.get_frame_timestamp(0)[0] < 0  # decord counts the hidden frames
    shown = pyav_frames(cut)
    video = read_frames(cut, 8)
    assert video.backend == 'pyav' and video.num_video_frames == len(shown)
    expected = [t * len(shown) // 8 for t in range(8)]
    assert video.indices.tolist() == expected
    assert all(np.array_equal(frame, shown[i]) for frame, i in zip(video.frames.numpy(), expected))
    assert video.times[0] == pytest.approx(0, abs=1e-3)


def test_real_clips_match_pyav(media_dir):
    clips = sorted(media_dir.glob('*.mp4'))
    assert len(clips) == 2
    backends = {}
    for path in clips:
        video = read_frames(path, 16)
        backends[path.name] = (video.backend, video.num_video_frames)
        shown = pyav_frames(path)
        assert video.num_video_frames == len(shown)
        assert video.indices.tolist() == [t * len(shown) // 16 for t in range(16)]
        assert all(
            np.array_equal(frame, shown[i])
            for frame, i in zip(video.frames.numpy(), video.indices.tolist())
        )
        assert 9.9 < video.duration < 10.1
    # the 1280x720 VGGSound clip hides 100 pre-roll frames behind an edit list: decord would count 400
    assert backends['KlsG1EnBEjc_000361.mp4'] == ('pyav', 299)
    assert backends['00W1lcxW-WU_40.000.mp4'] == ('decord', 125)


@pytest.mark.parametrize(
    'case, reason',
    [
        ('empty', 'empty file'),
        ('missing', 'not found'),
        ('garbage', 'unreadable'),
        ('audio_only', 'no video stream'),
        ('truncated', 'truncated'),
        ('folder', 'not a regular file'),
    ],
)
def test_broken_files_raise_media_error(clip, tmp_path, case, reason):
    path = tmp_path / f'{case}.mp4'
    if case == 'empty':
        path.touch()
    elif case == 'garbage':
        path.write_bytes(b'\x00\x01garbage' * 500)
    elif case == 'audio_only':
        write_clip(path, video=False)
    elif case == 'truncated':
        truncate(clip, path, 0.6)
    elif case == 'folder':
        path.mkdir()
    with pytest.raises(MediaError, match=reason) as error:
        read_frames(path, 16)
    assert str(path) in str(error.value) and error.value.path == str(path)


def test_truncated_without_faststart(clip, tmp_path):
    # index at the end (ffmpeg's default): a cut file has no index at all
    frames = numbered_frames(30)
    with av.open(str(tmp_path / 'plain.mp4'), 'w') as container:
        stream = container.add_stream('libx264', rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, 'yuv420p'
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format='rgb24')))
        container.mux(stream.encode())
    cut = truncate(tmp_path / 'plain.mp4', tmp_path / 'plain_cut.mp4', 0.8)
    with pytest.raises(MediaError, match='unreadable or corrupt'):
        read_frames(cut)


def test_video_stream_without_frames(tmp_path):
    path = tmp_path / 'no_frames.mkv'  # a declared video stream, only audio packets
    with av.open(str(path), 'w') as container:
        video = container.add_stream('libx264', rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, 'yuv420p'
        audio = container.add_stream('aac', rate=16000, layout='mono')
        samples = (0.1 * np.sin(np.arange(16000) / 10)).astype(np.float32)[None]
        for start in range(0, 16000, 1024):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(samples[:, start : start + 1024]), format='fltp', layout='mono'
            )
            frame.sample_rate, frame.pts = 16000, start
            container.mux(audio.encode(frame))
        container.mux(audio.encode())
    with pytest.raises(MediaError, match='video stream has no frames'):
        read_frames(path)


def test_eval_transform_matches_resize_crop_normalize(clip):
    frames = read_frames(clip, 16).frames.permute(0, 3, 1, 2)  # (T, 3, 96, 128)
    images = eval_transform()(frames)
    assert (
        images.shape == (16, 3, 224, 224)
        and images.dtype == torch.float32
        and images.is_contiguous()
    )
    import torchvision.transforms.v2 as T
    from torchvision.transforms import InterpolationMode

    reference = T.Compose(
        [
            T.Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(224),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )(frames)
    torch.testing.assert_close(images, reference, atol=1e-5, rtol=0)
    assert [frame_number(unnormalize(im).permute(1, 2, 0) * 255) for im in images] == [
        t * 60 // 16 for t in range(16)
    ]
    assert eval_transform(96)(frames).shape == (16, 3, 96, 96)
    # float input in [0, 1] gives the same images up to uint8 rounding of the resize
    assert (eval_transform()(frames.float() / 255) - images).abs().mean() < 1 / 255 / 0.225


def test_transform_portrait_and_single_frame():
    portrait = torch.randint(0, 256, (3, 200, 100), dtype=torch.uint8)
    assert eval_transform(64)(portrait).shape == (3, 64, 64)
    assert train_transform(64)(portrait).shape == (3, 64, 64)


def test_resize_matches_pil(media_dir):
    image = read_frames(media_dir / 'KlsG1EnBEjc_000361.mp4', 1).frames[0].numpy()  # 1280x720
    pil = np.asarray(Image.fromarray(image).resize((398, 224), Image.BICUBIC)).astype(int)
    import torchvision.transforms.v2.functional as F
    from torchvision.transforms import InterpolationMode

    ours = (
        F.resize(
            torch.from_numpy(image).permute(2, 0, 1),
            224,
            interpolation=InterpolationMode.BICUBIC,
            antialias=True,
        )
        .permute(1, 2, 0)
        .numpy()
        .astype(int)
    )
    assert np.abs(ours - pil).max() <= 2 and np.abs(ours - pil).mean() < 0.05


def test_real_frames_normalization_is_plausible(media_dir):
    for path in sorted(media_dir.glob('*.mp4')):
        images = eval_transform()(read_frames(path, 16).frames.permute(0, 3, 1, 2))
        assert -1.5 < images.mean() < 1.5 and 0.3 < images.std() < 1.6
        assert images.min() >= -2.12 and images.max() <= 2.65  # the range of normalized [0, 1]


def test_train_transform_is_random_and_seeded(clip):
    frame = read_frames(clip, 16, positions=[7]).frames.permute(0, 3, 1, 2)[
        0
    ]  # frame 26: bands 1, 3, 4 white
    torch.manual_seed(1)
    first = train_transform()(frame)
    torch.manual_seed(1)
    assert torch.equal(train_transform()(frame), first)
    crops = [train_transform()(frame) for _ in range(8)]
    assert all(c.shape == (3, 224, 224) for c in crops)
    assert any(not torch.equal(c, first) for c in crops)
    assert train_transform(112)(frame).shape == (3, 112, 112)
    # flips happen: a left/right-asymmetric frame shows both orientations over a few draws
    asymmetric = torch.zeros(3, 64, 64, dtype=torch.uint8)
    asymmetric[:, :, :16] = 255
    transform = train_transform(32, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    left_bright = {
        bool(transform(asymmetric)[:, :, :8].mean() > transform(asymmetric)[:, :, -8:].mean())
        for _ in range(30)
    }
    assert left_bright == {True, False}


def test_transform_rejects_bad_input():
    with pytest.raises(ValueError, match=r'\(\.\.\., 3, H, W\)'):
        eval_transform()(torch.zeros(4, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match='uint8 or floating'):
        eval_transform()(torch.zeros(3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match='image_size'):
        eval_transform(0)


def test_write_video_validates(tmp_path):
    with pytest.raises(ValueError, match='nothing to write'):
        write_video(tmp_path / 'x.mp4')
    with pytest.raises(ValueError, match='even'):
        write_video(tmp_path / 'x.mp4', np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match='channels'):
        write_video(tmp_path / 'x.mp4', audio=np.zeros((7, 100)))
