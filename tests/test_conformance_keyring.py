"""The keyring backend: the conformance suite on a file-backed keyring, and what is its own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest
from keyrings.alt.file import PlaintextKeyring

from secretfs.backends.base import MetadataUpdate
from secretfs.backends.keyring import INDEX_USERNAME, KeyringBackend, open_keyring
from secretfs.config import BackendConfig, Config
from secretfs.errors import BackendUnavailable, InvalidName, StoreError, UsageError
from secretfs.model import Label
from secretfs.testing import BackendConformance, no_value_in_error, token


def file_keyring(path: Path) -> PlaintextKeyring:
    ring = PlaintextKeyring()
    ring.file_path = str(path)  # never the user's own keyring file
    return ring


@pytest.fixture
def ring(tmp_path: Path) -> PlaintextKeyring:
    return file_keyring(tmp_path / "keyring.cfg")


class TestKeyringConformance(BackendConformance):
    @pytest.fixture
    def backend(self, ring: PlaintextKeyring) -> Iterator[KeyringBackend]:
        backend = KeyringBackend("secretfs-test", keyring=ring)
        yield backend
        backend.close()


def test_one_entry_per_secret_and_an_index(ring: PlaintextKeyring) -> None:
    backend = KeyringBackend("svc", keyring=ring)
    value = token()
    backend.write_version("api/stripe", {"secret": value.decode()},
                          metadata=MetadataUpdate(description="Stripe", tags={"env": "prod"}))
    record = json.loads(ring.get_password("svc", "api/stripe"))
    assert record["value"] == {"secret": value.decode()}
    assert (record["description"], record["tags"], record["version"]) == (
        "Stripe", {"env": "prod"}, 1)
    assert json.loads(ring.get_password("svc", INDEX_USERNAME))["names"] == ["api/stripe"]


def test_the_index_survives_a_new_backend_object(tmp_path: Path) -> None:
    first = KeyringBackend("svc", keyring=file_keyring(tmp_path / "k.cfg"))
    for name in ("b", "a/x", "c"):
        first.write_version(name, token())
    first.close()
    second = KeyringBackend("svc", keyring=file_keyring(tmp_path / "k.cfg"))
    assert second.list_names() == ["a/x", "b", "c"]
    assert second.write_version("b", token()) == 2  # the number goes on, not back to 1
    other_service = KeyringBackend("other", keyring=file_keyring(tmp_path / "k.cfg"))
    assert other_service.list_names() == []


def test_info_shows_a_single_version(ring: PlaintextKeyring) -> None:
    backend = KeyringBackend(keyring=ring)
    values = [token() for _ in range(3)]
    for value in values:
        backend.write_version("db", value)
    metadata = backend.read_metadata("db")
    assert [v.version for v in metadata.versions] == [3]
    assert metadata.labels == {Label.CURRENT: 3}
    assert backend.read_value("db", 3) == values[-1]
    with no_value_in_error(Exception, *values) as caught:
        backend.read_value("db", 2)
    assert "keeps only the newest, version 3" in str(caught.value)


def test_the_index_name_is_reserved(ring: PlaintextKeyring) -> None:
    backend = KeyringBackend(keyring=ring)
    with pytest.raises(InvalidName, match="reserved"):
        backend.write_version(INDEX_USERNAME, b"x")
    with pytest.raises(Exception, match="not found"):
        backend.read_metadata(INDEX_USERNAME)


def test_a_listed_name_without_its_entry_is_skipped_and_destroyable(
        ring: PlaintextKeyring) -> None:
    backend = KeyringBackend("svc", keyring=ring)
    backend.write_version("a", token())
    backend.write_version("b", token())
    ring.delete_password("svc", "b")  # as if a process died between index and entry
    assert [m.name for m in backend.list()] == ["a"]
    backend.destroy("b")
    assert backend.list_names() == ["a"]


def test_a_foreign_entry_is_refused_without_showing_it(ring: PlaintextKeyring) -> None:
    backend = KeyringBackend("svc", keyring=ring)
    backend.write_version("db", token())
    ring.set_password("svc", "db", "hunter2-not-json")
    with no_value_in_error(StoreError, b"hunter2-not-json") as caught:
        backend.read_metadata("db")
    assert "not a secretfs record" in str(caught.value)


def test_a_failing_keychain_is_unavailable() -> None:
    from keyring.backends.fail import Keyring as NoKeyring

    backend = KeyringBackend(keyring=NoKeyring())
    with pytest.raises(BackendUnavailable, match="keychain"):
        backend.list_names()


def test_what_it_cannot_do_says_so(ring: PlaintextKeyring) -> None:
    backend = KeyringBackend(keyring=ring)
    backend.write_version("db", token())
    with pytest.raises(UsageError, match="--destroy"):
        backend.delete("db")
    with pytest.raises(UsageError, match="pending"):
        backend.write_version("db", token(), label=Label.PENDING)
    backend.set_rotation_state("db", None)  # forgetting nothing is fine


def test_the_factory_reads_the_service() -> None:
    config = Config()
    assert open_keyring(config).service == "secretfs"
    backend_config = BackendConfig(type="keyring", options=MappingProxyType({"service": "work"}))
    configured = replace(config, manager=replace(config.manager, backend=backend_config))
    assert open_keyring(configured, create=True).service == "work"
    assert open_keyring(configured).kind == "keyring"


def test_importing_the_module_does_not_import_keyring() -> None:
    import subprocess
    import sys

    code = ("import sys, secretfs.backends.keyring; "
            "sys.exit(1 if 'keyring' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
