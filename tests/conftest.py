"""Shared fixtures (the helpers they use are in tests/helpers.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Store, make_store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return make_store(tmp_path / "store")


@pytest.fixture
def folder() -> Iterator[Path]:
    """A temp folder for mountpoints, with a short path outside pytest's deep tmp tree; removed
    afterwards. (Modules whose mounts other uids must reach define their own, 0755.)"""
    made = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)

