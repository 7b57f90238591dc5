"Shared fixtures: the reference data and real media in ../shared beside the checkout (tests skip without them)."
import os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get('CAVMAE_SYNC_SHARED', ROOT.parent / 'shared'))


@pytest.fixture(scope='session')
def shared_dir() -> Path:
    if not SHARED.is_dir(): pytest.skip(f'{SHARED} is absent: reference data and media are not available')
    return SHARED


@pytest.fixture(scope='session')
def reference_dir(shared_dir) -> Path: return shared_dir / 'reference'


@pytest.fixture(scope='session')
def media_dir(shared_dir) -> Path: return shared_dir / 'media'
