"""The conformance suite on the embedded backend, the reference every other backend matches."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretfs.backends.base import CAPABILITIES
from secretfs.backends.local import LocalBackend
from secretfs.crypto.keys import LocalMasterKey
from secretfs.testing import BackendConformance


class TestLocalConformance(BackendConformance):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[LocalBackend]:
        # the default max_versions: the suite holds with pruning on, as users run it
        backend = LocalBackend.open(tmp_path / "store.db", LocalMasterKey(secrets.token_bytes(32)),
                                    create=True)
        yield backend
        backend.close()


def test_the_local_backend_declares_every_capability() -> None:
    assert LocalBackend.capabilities == frozenset(CAPABILITIES)
