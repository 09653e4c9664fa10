"""Shared pytest fixtures. `shared_data` finds the project's read-only real volumes in ../shared/data."""

import os
from pathlib import Path

import pytest

# MONAI Label must not score the datastore in the background while tests run.
os.environ.setdefault("MONAI_LABEL_AUTO_UPDATE_SCORING", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`<repo>/../shared/data` (see its README.md); skips the test when the folder is absent."""
    path = (REPO / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (expected ../shared/data beside the repository)")
    return path
