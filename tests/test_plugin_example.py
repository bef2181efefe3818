"""The plugin example of docs/backends.md is complete: it passes the conformance suite."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretfs.testing import BackendConformance

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "plugin"))
from memory_backend import MemoryBackend


class TestMemoryBackendPlugin(BackendConformance):
    @pytest.fixture
    def backend(self) -> Iterator[MemoryBackend]:
        backend = MemoryBackend()
        yield backend
        backend.close()
