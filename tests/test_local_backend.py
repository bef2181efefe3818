"""The embedded backend: versions, labels, check-and-set, deletes, at-rest encryption, files."""

from __future__ import annotations

import os
import secrets
import sqlite3
import stat
from pathlib import Path

import pytest

from secretfs.backends.base import MetadataUpdate
from secretfs.backends.local import LocalBackend
from secretfs.crypto.keys import LocalMasterKey
from secretfs.errors import (
    ConflictError,
    IntegrityError,
    InvalidName,
    SecretNotFound,
    StoreError,
    VersionNotFound,
    WrongMasterKey,
)
from secretfs.model import Label, RotationPolicy


@pytest.fixture
def key() -> LocalMasterKey:
    return LocalMasterKey(secrets.token_bytes(32))


@pytest.fixture
def backend(tmp_path: Path, key: LocalMasterKey) -> LocalBackend:
    backend = LocalBackend.open(tmp_path / "data" / "store.db", key, create=True, max_versions=3)
    yield backend
    backend.close()


def test_versions_count_up_and_labels_follow(backend: LocalBackend) -> None:
    assert backend.write_version("db", b"one") == 1
    assert backend.write_version("db", b"two") == 2
    assert backend.write_version("db", {"user": "app", "password": "three"}) == 3
    metadata = backend.read_metadata("db")
    assert metadata.labels == {Label.CURRENT: 3, Label.PREVIOUS: 2}
    assert [v.version for v in metadata.versions] == [1, 2, 3]
    assert metadata.version_info(3).keys == ("user", "password")
    assert metadata.version_info(3).is_map
    assert backend.read_value("db", 1) == b"one"
    assert backend.read_value("db", 3) == {"user": "app", "password": "three"}


def test_pending_label_does_not_move_current(backend: LocalBackend) -> None:
    backend.write_version("db", b"one")
    backend.write_version("db", b"two", label=Label.PENDING)
    assert backend.read_metadata("db").labels == {Label.CURRENT: 1, Label.PENDING: 2}


def test_old_versions_are_pruned_but_labelled_ones_kept(backend: LocalBackend) -> None:
    backend.write_version("db", b"v1")
    backend.write_version("db", b"v2", label=Label.PENDING)  # pending keeps v2 alive
    for value in (b"v3", b"v4", b"v5", b"v6"):
        backend.write_version("db", value)
    kept = [v.version for v in backend.read_metadata("db").versions]
    assert kept == [2, 4, 5, 6]
    with pytest.raises(VersionNotFound):
        backend.read_value("db", 1)


def test_version_numbers_are_never_reused(backend: LocalBackend) -> None:
    backend.write_version("db", b"v1")
    backend.write_version("db", b"v2")
    backend.destroy("db", 2)
    assert backend.write_version("db", b"v3") == 3


def test_check_and_set(backend: LocalBackend) -> None:
    assert backend.write_version("db", b"v1", cas=0) == 1
    with pytest.raises(ConflictError, match="current version of 'db' is 1, not 0"):
        backend.write_version("db", b"again", cas=0)
    assert backend.write_version("db", b"v2", cas=1) == 2
    with pytest.raises(ConflictError, match="check-and-set failed"):
        backend.write_version("db", b"stale", cas=1)
    with pytest.raises(ConflictError, match="does not exist"):
        backend.write_version("new", b"x", cas=4)
    assert [v.version for v in backend.read_metadata("db").versions] == [1, 2]


def test_a_name_cannot_be_a_folder_of_another(backend: LocalBackend) -> None:
    backend.write_version("api/stripe", b"x")
    with pytest.raises(InvalidName, match="a folder of the existing secret 'api/stripe'"):
        backend.write_version("api", b"y")
    with pytest.raises(InvalidName, match="inside the existing secret 'api/stripe'"):
        backend.write_version("api/stripe/live", b"y")
    backend.write_version("api/stripe2", b"fine")
    backend.write_version("apiX", b"fine")


def test_metadata_is_kept_and_updated(backend: LocalBackend) -> None:
    policy = RotationPolicy(interval=90 * 86400.0, overlap=3600.0)
    backend.write_version(
        "db", b"v1",
        metadata=MetadataUpdate("Database password", {"env": "prod"}, policy),
    )
    backend.write_version("db", b"v2")  # no metadata: unchanged
    metadata = backend.read_metadata("db")
    assert (metadata.description, dict(metadata.tags), metadata.rotation) == (
        "Database password", {"env": "prod"}, policy)
    backend.update_metadata("db", MetadataUpdate(tags={"env": "staging"}))
    metadata = backend.read_metadata("db")
    assert metadata.description == "Database password"
    assert dict(metadata.tags) == {"env": "staging"}


def test_soft_delete_and_undelete(backend: LocalBackend) -> None:
    backend.write_version("db", b"v1")
    backend.write_version("other", b"x")
    backend.delete("db")
    with pytest.raises(SecretNotFound, match="is deleted"):
        backend.read_metadata("db")
    with pytest.raises(SecretNotFound, match="undelete"):
        backend.read_value("db", 1)
    assert [m.name for m in backend.list()] == ["other"]
    with pytest.raises(ConflictError, match="is deleted"):
        backend.write_version("db", b"v2")
    backend.undelete("db")
    assert backend.read_value("db", 1) == b"v1"


def test_version_delete_and_destroy(backend: LocalBackend) -> None:
    backend.write_version("db", b"v1")
    backend.write_version("db", b"v2")
    backend.delete("db", 1)
    with pytest.raises(VersionNotFound, match="is deleted"):
        backend.read_value("db", 1)
    backend.undelete("db", 1)
    assert backend.read_value("db", 1) == b"v1"
    backend.destroy("db", 1)
    with pytest.raises(VersionNotFound, match="destroyed"):
        backend.read_value("db", 1)
    row = sqlite3.connect(backend.path).execute(
        "SELECT wrapped_key, nonce, ciphertext FROM versions WHERE name='db' AND version=1"
    ).fetchone()
    assert row == (None, None, None)
    assert backend.read_metadata("db").version_info(1).destroyed


def test_destroying_a_secret_frees_its_name(backend: LocalBackend) -> None:
    backend.write_version("db", b"v1")
    backend.destroy("db")
    with pytest.raises(SecretNotFound):
        backend.read_metadata("db")
    assert backend.write_version("db", b"fresh") == 1


def test_list_by_prefix(backend: LocalBackend) -> None:
    for name in ("api/a", "api/b", "apix", "db"):
        backend.write_version(name, b"x")
    assert [m.name for m in backend.list("api/")] == ["api/a", "api/b"]
    assert [m.name for m in backend.list("api")] == ["api/a", "api/b", "apix"]
    assert [m.name for m in backend.list()] == ["api/a", "api/b", "apix", "db"]
    assert backend.list("api/")[0].labels == {Label.CURRENT: 1}


def test_files_are_private(tmp_path: Path, key: LocalMasterKey) -> None:
    backend = LocalBackend.open(tmp_path / "new" / "store.db", key, create=True)
    backend.write_version("db", b"x")
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    for path in (tmp_path / "new").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert {p.name for p in (tmp_path / "new").iterdir()} >= {"store.db", "store.db-wal"}
    backend.close()


def test_no_plaintext_in_the_store_or_its_journal(backend: LocalBackend) -> None:
    values = [secrets.token_hex(16).encode() for _ in range(20)]
    for i, value in enumerate(values):
        backend.write_version(f"s{i}", value)
        backend.write_version(f"m{i}", {"password": value.decode()})
    raw = b"".join(p.read_bytes() for p in backend.path.parent.iterdir())
    assert len(raw) > 0
    for value in values:
        assert value not in raw


def test_a_ciphertext_moved_to_another_slot_fails_integrity(backend: LocalBackend) -> None:
    backend.write_version("a", b"secret-of-a")
    backend.write_version("b", b"secret-of-b")
    db = sqlite3.connect(backend.path)
    db.execute(
        "UPDATE versions SET (key_id, wrapped_key, nonce, ciphertext) = "
        "(SELECT key_id, wrapped_key, nonce, ciphertext FROM versions WHERE name='a') "
        "WHERE name = 'b'"
    )
    db.commit()
    with pytest.raises(IntegrityError, match="store integrity") as caught:
        backend.read_value("b", 1)
    assert caught.value.exit_code == 8
    assert backend.read_value("a", 1) == b"secret-of-a"


def test_a_wrong_master_key_names_the_key_ids(backend: LocalBackend, key: LocalMasterKey) -> None:
    backend.write_version("db", b"v1")
    other = LocalMasterKey(secrets.token_bytes(32))
    wrong = LocalBackend.open(backend.path, other)
    with pytest.raises(WrongMasterKey) as caught:
        wrong.read_value("db", 1)
    assert key.key_id in str(caught.value) and other.key_id in str(caught.value)
    with pytest.raises(WrongMasterKey):
        wrong.write_version("db", b"v2")
    assert [v.version for v in backend.read_metadata("db").versions] == [1]
    wrong.close()


def test_missing_or_foreign_store(tmp_path: Path, key: LocalMasterKey) -> None:
    with pytest.raises(StoreError, match="secretfs init"):
        LocalBackend.open(tmp_path / "none.db", key)
    foreign = tmp_path / "foreign.db"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(StoreError, match="not a secretfs store"):
        LocalBackend.open(foreign, key, create=True)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="cannot open the store"):
        LocalBackend.open(garbage, key)


def test_the_change_feed_names_what_changed(backend: LocalBackend, key: LocalMasterKey) -> None:
    cursor, names = backend.changes_since(None)
    assert names is None  # first call: reload everything
    backend.write_version("a", b"x")
    other = LocalBackend.open(backend.path, key)  # another process writing the same file
    other.write_version("b", b"y")
    other.update_metadata("a", MetadataUpdate(description="d"))
    other.close()
    cursor, names = backend.changes_since(cursor)
    assert names == {"a", "b"}
    backend.delete("b")
    backend.destroy("a")
    cursor, names = backend.changes_since(cursor)
    assert names == {"a", "b"}
    assert backend.changes_since(cursor) == (cursor, set())
    assert backend.changes_since(cursor + 5)[1] is None  # a cursor from another store


def test_a_reader_far_behind_the_feed_reloads(backend: LocalBackend, monkeypatch) -> None:
    import secretfs.backends.local as local

    monkeypatch.setattr(local, "CHANGE_FEED_LENGTH", 3)
    cursor, _ = backend.changes_since(None)
    for i in range(6):
        backend.write_version(f"s{i}", b"x")
    assert backend.changes_since(cursor)[1] is None


def test_names_and_sizes_come_without_values(backend: LocalBackend) -> None:
    backend.write_version("b", {"user": "app", "password": "12345"})
    backend.write_version("a", b"\x00" * 7)
    assert backend.list_names() == ["a", "b"]
    assert backend.list_names("b") == ["b"]
    info = backend.read_metadata("b").version_info(1)
    assert (info.size_of("user"), info.size_of("password"), info.size_of("x")) == (3, 5, None)
    assert backend.read_metadata("a").version_info(1).size_of("value") == 7
