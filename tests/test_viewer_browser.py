"""The ipywidgets localization viewer in JupyterLab in a real headless Chromium (slow; skipped without chromium):
the widget renders in the page, and stepping to another frame redraws its image (tests/browser_viewer.py drives it)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import browser_viewer


@pytest.mark.slow
def test_viewer_renders_and_steps_in_jupyterlab(tmp_path):
    if browser_viewer.chromium_binary() is None:
        pytest.skip('chromium is not installed (apt-get install chromium)')
    pytest.importorskip('websocket')
    from cavmae_sync.sync import time_coded_clip

    clip = time_coded_clip(tmp_path / 'clip.mp4')
    first, stepped = tmp_path / 'first.png', tmp_path / 'stepped.png'
    shown = browser_viewer.run(first, stepped, clip, step_to=8)
    assert (
        shown['first_image']
        and shown['stepped_image']
        and shown['first_image'] != shown['stepped_image']
    )  # redrawn
    assert shown['slider_readout'] == '8' and shown['stderr_outputs'] == 0
    for png in (first, stepped):
        assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 20_000
