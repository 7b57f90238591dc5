"What the data benchmarks share: real H.264 + AAC clips of the size uploads have, written to a folder."

from pathlib import Path

import numpy as np

from cavmae_sync.video import write_video


def write_upload_like_clips(
    folder, count: int, seconds: float = 10.0, size=(640, 360), fps: int = 25
) -> list[Path]:
    "`count` clips of `seconds` s at `size` (W, H) and `fps`, stereo 44.1 kHz AAC, whose pictures change every frame."
    rng, (width, height), frames = np.random.default_rng(0), size, int(seconds * fps)
    clips = []
    for k in range(count):
        video = np.repeat(
            rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8), frames, axis=0
        )  # (F, H, W, 3)
        video[:, :, :, k % 3] = (np.arange(frames) % 256).astype(np.uint8)[
            :, None, None
        ]  # a channel ramps per frame
        audio = 0.1 * rng.standard_normal((2, int(seconds * 44_100))).astype(
            np.float32
        )  # (2, S) stereo
        clips.append(
            write_video(Path(folder) / f'clip{k:03d}.mp4', video, fps, audio, sample_rate=44_100)
        )
    return clips
