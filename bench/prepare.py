"""Benchmark: probing clips for `cavmae-sync-prepare` (metadata and one demux pass, no decoding).

Writes 10-s 640x360 H.264 + AAC clips (25 fps, stereo 44.1 kHz, like VGGSound / AudioSet uploads) to a temporary folder,
then times `probe_video` (the readability rule `load_clip` applies too) on one core, median over interleaved rounds.
Prints one JSON object: seconds per clip, clips/s per core (target >= 20) and hours to probe AudioSet-2M on 64 cores.
Usage: python bench/prepare.py [NUM_CLIPS]
"""

import json
import statistics
import sys
import tempfile
import time

import torch

from _media import write_upload_like_clips
from cavmae_sync.data import probe_video


def main():
    torch.set_num_threads(1)
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    with tempfile.TemporaryDirectory() as folder:
        clips = write_upload_like_clips(folder, count)
        for clip in clips:
            probe_video(clip)  # warm-up
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for clip in clips:
                probe_video(clip)
            rounds.append((time.perf_counter() - start) / len(clips))
    per_clip = statistics.median(rounds)
    print(
        json.dumps(
            {
                'benchmark': 'prepare_probe',
                'threads': 1,
                'clips': count,
                'clip': '10 s, 640x360, 25 fps H.264 + AAC',
                'seconds_per_clip': round(per_clip, 5),
                'clips_per_s_per_core': round(1 / per_clip, 1),
                'target_clips_per_s_per_core': 20,
                'audioset_2m_hours_on_64_cores': round(2_000_000 * per_clip / 64 / 3600, 2),
            },
            indent=1,
        )
    )


if __name__ == '__main__':
    main()
