"""The embedded default backend: one SQLite file, every version sealed under its own data key.

Durability: WAL journal with ``synchronous=FULL`` (the WAL is fsynced on every commit), one
transaction per write, ``BEGIN IMMEDIATE`` so concurrent writers from several processes queue
instead of failing. ``secure_delete`` overwrites freed pages, so a destroyed or pruned version
leaves no ciphertext behind. The file and its WAL are created 0600 in a 0700 folder.

Confidentiality: a version's value is sealed with AES-256-GCM (crypto/envelope.py), the name and
version bound in as associated data; the store holds only ciphertext, wrapped data keys and
metadata (names, tags, key names of map values, timestamps).

One connection per backend object, guarded by a lock: the daemon calls in from worker threads.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from secretfs.backends.base import MetadataUpdate, check_write
from secretfs.crypto.envelope import (
    DATA_KEY_SIZE,
    SealedValue,
    associated_data,
    open_sealed,
    seal,
)
from secretfs.crypto.keys import MasterKey
from secretfs.errors import (
    ConflictError,
    IntegrityError,
    InvalidName,
    SecretNotFound,
    StoreError,
    VersionNotFound,
    WrongMasterKey,
)
from secretfs.model import (
    Label,
    RotationPolicy,
    RotationState,
    RotationStep,
    SecretMetadata,
    Value,
    VersionInfo,
    decode_value,
    encode_value,
    parent_folders,
    value_keys,
    value_sizes,
)

SCHEMA_VERSION = 2  # 2: the rotations table
BUSY_TIMEOUT_MS = 30_000
CHANGE_FEED_LENGTH = 10_000  # a reader further behind than this reloads everything

# Added in schema 2; created by upgrading older stores too.
_ROTATIONS = """
CREATE TABLE rotations (                       -- unfinished rotations (rotation/workflow.py)
    name    TEXT PRIMARY KEY REFERENCES secrets(name) ON DELETE CASCADE,
    version INTEGER NOT NULL,                  -- the pending version
    step    TEXT NOT NULL,
    owner   TEXT NOT NULL,
    started REAL NOT NULL,
    updated REAL NOT NULL
);
"""

_SCHEMA = """
CREATE TABLE store_info (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE secrets (
    name         TEXT PRIMARY KEY,
    description  TEXT NOT NULL DEFAULT '',
    tags         TEXT NOT NULL DEFAULT '{}',   -- JSON object
    rotation     TEXT,                         -- JSON RotationPolicy, or NULL
    created      REAL NOT NULL,
    updated      REAL NOT NULL,
    next_version INTEGER NOT NULL DEFAULT 1,   -- version numbers are never reused
    deleted      REAL                          -- soft-deleted at, or NULL
);
CREATE TABLE versions (
    name        TEXT NOT NULL REFERENCES secrets(name) ON DELETE CASCADE,
    version     INTEGER NOT NULL,
    created     REAL NOT NULL,
    is_map      INTEGER NOT NULL,
    keys        TEXT NOT NULL,                 -- JSON list of key names (not secret)
    sizes       TEXT NOT NULL,                 -- JSON list of their lengths (ciphertext shows them)
    key_id      TEXT,                          -- master key that wrapped the data key
    wrapped_key BLOB,                          -- NULL once destroyed
    nonce       BLOB,
    ciphertext  BLOB,
    deleted     REAL,
    destroyed   REAL,
    PRIMARY KEY (name, version)
);
CREATE TABLE labels (
    name    TEXT NOT NULL REFERENCES secrets(name) ON DELETE CASCADE,
    label   TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, label)
);
CREATE TABLE changes (                         -- the change feed readers follow (changes_since)
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL
);
""" + _ROTATIONS




def _when(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _prefix_range(prefix: str) -> tuple[str, str]:
    """Bounds such that ``low <= name < high`` selects the names starting with *prefix*."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


class LocalBackend:
    """Versioned secrets in one SQLite file, sealed by a master key."""

    kind = "local"
    capabilities = frozenset({  # the reference: every name in base.CAPABILITIES
        "versions", "labels", "cas", "soft_delete", "destroy", "metadata", "rotation_state",
        "change_feed", "folders",
    })

    def __init__(self, connection: sqlite3.Connection, path: Path, master_key: MasterKey,
                 max_versions: int, clock: Callable[[], float] = time.time) -> None:
        self._db = connection
        self._clock = clock  # what "now" is for every timestamp (tests move it)
        self._lock = threading.Lock()
        self.path = path
        self.master_key = master_key
        self.max_versions = max_versions

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, master_key: MasterKey, *, create: bool = False,
             max_versions: int = 10, clock: Callable[[], float] = time.time) -> LocalBackend:
        """Open the store at *path*; with *create*, make it (and its folder) if missing."""
        path = Path(path)
        exists = path.exists()
        if not exists and not create:
            raise StoreError(f"no secretfs store at {path}", "run 'secretfs init' to create it")
        if not exists:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file 0600 ourselves: SQLite gives its WAL the same mode. Another
            # process may have created it first.
            with suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            connection = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )
            connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA secure_delete=ON")
            connection.execute("PRAGMA foreign_keys=ON")
            backend = cls(connection, path, master_key, max_versions, clock)
            backend._ensure_schema(create)
        except sqlite3.DatabaseError as error:
            raise StoreError(
                f"cannot open the store {path}: {error}",
                "check the file is a secretfs store and restore it from a backup if it is damaged",
            ) from None
        return backend

    def _ensure_schema(self, create: bool) -> None:
        with self._write() as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if "store_info" not in tables:
                if tables or not create:
                    raise StoreError(f"{self.path} is not a secretfs store")
                for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT
                    if statement.strip():
                        db.execute(statement)
                db.executemany(
                    "INSERT INTO store_info VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)),
                     ("master_key_id", self.master_key.key_id),
                     ("created", datetime.now(UTC).isoformat())],
                )
            info = dict(db.execute("SELECT key, value FROM store_info"))
            if int(info["schema_version"]) == 1:  # upgrade in place: one table more
                db.execute(_ROTATIONS)
                db.execute("UPDATE store_info SET value = '2' WHERE key = 'schema_version'")
                info["schema_version"] = "2"
            info["master_key_id"] = self._fence(db, info["master_key_id"])
        if int(info["schema_version"]) > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path} has schema version {info['schema_version']}, newer than this "
                f"secretfs understands ({SCHEMA_VERSION})", "upgrade secretfs",
            )
        self.store_key_id = info["master_key_id"]

    def _fence(self, db: sqlite3.Connection, stored: str) -> str:
        """The store's current master key id, moved to the ring's current key when the ring
        holds the stored one too: a key rotation (crypto/rotate.py) made the new key durable
        and crashed before it recorded it here. From then on new data keys are wrapped by the
        new key only, so the old key's share of the store only shrinks. (In a transaction.)"""
        current = self.master_key.key_id
        finder = getattr(self.master_key, "key_for", None)
        if stored != current and finder is not None and finder(stored, reload=False):
            db.execute("UPDATE store_info SET value = ? WHERE key = 'master_key_id'", (current,))
            return current
        return stored

    def _sealing_key(self, db: sqlite3.Connection) -> MasterKey:
        """The key that wraps a new data key, checked against the store in the write
        transaction: a process that loaded its keys before a rotation reloads them first."""
        stored = db.execute(
            "SELECT value FROM store_info WHERE key = 'master_key_id'").fetchone()[0]
        ring = self.master_key
        if stored != ring.key_id and getattr(ring, "refresh", None) is not None:
            ring.refresh()
        stored = self._fence(db, stored)
        self.store_key_id = stored
        if stored != ring.key_id:
            raise WrongMasterKey(
                f"store {self.path} is sealed by master key '{stored}', "
                f"but the configured master key is '{ring.key_id}'",
                "point encryption.key_file (or the provider) at the key that created this store",
            )
        return getattr(ring, "current", ring)

    def _opening_key(self, key_id: str, what: str) -> MasterKey:
        """The loaded key that unwraps data keys wrapped by *key_id* (the ring's, or the one
        key; open_sealed names both ids when they differ)."""
        finder = getattr(self.master_key, "key_for", None)
        if finder is None:
            return self.master_key
        key = finder(key_id)
        if key is None:
            raise self.master_key.missing(key_id, what)
        return key

    @contextmanager
    def _write(self, changed: str | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken before any read so concurrent writers serialize.

        *changed* names the secret the transaction changes: it goes on the change feed in the
        same transaction, so a reader of the feed never misses a committed change.
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                if changed is not None:
                    self._db.execute("INSERT INTO changes (name) VALUES (?)", (changed,))
                    self._db.execute(
                        "DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?",
                        (CHANGE_FEED_LENGTH,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full, I/O error) leaves the transaction open: roll it
                # back, or every later write of this process would fail and keep the lock.
                # SQLite may have rolled back by itself already; then there is nothing to do.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for multi-statement reads."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ------------------------------------------------------------------------------

    def write_version(self, name: str, value: Value, *, label: Label = Label.CURRENT,
                      cas: int | None = None, metadata: MetadataUpdate | None = None) -> int:
        now = self._clock()
        payload = encode_value(value)
        with self._write(name) as db:
            sealing_key = self._sealing_key(db)
            row = db.execute(
                "SELECT next_version, deleted FROM secrets WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                self._check_folder_conflict(db, name)
                if cas not in (None, 0):
                    raise ConflictError(
                        f"check-and-set failed: secret {name!r} does not exist, "
                        f"expected version {cas}", "use --cas 0 to create it",
                    )
                db.execute(
                    "INSERT INTO secrets (name, created, updated) VALUES (?, ?, ?)",
                    (name, now, now),
                )
                version = 1
            else:
                version, deleted = row
                if deleted is not None:
                    raise ConflictError(
                        f"secret {name!r} is deleted",
                        f"undelete it with 'secretfs secrets undelete {name}', or remove it for "
                        f"good with 'secretfs secrets rm {name} --destroy'",
                    )
                check_write(name, self._labels(db, name), label=label, cas=cas)
            sealed = seal(sealing_key, payload, associated_data(name, version))
            db.execute(
                "INSERT INTO versions (name, version, created, is_map, keys, sizes, key_id, "
                "wrapped_key, nonce, ciphertext) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, now, not isinstance(value, bytes),
                 json.dumps(value_keys(value)), json.dumps(value_sizes(value)), sealed.key_id,
                 sealed.wrapped_key, sealed.nonce, sealed.ciphertext),
            )
            db.execute(
                "UPDATE secrets SET next_version = ?, updated = ? WHERE name = ?",
                (version + 1, now, name),
            )
            if label is Label.CURRENT:
                old = db.execute(
                    "SELECT version FROM labels WHERE name = ? AND label = 'current'", (name,)
                ).fetchone()
                if old is not None:
                    self._set_label(db, name, Label.PREVIOUS, old[0])
            self._set_label(db, name, label, version)
            if metadata is not None:
                self._apply_metadata(db, name, metadata)
            self._prune(db, name)
        return version

    @staticmethod
    def _check_folder_conflict(db: sqlite3.Connection, name: str) -> None:
        """A name may not be a folder of another name, nor have another name as its folder."""
        folders = parent_folders(name)
        # Two indexed look-ups; one query with "IN () OR …" would scan the whole index.
        clash = db.execute(
            "SELECT name FROM secrets WHERE name >= ? AND name < ? LIMIT 1",
            _prefix_range(name + "/"),
        ).fetchone()
        if clash is None and folders:
            clash = db.execute(
                f"SELECT name FROM secrets WHERE name IN ({','.join('?' * len(folders))}) "
                "LIMIT 1", folders,
            ).fetchone()
        if clash is not None:
            other = clash[0]
            relation = "a folder of" if other.startswith(name + "/") else "inside"
            raise InvalidName(
                f"cannot create {name!r}: it would be {relation} the existing secret {other!r}",
                "a name cannot be both a secret and a folder; choose another name",
            )

    @staticmethod
    def _set_label(db: sqlite3.Connection, name: str, label: Label, version: int) -> None:
        db.execute(
            "INSERT INTO labels (name, label, version) VALUES (?, ?, ?) "
            "ON CONFLICT (name, label) DO UPDATE SET version = excluded.version",
            (name, label.value, version),
        )

    def _prune(self, db: sqlite3.Connection, name: str) -> None:
        """Drop the oldest versions beyond max_versions, except those a label points at."""
        db.execute(
            "DELETE FROM versions WHERE name = ? AND version NOT IN "
            "(SELECT version FROM labels WHERE name = ?) AND version NOT IN "
            "(SELECT version FROM versions WHERE name = ? ORDER BY version DESC LIMIT ?)",
            (name, name, name, self.max_versions),
        )

    def update_labels(self, name: str, changes: Mapping[Label, int | None], *,
                      expect: Mapping[Label, int | None] | None = None) -> None:
        with self._write(name) as db:
            self._live_secret(db, name)
            labels = self._labels(db, name)
            for label, version in (expect or {}).items():
                if labels.get(label) != version:
                    raise ConflictError(
                        f"label {label.value} of {name!r} points at {labels.get(label)}, "
                        f"not {version}", "another process changed it: read it again",
                    )
            for label, version in changes.items():
                if version is None:
                    db.execute("DELETE FROM labels WHERE name = ? AND label = ?",
                               (name, label.value))
                    continue
                self._version_row(db, name, version)  # VersionNotFound if gone
                self._set_label(db, name, label, version)
            db.execute("UPDATE secrets SET updated = ? WHERE name = ?", (self._clock(), name))
            self._prune(db, name)

    def rotation_state(self, name: str) -> RotationState | None:
        with self._read() as db:
            row = db.execute(
                "SELECT version, step, owner, started, updated FROM rotations WHERE name = ?",
                (name,),
            ).fetchone()
        if row is None:
            return None
        version, step, owner, started, updated = row
        return RotationState(version, RotationStep(step), owner, started, updated)

    def set_rotation_state(self, name: str, state: RotationState | None) -> None:
        with self._write() as db:
            if state is None:
                db.execute("DELETE FROM rotations WHERE name = ?", (name,))
                return
            db.execute(
                "INSERT INTO rotations (name, version, step, owner, started, updated) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "version = excluded.version, step = excluded.step, owner = excluded.owner, "
                "started = excluded.started, updated = excluded.updated",
                (name, state.version, state.step.value, state.owner, state.started,
                 state.updated),
            )

    def update_metadata(self, name: str, metadata: MetadataUpdate) -> None:
        with self._write(name) as db:
            self._live_secret(db, name)
            self._apply_metadata(db, name, metadata)

    def _apply_metadata(self, db: sqlite3.Connection, name: str, metadata: MetadataUpdate
                        ) -> None:
        changes: dict[str, object] = {"updated": self._clock()}
        if metadata.description is not None:
            changes["description"] = metadata.description
        if metadata.tags is not None:
            changes["tags"] = json.dumps(dict(metadata.tags), sort_keys=True)
        if metadata.rotation is not None:
            changes["rotation"] = json.dumps(metadata.rotation.to_json())
        elif metadata.clear_rotation:
            changes["rotation"] = None
        assignments = ", ".join(f"{column} = ?" for column in changes)
        db.execute(f"UPDATE secrets SET {assignments} WHERE name = ?", (*changes.values(), name))

    # -- deleting -----------------------------------------------------------------------------

    def delete(self, name: str, version: int | None = None) -> None:
        self._mark(name, version, "deleted", self._clock())

    def undelete(self, name: str, version: int | None = None) -> None:
        with self._write(name) as db:
            if version is None:
                found = db.execute(
                    "UPDATE secrets SET deleted = NULL WHERE name = ?", (name,)
                ).rowcount
                if not found:
                    raise SecretNotFound(f"secret {name!r} not found")
            else:
                self._live_secret(db, name)
                self._version_row(db, name, version)
                db.execute(
                    "UPDATE versions SET deleted = NULL WHERE name = ? AND version = ?",
                    (name, version),
                )

    def destroy(self, name: str, version: int | None = None) -> None:
        with self._write(name) as db:
            if version is None:
                if not db.execute("DELETE FROM secrets WHERE name = ?", (name,)).rowcount:
                    raise SecretNotFound(f"secret {name!r} not found")
                return
            self._version_row(db, name, version, include_deleted=True)
            db.execute(
                "UPDATE versions SET wrapped_key = NULL, nonce = NULL, ciphertext = NULL, "
                "key_id = NULL, destroyed = ? WHERE name = ? AND version = ?",
                (self._clock(), name, version),
            )

    def _mark(self, name: str, version: int | None, column: str, when: float) -> None:
        with self._write(name) as db:
            self._live_secret(db, name)
            if version is None:
                db.execute(f"UPDATE secrets SET {column} = ? WHERE name = ?", (when, name))
            else:
                self._version_row(db, name, version)
                db.execute(
                    f"UPDATE versions SET {column} = ? WHERE name = ? AND version = ?",
                    (when, name, version),
                )

    # -- reading ------------------------------------------------------------------------------

    def read_metadata(self, name: str) -> SecretMetadata:
        with self._read() as db:
            row = self._live_secret(db, name)
            return self._metadata(name, row, self._labels(db, name), self._versions(db, name))

    def list(self, prefix: str = "") -> list[SecretMetadata]:
        where, arguments = "deleted IS NULL", ()
        if prefix:
            where += " AND name >= ? AND name < ?"
            arguments = _prefix_range(prefix)
        with self._read() as db:
            rows = db.execute(
                "SELECT name, description, tags, rotation, created, updated, deleted "
                f"FROM secrets WHERE {where} ORDER BY name", arguments,
            ).fetchall()
            labels: dict[str, dict[Label, int]] = {}
            for name, label, version in db.execute(
                f"SELECT name, label, version FROM labels WHERE name IN "
                f"(SELECT name FROM secrets WHERE {where})", arguments,
            ):
                labels.setdefault(name, {})[Label(label)] = version
            versions: dict[str, list[VersionInfo]] = {}
            for row in db.execute(
                "SELECT name, version, created, is_map, keys, sizes, deleted, destroyed "
                "FROM versions "
                f"WHERE name IN (SELECT name FROM secrets WHERE {where}) ORDER BY name, version",
                arguments,
            ):
                versions.setdefault(row[0], []).append(self._version_info(row[1:]))
        return [
            self._metadata(row[0], row[1:], labels.get(row[0], {}), versions.get(row[0], []))
            for row in rows
        ]

    def read_value(self, name: str, version: int) -> Value:
        with self._lock:
            row = self._db.execute(
                "SELECT s.deleted, v.version, v.is_map, v.key_id, v.wrapped_key, v.nonce, "
                "v.ciphertext, v.deleted, v.destroyed FROM secrets s LEFT JOIN versions v "
                "ON v.name = s.name AND v.version = ? WHERE s.name = ?", (version, name),
            ).fetchone()
        if row is None:
            raise SecretNotFound(f"secret {name!r} not found")
        if row[0] is not None:
            raise SecretNotFound(*self._deleted_hint(name))
        if row[1] is None:
            raise VersionNotFound(f"secret {name!r} has no version {version}")
        _, _, is_map, key_id, wrapped_key, nonce, ciphertext, deleted, destroyed = row
        if destroyed is not None:
            raise VersionNotFound(f"version {version} of {name!r} was destroyed")
        if deleted is not None:
            raise VersionNotFound(
                f"version {version} of {name!r} is deleted",
                f"undelete it with 'secretfs secrets undelete {name} --version {version}'",
            )
        what = f"version {version} of {name!r}"
        payload = open_sealed(
            self._opening_key(key_id, what),
            SealedValue(key_id, wrapped_key, nonce, ciphertext),
            associated_data(name, version),
            what=what,
        )
        return decode_value(payload, bool(is_map))

    def list_names(self, prefix: str = "") -> list[str]:
        where, arguments = "deleted IS NULL", ()
        if prefix:
            where += " AND name >= ? AND name < ?"
            arguments = _prefix_range(prefix)
        with self._lock:
            return [row[0] for row in self._db.execute(
                f"SELECT name FROM secrets WHERE {where} ORDER BY name", arguments)]

    def changes_since(self, cursor: int | None) -> tuple[int, set[str] | None]:
        with self._read() as db:
            newest, oldest = db.execute("SELECT max(seq), min(seq) FROM changes").fetchone()
            newest = newest or 0
            if cursor is None or cursor > newest or (oldest is not None and cursor < oldest - 1):
                return newest, None  # first call, a replaced store, or fell behind the feed
            return newest, {
                row[0] for row in db.execute("SELECT name FROM changes WHERE seq > ?", (cursor,))
            }

    # -- master keys (crypto/rotate.py) -----------------------------------------------------------

    def key_usage(self) -> dict[str, int]:
        """How many stored versions have their data key wrapped by each master key id
        (destroyed versions keep no data key and count for none)."""
        with self._lock:
            return dict(self._db.execute(
                "SELECT key_id, count(*) FROM versions WHERE wrapped_key IS NOT NULL "
                "GROUP BY key_id"))

    def store_info(self) -> dict[str, str]:
        """The store's own facts (schema version, current master key id, created), and what it
        remembers of each master key as ``key:<id>`` → JSON (:meth:`record_keys`)."""
        with self._lock:
            return dict(self._db.execute("SELECT key, value FROM store_info"))

    def key_records(self) -> dict[str, dict[str, Any]]:
        """``{key id: {"created": …, "provider": …, "retired": …}}`` as :meth:`record_keys`
        left them."""
        return {key[4:]: json.loads(value) for key, value in self.store_info().items()
                if key.startswith("key:")}

    def record_keys(self, records: Mapping[str, Mapping[str, Any]]) -> str:
        """In one transaction: merge *records* into the store's key records (a recorded
        ``created`` is kept), and move the store's current master key id to the ring's current
        key when the ring also holds the recorded one (:meth:`_fence`). Returns the store's
        current master key id."""
        with self._write() as db:
            stored = db.execute(
                "SELECT value FROM store_info WHERE key = 'master_key_id'").fetchone()[0]
            stored = self._fence(db, stored)
            for key_id, fields in records.items():
                row = db.execute("SELECT value FROM store_info WHERE key = ?",
                                 ("key:" + key_id,)).fetchone()
                merged = json.loads(row[0]) if row else {}
                for field, value in fields.items():
                    if field != "created" or field not in merged:
                        merged[field] = value
                db.execute(
                    "INSERT INTO store_info (key, value) VALUES (?, ?) ON CONFLICT (key) "
                    "DO UPDATE SET value = excluded.value",
                    ("key:" + key_id, json.dumps(merged, sort_keys=True)),
                )
        self.store_key_id = stored
        return stored

    def rewrap(self, old: MasterKey, new: MasterKey, *, after: int = 0, limit: int = 500
               ) -> tuple[int, int]:
        """Re-wrap under *new*, in one transaction, up to *limit* data keys that *old* wraps
        (versions rows past rowid *after*, in rowid order). Ciphertexts are not touched: only
        ``key_id`` and ``wrapped_key`` change, and only where ``key_id`` is still *old*.
        Returns (how many were re-wrapped, the last rowid seen) — the next batch's *after*."""
        with self._write() as db:
            rows = db.execute(
                "SELECT rowid, name, version, wrapped_key FROM versions WHERE rowid > ? AND "
                "key_id = ? AND wrapped_key IS NOT NULL ORDER BY rowid LIMIT ?",
                (after, old.key_id, limit),
            ).fetchall()
            updates = []
            for rowid, name, version, wrapped in rows:
                try:
                    data_key = old.unwrap(wrapped)
                except IntegrityError:
                    data_key = b""
                if len(data_key) != DATA_KEY_SIZE:
                    raise IntegrityError(
                        f"store integrity error: the data key of version {version} of {name!r} "
                        "failed authentication, so it cannot be re-wrapped",
                        f"restore the store from a backup, or destroy that version "
                        f"('secretfs secrets rm {name} --version {version} --destroy') and run "
                        "'secretfs keys rotate' again",
                    )
                updates.append((new.key_id, new.wrap(data_key), rowid, old.key_id))
            db.executemany(
                "UPDATE versions SET key_id = ?, wrapped_key = ? WHERE rowid = ? AND key_id = ?",
                updates,
            )
        return len(rows), rows[-1][0] if rows else after

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def _deleted_hint(name: str) -> tuple[str, str]:
        return (f"secret {name!r} is deleted",
                f"restore it with 'secretfs secrets undelete {name}'")

    def _live_secret(self, db: sqlite3.Connection, name: str) -> tuple:
        row = db.execute(
            "SELECT description, tags, rotation, created, updated, deleted "
            "FROM secrets WHERE name = ?", (name,),
        ).fetchone()
        if row is None:
            raise SecretNotFound(f"secret {name!r} not found")
        if row[5] is not None:
            raise SecretNotFound(*self._deleted_hint(name))
        return row

    @staticmethod
    def _version_row(db: sqlite3.Connection, name: str, version: int,
                     include_deleted: bool = False) -> tuple:
        row = db.execute(
            "SELECT destroyed FROM versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        if row is None:
            raise VersionNotFound(f"secret {name!r} has no version {version}")
        if row[0] is not None and not include_deleted:
            raise VersionNotFound(f"version {version} of {name!r} was destroyed")
        return row

    @staticmethod
    def _labels(db: sqlite3.Connection, name: str) -> dict[Label, int]:
        return {
            Label(label): version
            for label, version in db.execute(
                "SELECT label, version FROM labels WHERE name = ?", (name,)
            )
        }

    def _versions(self, db: sqlite3.Connection, name: str) -> list[VersionInfo]:
        return [
            self._version_info(row)
            for row in db.execute(
                "SELECT version, created, is_map, keys, sizes, deleted, destroyed FROM versions "
                "WHERE name = ? ORDER BY version", (name,),
            )
        ]

    @staticmethod
    def _version_info(row: tuple) -> VersionInfo:
        version, created, is_map, keys, sizes, deleted, destroyed = row
        return VersionInfo(
            version=version, created=_when(created), keys=tuple(json.loads(keys)),
            sizes=tuple(json.loads(sizes)),
            is_map=bool(is_map), deleted=deleted is not None, destroyed=destroyed is not None,
        )

    @staticmethod
    def _metadata(name: str, row: tuple, labels: Mapping[Label, int],
                  versions: list[VersionInfo]) -> SecretMetadata:
        description, tags, rotation, created, updated, deleted = row
        return SecretMetadata(
            name=name, description=description, tags=json.loads(tags),
            created=_when(created), updated=_when(updated), labels=dict(labels),
            versions=tuple(versions),
            rotation=RotationPolicy.from_json(json.loads(rotation)) if rotation else None,
            deleted=deleted is not None,
        )

    # -- backup and restore (secretfs/backup.py) ---------------------------------------------
    # The methods above work on live secrets, one operation at a time. These two read and
    # write a whole store as it is — soft-deleted secrets, deleted and destroyed versions,
    # version numbers and timestamps included — as plain records:
    #   {name, description, tags, rotation (JSON or None), created, updated, next_version,
    #    deleted (time or None), labels {label: version}, rotation_state (dict or None),
    #    versions: [{version, created, is_map, keys, sizes, deleted, destroyed,
    #                value: the encode_value bytes, or None once destroyed}]}

    def export_secrets(self) -> Iterator[dict[str, object]]:
        """Every secret as a record (above), values decrypted, in name order, from one
        consistent snapshot: a read transaction on a connection of its own, so neither this
        object's lock nor other processes' writers wait for the consumer."""
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            db.execute("BEGIN")
            rows = db.execute(
                "SELECT name, description, tags, rotation, created, updated, next_version, "
                "deleted FROM secrets ORDER BY name").fetchall()
            for name, description, tags, rotation, created, updated, next_version, deleted \
                    in rows:
                versions = []
                for (version, v_created, is_map, keys, sizes, key_id, wrapped_key, nonce,
                     ciphertext, v_deleted, destroyed) in db.execute(
                        "SELECT version, created, is_map, keys, sizes, key_id, wrapped_key, "
                        "nonce, ciphertext, deleted, destroyed FROM versions WHERE name = ? "
                        "ORDER BY version", (name,)).fetchall():
                    value = None
                    if destroyed is None and wrapped_key is not None:
                        what = f"version {version} of {name!r}"
                        value = open_sealed(
                            self._opening_key(key_id, what),
                            SealedValue(key_id, wrapped_key, nonce, ciphertext),
                            associated_data(name, version), what=what)
                    versions.append({
                        "version": version, "created": v_created, "is_map": bool(is_map),
                        "keys": json.loads(keys), "sizes": json.loads(sizes),
                        "deleted": v_deleted,
                        "destroyed": destroyed if destroyed is not None or value is not None
                        else (v_deleted or updated),
                        "value": value,
                    })
                labels = dict(db.execute(
                    "SELECT label, version FROM labels WHERE name = ? ORDER BY label", (name,)))
                state = db.execute(
                    "SELECT version, step, owner, started, updated FROM rotations "
                    "WHERE name = ?", (name,)).fetchone()
                yield {
                    "name": name, "description": description, "tags": json.loads(tags),
                    "rotation": json.loads(rotation) if rotation else None,
                    "created": created, "updated": updated, "next_version": next_version,
                    "deleted": deleted, "labels": labels,
                    "rotation_state": None if state is None else dict(zip(
                        ("version", "step", "owner", "started", "updated"), state, strict=True)),
                    "versions": versions,
                }
        finally:
            db.close()  # ends the read transaction

    def restore_secrets(self, records: Iterator[Mapping[str, object]]) -> int:
        """Insert every record (above) exactly as given — names, version numbers, times,
        labels, flags — into this store, which must hold no secret at all (soft-deleted ones
        count), in ONE transaction: an exception from *records* (a damaged archive found on the
        way) or from here rolls everything back. Values are sealed anew under this store's
        master key. The number of secrets written. Records are trusted to be consistent
        (secretfs/backup.py checks them); versions beyond max_versions are kept."""
        count = 0
        with self._write() as db:
            sealing_key = self._sealing_key(db)
            if db.execute("SELECT 1 FROM secrets LIMIT 1").fetchone() is not None:
                raise ConflictError(
                    f"the store {self.path} is not empty: restore only fills an empty store",
                    "point --config at a new store (then 'secretfs init'), or move this one "
                    "away first")
            for record in records:
                name = record["name"]
                self._check_folder_conflict(db, name)
                rotation = record["rotation"]
                db.execute(
                    "INSERT INTO secrets (name, description, tags, rotation, created, updated, "
                    "next_version, deleted) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, record["description"], json.dumps(record["tags"], sort_keys=True),
                     None if rotation is None else json.dumps(rotation), record["created"],
                     record["updated"], record["next_version"], record["deleted"]))
                for item in record["versions"]:
                    version, value = item["version"], item["value"]
                    sealed = None if value is None else seal(
                        sealing_key, value, associated_data(name, version))
                    db.execute(
                        "INSERT INTO versions (name, version, created, is_map, keys, sizes, "
                        "key_id, wrapped_key, nonce, ciphertext, deleted, destroyed) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, version, item["created"], item["is_map"],
                         json.dumps(item["keys"]), json.dumps(item["sizes"]),
                         *((None,) * 4 if sealed is None else (
                             sealed.key_id, sealed.wrapped_key, sealed.nonce,
                             sealed.ciphertext)),
                         item["deleted"], item["destroyed"]))
                db.executemany(
                    "INSERT INTO labels (name, label, version) VALUES (?, ?, ?)",
                    [(name, label, version) for label, version in record["labels"].items()])
                state = record["rotation_state"]
                if state is not None:
                    db.execute(
                        "INSERT INTO rotations (name, version, step, owner, started, updated) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (name, state["version"], state["step"], state["owner"],
                         state["started"], state["updated"]))
                db.execute("INSERT INTO changes (name) VALUES (?)", (name,))
                count += 1
            db.execute("DELETE FROM changes WHERE seq <= (SELECT max(seq) FROM changes) - ?",
                       (CHANGE_FEED_LENGTH,))
        return count
