"""`secretfs backup` / `secretfs restore` (docs/backup.md): an encrypted, authenticated archive of
the whole store, restored exactly into an empty store, all or nothing.

Values are compared in-process and never printed: a failing comparison names the secret and
version, not the bytes (``same``)."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secretfs.backends.base import MetadataUpdate
from secretfs.backup import (
    CHUNK_SIZE,
    TAG_SIZE,
    ArchiveError,
    KeyFile,
    Passphrase,
    export_via_protocol,
    read_archive,
    restore,
    write_archive,
)
from secretfs.config import load_config, parse_config
from secretfs.errors import ConflictError
from secretfs.manager import SyncSecretsManager
from secretfs.model import GeneratorSpec, Label, RotationPolicy, RotationState, RotationStep
from tests.helpers import SEED_POLICY, Store, make_store, one_line_error

SECRETS = 500
PASSPHRASE = "correct horse battery staple " + secrets.token_hex(4)
FAST_SCRYPT = {"n": 2**10, "r": 8, "p": 1}  # in-process archives only; the CLI uses the default


def same(mine: object, theirs: object, what: str) -> None:
    """Fail naming *what* — never showing either value."""
    if mine != theirs:
        pytest.fail(f"{what} differs after the round trip", pytrace=False)


def manager_of(store: Store) -> SyncSecretsManager:
    return SyncSecretsManager.from_config(load_config(store.config))


def private_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# -- a store with everything in it ---------------------------------------------------------------


@dataclass
class Filled:
    store: Store
    values: dict[tuple[str, int], object]  # every value a version holds (deleted ones too)
    deleted_secret: str
    destroyed: tuple[str, int]
    deleted_version: tuple[str, int]
    gappy: str


def fill(store: Store, count: int = SECRETS) -> Filled:
    """*count* secrets written in-process: 1–4 versions, single, binary and map values,
    descriptions, tags, rotation policies, pending labels and an unfinished rotation, a
    soft-deleted secret, a destroyed and a deleted version, and version numbers with gaps."""
    values: dict[tuple[str, int], object] = {}
    with manager_of(store) as manager:
        backend = manager.backend
        names = []
        for i in range(count):
            name = f"team{i % 10}/svc{i}" if i % 2 else f"app{i}"
            names.append(name)
            for _ in range(1 + i % 4):
                if i % 5 == 0:
                    value: object = {"user": f"u{i}", "password": secrets.token_hex(12)}
                elif i % 7 == 0:
                    value = os.urandom(24) + b"\x00" + os.urandom(8)
                else:
                    value = secrets.token_hex(14).encode()
                metadata = None
                if i % 3 == 0:
                    metadata = MetadataUpdate(
                        description=f"service {i}: ünïcode ok", tags={"env": "prod", "n": str(i)},
                        rotation=RotationPolicy(
                            interval=86400.0 * (1 + i % 90) if i % 2 else None,
                            schedule=None if i % 2 else "0 3 * * *", overlap=3600.0,
                            generator=GeneratorSpec(length=20 + i % 10, charset="hex"),
                            set_cmd="true" if i % 9 == 0 else None,
                            key="password" if i % 5 == 0 else None))
                version = backend.write_version(name, value, metadata=metadata)
                values[(name, version)] = value
            if i % 11 == 0:
                pending = backend.write_version(name, secrets.token_hex(10).encode(),
                                                label=Label.PENDING)
                values[(name, pending)] = backend.read_value(name, pending)
                if i == 11:
                    backend.set_rotation_state(name, RotationState(
                        pending, RotationStep.APPLYING, "lost-host:4242", 1700000000.5,
                        1700000100.25))
        # Version numbers with gaps: only the newest 3 are kept, plus what a label holds.
        gappy = "gappy"
        backend.max_versions = 3
        for label in (Label.CURRENT, Label.PENDING, Label.CURRENT, Label.CURRENT, Label.CURRENT,
                      Label.CURRENT):
            version = backend.write_version(gappy, secrets.token_hex(9).encode(), label=label)
            values[(gappy, version)] = backend.read_value(gappy, version)
        backend.max_versions = 10
        kept = {v.version for v in backend.read_metadata(gappy).versions}
        for pruned in {v for (n, v) in values if n == gappy} - kept:
            del values[(gappy, pruned)]
        deleted_secret = names[4]
        backend.delete(deleted_secret)
        destroyed = (names[3], 1)
        backend.destroy(*destroyed)
        values.pop(destroyed)
        deleted_version = (names[6], 2)
        backend.delete(*deleted_version)
    assert [v for (n, v) in values if n == gappy] == [2, 4, 5, 6], "the gap this test needs"
    return Filled(store, values, deleted_secret, destroyed, deleted_version, gappy)


def rows(store: Store) -> dict[str, list[tuple]]:
    """Every stored row but the ciphertexts and key ids (those differ by design: values are
    sealed anew under the target's master key)."""
    db = sqlite3.connect(store.db)
    try:
        return {
            "secrets": db.execute("SELECT * FROM secrets ORDER BY name").fetchall(),
            "versions": db.execute(
                "SELECT name, version, created, is_map, keys, sizes, deleted, destroyed, "
                "wrapped_key IS NULL, ciphertext IS NULL FROM versions ORDER BY name, version"
            ).fetchall(),
            "labels": db.execute("SELECT * FROM labels ORDER BY name, label").fetchall(),
            "rotations": db.execute("SELECT * FROM rotations ORDER BY name").fetchall(),
        }
    finally:
        db.close()


def stored_count(store: Store) -> int:
    return stored_count_at(store.db)


def stored_count_at(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return sum(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                   for table in ("secrets", "versions", "labels", "rotations"))
    finally:
        db.close()


def audit(store: Store) -> list[dict]:
    log = store.root / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Filled:
    store = make_store(tmp_path_factory.mktemp("source"))
    with store.config.open("a") as config:
        config.write("# who may read what\n" + SEED_POLICY)
    return fill(store)


@pytest.fixture(scope="module")
def archive(source: Filled, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The source store backed up by the CLI with --passphrase-file (default scrypt)."""
    folder = tmp_path_factory.mktemp("archive")
    passphrase = private_file(folder / "passphrase", PASSPHRASE + "\n")
    path = folder / "store.sfb"
    before = len(audit(source.store))
    result = source.store.cli("backup", str(path), "--passphrase-file", str(passphrase),
                              check=True)
    assert result.stdout.decode().startswith(f"backed up {SECRETS + 1} secrets (")
    lines = audit(source.store)[before:]
    assert [(r["event"], r["action"], r["resource"], r["decision"]) for r in lines] == [
        ("backup", "read", "*", "allow")]
    assert lines[0]["secrets"] == SECRETS + 1
    return path


@pytest.fixture
def empty(tmp_path: Path) -> Store:
    return make_store(tmp_path / "empty")


# -- the round trip ------------------------------------------------------------------------------


def test_restore_reproduces_the_store_exactly(source: Filled, archive: Path,
                                              tmp_path: Path) -> None:
    assert (archive.stat().st_mode & 0o777) == 0o600
    target = make_store(tmp_path / "target")  # a new host: a fresh store, another master key
    passphrase = private_file(tmp_path / "pw", PASSPHRASE)
    before = len(audit(target))
    policies = tmp_path / "policies.yaml"
    result = target.cli("restore", str(archive), "--passphrase-file", str(passphrase),
                        "--policies-out", str(policies), check=True)
    out = result.stdout.decode()
    assert out.startswith(f"restored {SECRETS + 1} secrets (")
    assert f"1 principal and 1 policy of {source.store.config} written to {policies}" in out

    # One audit line, written before the store changed.
    lines = audit(target)[before:]
    assert [(r["event"], r["action"], r["resource"]) for r in lines] == [
        ("restore", "write", "*")]
    assert lines[0]["secrets"] == SECRETS + 1 and lines[0]["archive"] == str(archive)

    # Field by field: every row of every table (names, version numbers with their gaps,
    # created/updated/deleted/destroyed times, keys, sizes, labels, tags, descriptions,
    # rotation policies, the unfinished rotation, the change counter next_version).
    mine, theirs = rows(source.store), rows(target)
    for table in mine:
        assert len(mine[table]) == len(theirs[table]), table
        for a, b in zip(mine[table], theirs[table], strict=True):
            assert a == b, table
    assert any(row[7] for row in theirs["secrets"]), "the soft-deleted secret came back"
    assert theirs["rotations"], "the unfinished rotation came back"

    with manager_of(source.store) as old, manager_of(target) as new:
        assert old.backend.master_key.key_id != new.backend.master_key.key_id
        # Through the Backend protocol, as every front end sees it.
        assert [m.to_json() for m in old.backend.list()] == [
            m.to_json() for m in new.backend.list()]
        gappy = new.backend.read_metadata(source.gappy)
        assert [v.version for v in gappy.versions] == [2, 4, 5, 6]
        assert dict(gappy.labels) == {Label.CURRENT: 6, Label.PREVIOUS: 5, Label.PENDING: 2}
        name, version = source.destroyed
        info = new.backend.read_metadata(name).version_info(version)
        assert info is not None and info.destroyed
        name, version = source.deleted_version
        info = new.backend.read_metadata(name).version_info(version)
        assert info is not None and info.deleted and not info.destroyed
        # Every value, the deleted ones included, decrypted with the target's own key.
        readable = 0
        for (name, version), value in source.values.items():
            live = name != source.deleted_secret and (name, version) != source.deleted_version
            if live:
                same(new.backend.read_value(name, version), value, f"{name} v{version}")
                readable += 1
        assert readable > 1000
        restored = {(r["name"], v["version"]): v["value"]
                    for r in new.backend.export_secrets() for v in r["versions"]}
        exported = {(r["name"], v["version"]): v["value"]
                    for r in old.backend.export_secrets() for v in r["versions"]}
        assert restored.keys() == exported.keys()
        for key in exported:
            same(restored[key], exported[key], f"{key[0]} v{key[1]} (deleted ones included)")
        assert restored[source.destroyed] is None

    # The principals and policies, as written in the source's configuration.
    rules = parse_config(policies.read_text())
    config = load_config(source.store.config)
    assert dict(rules.principals) == dict(config.principals)
    assert dict(rules.policies) == dict(config.policies)
    assert "principals:" in policies.read_text() and (policies.stat().st_mode & 0o777) == 0o600


def test_the_archive_shows_no_value_and_no_name(source: Filled, archive: Path) -> None:
    data = archive.read_bytes()
    needles: list[bytes] = []
    for value in source.values.values():
        if isinstance(value, dict):
            needles += [item.encode() for item in value.values() if len(item) >= 8]
            needles.append(json.dumps(value, separators=(",", ":")).encode())
        else:
            needles.append(value)
    assert len(needles) > 1000
    leaked = sum(needle in data for needle in needles)
    assert leaked == 0, f"{leaked} values appear in the archive"  # counts only, never the bytes
    for name in ("gappy", "team1/svc1", "svc499", "service 3", "lost-host"):
        assert name.encode() not in data


def test_check_reads_the_whole_archive_and_writes_nothing(archive: Path, tmp_path: Path) -> None:
    elsewhere = make_store(tmp_path / "unused", init=False)
    result = elsewhere.cli("restore", str(archive), "--check",
                           env=elsewhere.env(SECRETFS_PASSPHRASE=PASSPHRASE))
    assert result.returncode == 0, result.stderr
    assert f"is intact: {SECRETS + 1} secrets" in result.stdout.decode()
    assert not elsewhere.db.exists()


def test_policies_are_kept_as_written_or_else_written_out_anew(tmp_path: Path) -> None:
    from secretfs.backup import policy_sections

    block = tmp_path / "block.yaml"
    block.write_text("secrets_manager: {backend: {type: local}}\n" + SEED_POLICY.replace(
        "policies:", "policies:   # the rules\n  # service-a reads the database\n", 1))
    kept = policy_sections(load_config(block))
    assert kept is not None and kept["source"] == str(block)
    assert "# service-a reads the database" in kept["text"]  # comments and layout kept
    assert "secrets_manager" not in kept["text"]
    flow = tmp_path / "flow.yaml"
    flow.write_text(json.dumps({"principals": {"ops": {"uid": 0, "exe": "/usr/bin/*"}},
                                "policies": {"ops": {"allow": [{"action": "read",
                                                                "resources": ["db/*"]}]}}}))
    anew = policy_sections(load_config(flow))
    assert anew is not None and anew["text"] != flow.read_text()
    for path, sections in ((block, kept), (flow, anew)):
        again, config = parse_config(sections["text"]), load_config(path)
        assert dict(again.principals) == dict(config.principals), path
        assert dict(again.policies) == dict(config.policies), path
    assert policy_sections(parse_config("secrets_manager: {}\n")) is None


# -- damage: a byte changed anywhere, cut short, extended, reordered ------------------------------


def chunk_starts(data: bytes) -> list[int]:
    header_end = 20 + int.from_bytes(data[18:20], "big")
    return list(range(header_end, len(data), CHUNK_SIZE + TAG_SIZE))


def sample_offsets(data: bytes) -> list[int]:
    header_end = chunk_starts(data)[0]
    offsets = {0, 7, 15, 16, 17, 18, 19, 20, 30, header_end // 2, header_end - 1, len(data) - 1}
    for start in chunk_starts(data):
        end = min(start + CHUNK_SIZE + TAG_SIZE, len(data))
        offsets |= {start, start + 1, (start + end) // 2, end - TAG_SIZE - 1, end - TAG_SIZE,
                    end - 1}
    return sorted(offsets)


def assert_empty(store: Store) -> None:
    assert stored_count(store) == 0, "a failed restore wrote something"


def test_a_one_byte_edit_anywhere_is_refused_and_writes_nothing(archive: Path, empty: Store,
                                                                tmp_path: Path) -> None:
    data = archive.read_bytes()
    assert len(chunk_starts(data)) >= 4, "the archive should span several chunks"
    offsets = sample_offsets(data)
    assert len(offsets) > 30
    damaged = tmp_path / "damaged.sfb"
    with manager_of(empty) as manager:
        for n, offset in enumerate(offsets):
            edited = bytearray(data)
            edited[offset] ^= 0x01 if n % 2 else 0xA5
            damaged.write_bytes(edited)
            with pytest.raises(ArchiveError) as refused:
                restore(manager, damaged, Passphrase(PASSPHRASE))
            assert "damaged" in str(refused.value), offset
            assert refused.value.exit_code == 8
            assert_empty(empty)


@pytest.mark.parametrize("where", ["first byte", "header", "middle chunk", "a tag", "last byte"])
def test_a_one_byte_edit_fails_the_cli_with_exit_8(archive: Path, empty: Store, tmp_path: Path,
                                                   where: str) -> None:
    data = bytearray(archive.read_bytes())
    starts = chunk_starts(bytes(data))
    offset = {"first byte": 0, "header": 40, "middle chunk": starts[2] + 999,
              "a tag": starts[1] - 3, "last byte": len(data) - 1}[where]
    data[offset] ^= 0x40
    damaged = tmp_path / "damaged.sfb"
    damaged.write_bytes(data)
    result = empty.cli("restore", str(damaged), env=empty.env(SECRETFS_PASSPHRASE=PASSPHRASE))
    assert result.returncode == 8
    assert "damaged" in one_line_error(result)
    assert_empty(empty)


def test_cut_short_extended_or_reordered_archives_are_refused(archive: Path, empty: Store,
                                                              tmp_path: Path) -> None:
    data = archive.read_bytes()
    starts = chunk_starts(data)
    step = CHUNK_SIZE + TAG_SIZE
    variants = {
        f"cut at {n}": data[:n]
        for n in (0, 5, 19, starts[0], starts[0] + 100, starts[1], starts[2], starts[2] + 7,
                  len(data) - TAG_SIZE, len(data) - 1)
    }
    variants["one byte added"] = data + b"\x00"
    variants["a tag's worth added"] = data + os.urandom(TAG_SIZE)
    variants["the last chunk twice"] = data + data[starts[-1]:]
    variants["chunks 1 and 2 swapped"] = (data[:starts[1]] + data[starts[2]:starts[2] + step]
                                          + data[starts[1]:starts[2]] + data[starts[2] + step:])
    variants["chunk 1 dropped"] = data[:starts[1]] + data[starts[2]:]
    variants["a byte inserted"] = data[:starts[1] + 5] + b"x" + data[starts[1] + 5:]
    path = tmp_path / "variant.sfb"
    with manager_of(empty) as manager:
        for what, variant in variants.items():
            path.write_bytes(variant)
            with pytest.raises(ArchiveError):
                restore(manager, path, Passphrase(PASSPHRASE))
            assert_empty(empty), what
    for what in ("cut at 117", "one byte added"):  # the same through the CLI
        path.write_bytes(data[:117] if what.startswith("cut") else data + b"\n")
        result = empty.cli("restore", str(path), env=empty.env(SECRETFS_PASSPHRASE=PASSPHRASE))
        assert result.returncode == 8, what
        assert "damaged" in one_line_error(result)
        assert_empty(empty)


def test_a_wrong_passphrase_gives_the_damaged_archive_message(archive: Path, empty: Store,
                                                              tmp_path: Path) -> None:
    wrong = empty.cli("restore", str(archive), env=empty.env(SECRETFS_PASSPHRASE="not it"))
    assert wrong.returncode == 8
    data = bytearray(archive.read_bytes())
    data[chunk_starts(bytes(data))[0] + 10] ^= 1
    damaged = tmp_path / "store.sfb"  # the same name in the message
    damaged.write_bytes(data)
    edited = empty.cli("restore", str(damaged), env=empty.env(SECRETFS_PASSPHRASE=PASSPHRASE))
    assert edited.returncode == 8
    message = one_line_error(wrong)
    assert "is damaged or the passphrase is wrong" in message
    assert message.replace(str(archive), "F") == one_line_error(edited).replace(str(damaged), "F")
    assert PASSPHRASE not in message
    assert_empty(empty)


def test_a_store_changed_while_restoring_is_rolled_back(empty: Store) -> None:
    """The write is one transaction: a failure half-way (a file altered between the checking
    pass and the writing pass) leaves nothing behind."""
    good = {"name": "a", "description": "", "tags": {}, "rotation": None, "created": 1.0,
            "updated": 2.0, "next_version": 2, "deleted": None, "labels": {"current": 1},
            "rotation_state": None,
            "versions": [{"version": 1, "created": 1.0, "is_map": False, "keys": ["value"],
                          "sizes": [3], "deleted": None, "destroyed": None, "value": b"abc"}]}

    def records() -> Iterator[dict]:
        yield good
        yield {**good, "name": "b"}
        raise ArchiveError("chunk 7 failed authentication")

    with manager_of(empty) as manager:
        with pytest.raises(ArchiveError):
            manager.backend.restore_secrets(records())
        assert_empty(empty)
        assert manager.backend.restore_secrets(iter([good])) == 1  # and it still works


# -- where the passphrase or key comes from --------------------------------------------------------


def small_store(root: Path) -> Store:
    store = make_store(root)
    store.put("db_password", secrets.token_hex(12))
    store.put("db_password", secrets.token_hex(12))
    store.put("api/key", "--key", f"id={secrets.token_hex(6)}", "--key", "secret=x")
    return store


def test_passphrase_from_the_environment(tmp_path: Path) -> None:
    store = small_store(tmp_path / "a")
    path = tmp_path / "env.sfb"
    env = {"SECRETFS_PASSPHRASE": "from the environment"}
    store.cli("backup", str(path), env=store.env(**env), check=True)
    target = make_store(tmp_path / "b")
    target.cli("restore", str(path), env=target.env(**env), check=True)
    assert rows(target) == rows(store)
    same(target.get("db_password/1"), store.get("db_password/1"), "db_password v1")


def test_no_passphrase_and_no_terminal_is_one_line_error(tmp_path: Path) -> None:
    store = small_store(tmp_path / "a")
    result = store.cli("backup", str(tmp_path / "x.sfb"))
    assert result.returncode == 8
    assert "no passphrase given" in one_line_error(result)
    assert not (tmp_path / "x.sfb").exists()
    loose = tmp_path / "loose"
    loose.write_text("pw\n")
    loose.chmod(0o644)
    result = store.cli("backup", str(tmp_path / "x.sfb"), "--passphrase-file", str(loose))
    assert result.returncode == 8 and "chmod 600" in one_line_error(result)


def test_key_file_archives(tmp_path: Path) -> None:
    store = small_store(tmp_path / "a")
    key = tmp_path / "keys" / "backup.key"
    path = tmp_path / "k.sfb"
    made = store.cli("backup", str(path), "--key-file", str(key), check=True)
    assert f"created key file {key}" in made.stdout.decode()
    assert (key.stat().st_mode & 0o777) == 0o600
    target = make_store(tmp_path / "b")
    target.cli("restore", str(path), "--key-file", str(key), check=True)
    assert rows(target) == rows(store)

    other = make_store(tmp_path / "c")
    another_key = tmp_path / "another.key"
    other.cli("backup", str(tmp_path / "unused.sfb"), "--key-file", str(another_key), check=True)
    wrong = other.cli("restore", str(path), "--key-file", str(another_key))
    assert wrong.returncode == 8 and "was made with key file" in one_line_error(wrong)
    as_passphrase = other.cli("restore", str(path), env=other.env(SECRETFS_PASSPHRASE="x"))
    assert as_passphrase.returncode == 8
    assert "protected by a key file" in one_line_error(as_passphrase)
    missing = other.cli("restore", str(path), "--key-file", str(tmp_path / "nope.key"))
    assert missing.returncode == 8 and "not found" in one_line_error(missing)
    assert other.cli("secrets", "list", check=True).stdout == b""

    # The store's own master key would lose the backup with the host: refused.
    own = store.cli("backup", str(tmp_path / "own.sfb"), "--key-file", str(store.key_file))
    assert own.returncode == 2 and "master key" in one_line_error(own)
    assert not (tmp_path / "own.sfb").exists()


def test_an_existing_archive_is_kept_unless_forced(tmp_path: Path) -> None:
    store = small_store(tmp_path / "a")
    path = tmp_path / "x.sfb"
    env = store.env(SECRETFS_PASSPHRASE="pw one")
    store.cli("backup", str(path), env=env, check=True)
    first = path.read_bytes()
    again = store.cli("backup", str(path), env=env)
    assert again.returncode == 2 and "exists" in one_line_error(again)
    assert path.read_bytes() == first
    store.cli("backup", str(path), "--force", env=env, check=True)
    assert path.read_bytes() != first and (path.stat().st_mode & 0o777) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left


def test_restore_into_a_store_that_is_not_empty_is_refused(archive: Path, tmp_path: Path) -> None:
    target = make_store(tmp_path / "t")
    target.put("mine", "--key", "k=v")
    before = rows(target)
    result = target.cli("restore", str(archive), env=target.env(SECRETFS_PASSPHRASE=PASSPHRASE))
    assert result.returncode == 1
    assert "is not empty" in one_line_error(result)
    assert rows(target) == before
    # Soft-deleted secrets count too (refused inside the write transaction).
    target.cli("secrets", "rm", "mine", check=True)
    result = target.cli("restore", str(archive), env=target.env(SECRETFS_PASSPHRASE=PASSPHRASE))
    assert result.returncode == 1 and "is not empty" in one_line_error(result)
    assert [row[0] for row in rows(target)["secrets"]] == ["mine"]


def test_backup_through_the_backend_protocol(tmp_path: Path) -> None:
    """What any backend shows (live secrets; a deleted version without its value) round-trips;
    version numbers are kept."""
    source = small_store(tmp_path / "a")
    source.put("gone", "x" * 20)
    source.cli("secrets", "rm", "gone", check=True)
    source.cli("secrets", "rm", "db_password", "--version", "1", check=True)
    path = tmp_path / "p.sfb"
    with manager_of(source) as manager, path.open("wb") as out:
        count, _ = write_archive(out, export_via_protocol(manager.backend), Passphrase("pw"),
                                 complete=False, scrypt=FAST_SCRYPT)
    assert count == 2
    target = make_store(tmp_path / "b")
    with manager_of(target) as manager:
        report = restore(manager, path, Passphrase("pw"))
        assert not report.complete
        assert manager.backend.list_names() == ["api/key", "db_password"]
        info = manager.backend.read_metadata("db_password").version_info(1)
        assert info is not None and info.deleted and info.destroyed
    same(target.get("db_password/2"), source.get("db_password/2"), "db_password v2")
    same(target.get("api/key"), source.get("api/key"), "api/key")


# -- garbage never crashes restore ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, KeyFile, Path]:
    """A small key-file archive, its key file and an empty store to restore into."""
    root = tmp_path_factory.mktemp("tiny")
    key = KeyFile(root / "k.key")
    loaded = key.load(create=True)
    records = [{"name": "a", "description": "d", "tags": {"t": "1"}, "rotation": None,
                "created": 1.5, "updated": 2.5, "next_version": 3, "deleted": None,
                "labels": {"current": 2}, "rotation_state": None,
                "versions": [{"version": v, "created": 1.5, "is_map": False, "keys": ["value"],
                              "sizes": [5], "deleted": None, "destroyed": None,
                              "value": b"hello"} for v in (1, 2)]}]
    path = root / "t.sfb"
    with path.open("wb") as out:
        write_archive(out, records, key, key=loaded)
    store = make_store(root / "empty")
    return path.read_bytes(), key, store.config


def try_restore(data: bytes, key: KeyFile, config: Path, folder: Path, *,
                valid_ok: bool = False) -> str | None:
    """Restore *data*: the documented error (its detail returned), or — when *valid_ok* and the
    bytes happen to make a sound archive — success, after which the store is emptied again."""
    path = folder / f"h-{os.getpid()}.sfb"
    path.write_bytes(data)
    with SyncSecretsManager.from_config(load_config(config)) as manager:
        try:
            restore(manager, path, key)
        except ArchiveError as error:
            assert error.exit_code == 8
            assert "\n" not in str(error)
            assert manager.backend.list_names() == []
            return error.fix
        db = sqlite3.connect(manager.backend.path)
        db.execute("PRAGMA foreign_keys=ON")  # versions, labels, rotations go with their secret
        with db:
            db.execute("DELETE FROM secrets")
        db.close()
        assert stored_count_at(manager.backend.path) == 0
    if not valid_ok:
        pytest.fail("a damaged archive was restored")
    return None


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(
    lambda b: b"SECRETFS-BACKUP\n\x00\x01" + b)))
def test_garbage_is_refused_with_the_documented_error(
        tiny: tuple[bytes, KeyFile, Path], tmp_path: Path, garbage: bytes) -> None:
    try_restore(garbage, tiny[1], tiny[2], tmp_path)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_edits_of_a_real_archive_are_refused(
        tiny: tuple[bytes, KeyFile, Path], tmp_path: Path, data: st.DataObject) -> None:
    archive = bytearray(tiny[0])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(archive) - 1, 0)))
        if kind == "flip" and archive:
            archive[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del archive[at:]
        elif kind == "insert":
            archive[at:at] = data.draw(st.binary(min_size=1, max_size=20))
        elif archive:
            del archive[at:at + data.draw(st.integers(1, 20))]
    if bytes(archive) != tiny[0]:
        try_restore(bytes(archive), tiny[1], tiny[2], tmp_path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from(["\ud800", "a\udfff", "\x00"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

GOOD_VERSION = {"version": 1, "created": 1.5, "is_map": False, "keys": ["value"], "sizes": [5],
                "deleted": None, "destroyed": None, "value": "aGVsbG8="}
GOOD_SECRET = {"type": "secret", "name": "a", "description": "", "tags": {}, "rotation": None,
               "created": 1.5, "updated": 2.5, "next_version": 2, "deleted": None,
               "labels": {"current": 1}, "rotation_state": None, "versions": [GOOD_VERSION]}


def near(good: dict, special: dict[str, st.SearchStrategy] | None = None
         ) -> st.SearchStrategy:
    """*good* with one or two fields replaced by anything (or by *special*'s strategy for that
    field), or dropped: nearly right, so the checks deep inside are reached."""
    special = special or {}

    @st.composite
    def build(draw: st.DrawFn) -> dict:
        record = dict(good)
        for key in draw(st.sets(st.sampled_from(sorted(good)), min_size=1, max_size=2)):
            choice = draw(st.sampled_from(["drop", "any", "special"]))
            if choice == "drop":
                del record[key]
            elif choice == "special" and key in special:
                record[key] = draw(special[key])
            else:
                record[key] = draw(json_values)
        return record

    return build()


times = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(), st.none())
version_fields = {
    "version": st.integers(-2, 3), "created": times, "deleted": times, "destroyed": times,
    "is_map": st.booleans(), "keys": st.lists(st.sampled_from(["value", "k", "", "a/b"])),
    "sizes": st.lists(st.integers(-1, 9)),
    "value": st.sampled_from(["", "aGVsbG8=", "eyJrIjoidiJ9", "not base64!", "e30="]),
}
secret_fields = {
    "name": st.sampled_from(["a", "a/b", "", "1", "latest", "x/../y", "é"]),
    "labels": st.dictionaries(st.sampled_from(["current", "previous", "pending", "latest"]),
                              st.integers(0, 3)),
    "next_version": st.integers(-1, 3), "created": times, "updated": times, "deleted": times,
    "tags": st.dictionaries(st.text(max_size=3), json_values, max_size=2),
    "rotation": st.one_of(st.none(), st.dictionaries(
        st.sampled_from(["interval", "generator", "schedule", "enabled"]), json_values)),
    "rotation_state": st.fixed_dictionaries({
        "version": st.integers(0, 2), "step": st.sampled_from(["created", "applying", "x"]),
        "owner": st.text(max_size=3), "started": times, "updated": times}),
    "versions": st.lists(near(GOOD_VERSION, version_fields), max_size=3),
}
nonsense_records = st.lists(
    st.one_of(json_values, near(GOOD_SECRET, secret_fields),
              st.just({"type": "end", "secrets": 1, "versions": 1})),
    max_size=4)


def authentic(key: KeyFile, records: list | bytes, *, first: bool = True) -> bytes:
    """An archive encrypted with the right key around *records* (JSON, ASCII: lone surrogates
    travel as \\ud800 escapes) or raw plaintext bytes: not what secretfs writes."""
    import io

    from secretfs.backup import (
        _archive_record,
        _check_header,
        _ChunkWriter,
        _Cipher,
        _encode_header,
        _new_header,
    )

    loaded = key.load(create=False)
    header = _new_header(key, loaded, None)
    header_bytes = _encode_header(header)
    cipher = _Cipher.of(header_bytes, _check_header(header), loaded.derive_key(b"backup"))
    out = io.BytesIO()
    out.write(header_bytes)
    writer = _ChunkWriter(out, cipher)
    if isinstance(records, bytes):
        writer.write(records)
    else:
        if first:
            writer.record(_archive_record("local", True, None))
        for record in records:
            body = json.dumps(record).encode()
            writer.write(len(body).to_bytes(4, "big") + body)
    writer.close()
    return out.getvalue()


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=200), nonsense_records), first=st.booleans())
def test_authentic_archives_with_nonsense_inside_are_refused(
        tiny: tuple[bytes, KeyFile, Path], tmp_path: Path, payload: bytes | list,
        first: bool) -> None:
    """Correctly encrypted (the right key) but not what secretfs writes — random bytes, random
    JSON, records that are nearly right — still only the documented error (or, if the draw
    happens to be a sound archive, a restore)."""
    try_restore(authentic(tiny[1], payload, first=first), tiny[1], tiny[2], tmp_path,
                valid_ok=True)


END = {"type": "end", "secrets": 1, "versions": 1}


@pytest.mark.parametrize("records", [
    [{**GOOD_SECRET, "description": "\ud800"}, END],
    [{**GOOD_SECRET, "tags": {"k": "\udfff"}}, END],
    [{**GOOD_SECRET, "rotation_state": {"version": 1, "step": "created", "owner": "\ud800",
                                        "started": 1.0, "updated": 1.0}}, END],
    [{**GOOD_SECRET, "next_version": 2**70}, END],
    [{**GOOD_SECRET, "versions": [{**GOOD_VERSION, "version": 2**63}],
      "labels": {"current": 2**63}, "next_version": 2**63 + 1}, END],
    [{**GOOD_SECRET, "versions": [{**GOOD_VERSION, "sizes": [True]}]}, END],
    [GOOD_SECRET, {"type": "end", "secrets": True, "versions": True}],
    [{**GOOD_SECRET, "versions": [{**GOOD_VERSION, "is_map": True}]}, END],  # not a map
    [{**GOOD_SECRET, "versions": [{**GOOD_VERSION, "is_map": True, "keys": ["k"],
                                   "value": "eyJrIjogInYifQ=="}]}, END],  # {"k": "v"}
    [GOOD_SECRET, {**GOOD_SECRET, "name": "a/b"}, {"type": "end", "secrets": 2, "versions": 2}],
    [GOOD_SECRET, END, END],
    [GOOD_SECRET],
], ids=["surrogate description", "surrogate tag", "surrogate owner", "huge next version",
        "huge version", "bool size", "bool counts", "map flag on bytes", "non-canonical map",
        "secret and folder", "two ends", "no end"])
def test_edge_cases_inside_an_authentic_archive(tiny: tuple[bytes, KeyFile, Path],
                                                tmp_path: Path, records: list) -> None:
    assert try_restore(authentic(tiny[1], records), tiny[1], tiny[2], tmp_path)
    assert try_restore(authentic(tiny[1], [GOOD_SECRET, END]), tiny[1], tiny[2], tmp_path,
                       valid_ok=True) is None  # the control: the good one restores


def test_a_conflicting_restore_through_the_api_names_the_store(empty: Store, tmp_path: Path,
                                                               tiny: tuple[bytes, KeyFile, Path]
                                                               ) -> None:
    path = tmp_path / "t.sfb"
    path.write_bytes(tiny[0])
    with manager_of(empty) as manager:
        restore(manager, path, tiny[1])
        assert read_archive(path, tiny[1]).secrets == 1
        with pytest.raises(ConflictError, match="is not empty"):
            restore(manager, path, tiny[1])
        assert manager.backend.read_value("a", 2) == b"hello"
