"Generated media for the tests: clips whose frames carry their index and whose channels carry distinct tones."

from pathlib import Path

import av
import numpy as np

from cavmae_sync.video import write_video


def numbered_frames(num_frames, height=96, width=128):
    "(N, H, W, 3) uint8 frames; frame i shows the bits of i as eight horizontal black/white bands."
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    band = height // 8
    for i in range(num_frames):
        for bit in range(8):
            if i >> bit & 1:
                frames[i, bit * band : (bit + 1) * band] = 255
    return frames


def frame_number(image):
    "Read back the index of an (H, W, 3) frame (uint8 or float in 0..255) written by `numbered_frames`."
    image = np.asarray(image, dtype=np.float64)
    band = image.shape[0] / 8
    return sum(
        1 << bit
        for bit in range(8)
        if image[int((bit + 0.3) * band) : int((bit + 0.7) * band)].mean() > 127
    )


def channel_frequency(channel):
    return 440.0 * (channel + 1)  # channel c holds a (c + 1) x 440 Hz tone


def write_clip(
    path,
    seconds=2.0,
    fps=10,
    sample_rate=16_000,
    channels=2,
    video=True,
    audio=True,
    height=96,
    width=128,
):
    "An H.264 + AAC clip (mp4 with faststart): numbered frames and one tone per channel."
    times = np.arange(int(round(seconds * sample_rate))) / sample_rate
    tones = np.stack(
        [0.3 * np.sin(2 * np.pi * channel_frequency(c) * times) for c in range(channels)]
    )
    frames = numbered_frames(max(1, int(round(seconds * fps))), height, width) if video else None
    return write_video(Path(path), frames, fps, tones if audio else None, sample_rate)


def shift_before_zero(source, target, seconds):
    "Remux `source` with its video moved `seconds` before time 0: the mp4 muxer hides them with an edit list."
    with av.open(str(source)) as src, av.open(str(target), 'w') as dst:
        stream_in = src.streams.video[0]
        stream_out = dst.add_stream_from_template(stream_in)
        shift = int(round(seconds / stream_in.time_base))
        for packet in src.demux(stream_in):
            if packet.dts is None:
                continue
            packet.pts -= shift
            packet.dts -= shift
            packet.stream = stream_out
            dst.mux(packet)
    return Path(target)


def truncate(source, target, fraction=0.5):
    data = Path(source).read_bytes()
    Path(target).write_bytes(data[: int(len(data) * fraction)])
    return Path(target)


def pyav_frames(path):
    "Every frame a player shows, as (H, W, 3) uint8 arrays (PyAV applies edit lists like ffmpeg)."
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format='rgb24') for frame in container.decode(video=0)]


def avi_declaring_more_frames(path, frames=20, extra=1, fps=10):
    "An mpeg4 + mp2 AVI holding `frames` frames whose headers (avih dwTotalFrames, strh dwLength) declare `extra` more."
    import struct

    write_video(
        Path(path),
        numbered_frames(frames),
        fps,
        0.1 * np.random.default_rng(0).standard_normal((1, 16_000 * frames // fps)),
        video_codec='mpeg4',
        audio_codec='mp2',
    )
    data = bytearray(Path(path).read_bytes())
    avih, strh = data.find(b'avih'), data.find(b'strh')
    assert data[strh + 8 : strh + 12] == b'vids'
    for offset in (avih + 24, strh + 40):  # dwTotalFrames, the video stream's dwLength
        assert struct.unpack_from('<I', data, offset)[0] == frames
        struct.pack_into('<I', data, offset, frames + extra)
    Path(path).write_bytes(bytes(data))
    return Path(path)
