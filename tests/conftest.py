import os
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("PNEUMOSEG_REAL_DATA", REPO.parent / "shared" / "data" / "siim-real"))


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """The real SIIM files (../shared/data/siim-real); tests using it skip when it is absent."""
    if not REAL.is_dir():
        pytest.skip(f"real SIIM test files not found at {REAL}")
    return REAL
