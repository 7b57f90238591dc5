"""Shared fixtures: the reference data and real media in ../shared beside the checkout
(`cavmae_sync.config.shared_dir`):
tests that need them skip on a user's machine without them, and fail under CI."""

from pathlib import Path
import pytest
from cavmae_sync.config import shared_dir as find_shared

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def shared_dir() -> Path:
    folder = find_shared()  # raises under CI when the folder is missing
    if folder is None:
        pytest.skip('../shared is absent: reference data and media are not available')
    return folder


@pytest.fixture(scope='session')
def reference_dir(shared_dir) -> Path:
    return shared_dir / 'reference'


@pytest.fixture(scope='session')
def media_dir(shared_dir) -> Path:
    return shared_dir / 'media'


@pytest.fixture(scope='session')
def clips(tmp_path_factory) -> Path:
    """16 training and 8 test clips of the synthetic testbed, small and short: the training tests'
    data, made once per run (read only)."""
    from cavmae_sync.synthetic import make_synthetic

    root = tmp_path_factory.mktemp('clips') / 'synthetic'
    make_synthetic(root, num_train=16, num_test=8, seed=0, image_size=64, duration=6.0, workers=1)
    return root
