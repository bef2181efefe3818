"""Encrypted backups of a whole store: ``secretfs backup FILE`` and ``secretfs restore FILE``.

An archive holds every secret with all its versions (values, creation times, deleted and
destroyed state — a destroyed version is recorded without a value), labels, descriptions, tags,
rotation policies and unfinished rotations, soft-deleted secrets too; and the text of the
configuration's ``principals`` and ``policies`` sections. It is protected by a passphrase or a
32-byte key file, never by the store's master key: an archive must outlive the host it backs up.

Format (docs/backup.md has the long version)::

    "SECRETFS-BACKUP\\n"   16 bytes, magic
    version              u16, big-endian: 1
    header length        u16, big-endian: at most 4096
    header               JSON: cipher, chunk_size, kdf ("scrypt" with n, r, p | "key-file" with
                         key_id), salt (16 random bytes, base64), nonce_prefix (8, base64)
    chunks               AES-256-GCM; each holds chunk_size plaintext bytes (the last one 0 to
                         chunk_size) followed by its 16-byte tag

The chunk key is HKDF-SHA256(ikm, salt, "secretfs backup v1 chunks"), ikm being scrypt(passphrase,
salt, n, r, p) or the key file's key (``LocalMasterKey.derive_key(b"backup")``). Chunk *i* has
nonce ``nonce_prefix || u32(i)`` and associated data ``sha256(magic..header) || u64(i) ||
final``, with final 1 for the last chunk only: every byte of the header is authenticated by every
chunk, a chunk cannot move, and cutting the file at a chunk boundary or adding to it fails.

The plaintext is a sequence of records, each ``u32 length || JSON``: one ``archive`` record
(format, time, backend, the policy text), one ``secret`` record per secret (values base64), and
an ``end`` record with the counts.

Restore reads the archive twice from one open file: the first pass decrypts, authenticates and
checks every record and writes nothing; the second decrypts again (so a file changed in between
still fails) and feeds one SQLite transaction, which a failure rolls back. Memory holds two
chunks and one secret (all its versions) at a time.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import json
import math
import os
import stat
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from secretfs.errors import (
    ConflictError,
    NotFound,
    SecretfsError,
    StoreError,
    UsageError,
)

if TYPE_CHECKING:
    from secretfs.backends.base import Backend
    from secretfs.config import Config
    from secretfs.manager import SyncSecretsManager

__all__ = [
    "ArchiveError",
    "BackupReport",
    "KeyFile",
    "Passphrase",
    "RestoreReport",
    "backup",
    "export_via_protocol",
    "policies_note",
    "policy_sections",
    "protection_from",
    "read_archive",
    "restore",
    "write_archive",
]

MAGIC = b"SECRETFS-BACKUP\n"
FORMAT_VERSION = 1
CHUNK_SIZE = 64 * 1024
TAG_SIZE = 16
SALT_SIZE = 16
NONCE_PREFIX_SIZE = 8
MAX_HEADER_BYTES = 4096
MAX_RECORD_BYTES = 1 << 30
_PREFIX = struct.Struct(">16sHH")  # magic, format version, header length
_RECORD_LENGTH = struct.Struct(">I")
_CHUNK_INFO = b"secretfs backup v1 chunks"
_KEY_FILE_PURPOSE = b"backup"
_PASSPHRASE_ENV = "SECRETFS_PASSPHRASE"
_MAX_PASSPHRASE_FILE = 4096
_LABELS = ("current", "previous", "pending")
_STEPS = ("created", "applying")


class ArchiveError(StoreError):
    """An archive that is damaged, cut short, extended, not an archive, or opened with the wrong
    passphrase or key file (exit 8). Never names a value."""


# -- what protects an archive --------------------------------------------------------------------


class Passphrase:
    """A passphrase; never shown (repr), normalized to NFC when a key is derived."""

    __slots__ = ("_text",)
    word = "passphrase"

    def __init__(self, text: str) -> None:
        if not text:
            raise StoreError("the passphrase is empty", "use a long, non-empty passphrase")
        self._text = text

    def __repr__(self) -> str:
        return "Passphrase(<concealed>)"

    def ikm(self, header: Mapping[str, Any]) -> bytes:
        from secretfs.crypto.keys import _derive

        return _derive(self._text, {"n": header["n"], "r": header["r"], "p": header["p"],
                                    "salt": header["salt"]})


@dataclass(frozen=True)
class KeyFile:
    """A key file of 32 random bytes (one line of base64, mode 0600: the ``file`` master-key
    format and checks, but one plain key — no key ring, no rotation slots beside it)."""

    path: Path
    word = "key file"

    def load(self, *, create: bool) -> Any:
        from secretfs.crypto.keys import _load_file_key

        if not create and not os.path.lexists(self.path):
            raise StoreError(f"key file {self.path} not found",
                             "give the key file the archive was made with")
        return _load_file_key(self.path, create=create)


Protection = Passphrase | KeyFile
Asked = Protection | Callable[[], Protection]
"""A protection, or a function that gets one (asks for the passphrase) once the cheap checks
have passed: nobody types a passphrase for a command that then refuses at once."""


def _resolve(protection: Asked) -> Protection:
    return protection if isinstance(protection, Passphrase | KeyFile) else protection()


def protection_from(passphrase_file: str | None = None, key_file: str | None = None, *,
                    confirm: bool = False) -> Protection:
    """What the CLI flags name: --key-file K, else --passphrase-file F, else $SECRETFS_PASSPHRASE,
    else a prompt on the terminal (twice when *confirm*)."""
    if passphrase_file is not None and key_file is not None:
        raise UsageError("give --passphrase-file or --key-file, not both")
    if key_file is not None:
        return KeyFile(Path(key_file))
    if passphrase_file is not None:
        return Passphrase(_read_passphrase_file(Path(passphrase_file)))
    from_env = os.environ.get(_PASSPHRASE_ENV)
    if from_env is not None:
        if not from_env:
            raise StoreError(f"{_PASSPHRASE_ENV} is set but empty",
                             "set it to the archive's passphrase, or use --passphrase-file F")
        return Passphrase(from_env)
    if sys.stdin is None or not sys.stdin.isatty():
        raise StoreError("no passphrase given", f"use --passphrase-file F or --key-file K, set "
                         f"{_PASSPHRASE_ENV}, or run on a terminal")
    import getpass

    try:
        text = getpass.getpass("Passphrase for the backup archive: ")
        if not text:
            raise StoreError("the passphrase is empty", "enter a non-empty passphrase")
        if confirm and getpass.getpass("Repeat the passphrase: ") != text:
            raise StoreError("the two passphrases differ", "run the command again")
    except EOFError:
        raise StoreError("no passphrase given",
                         f"use --passphrase-file F, set {_PASSPHRASE_ENV}, or run on a terminal"
                         ) from None
    return Passphrase(text)


def _read_passphrase_file(path: Path) -> str:
    """The first line of *path* (its line end dropped); refused when others may read it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise UsageError(f"cannot read passphrase file {path}: {error.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"passphrase file {path} is not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            import shlex

            raise StoreError(f"passphrase file {path} is open to others (mode {mode:04o})",
                             f"run: chmod 600 {shlex.quote(str(path))}")
        data = os.read(fd, _MAX_PASSPHRASE_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > _MAX_PASSPHRASE_FILE:
        raise UsageError(f"passphrase file {path} is larger than {_MAX_PASSPHRASE_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"passphrase file {path} is not UTF-8 text") from None
    line = text.split("\n", 1)[0].removesuffix("\r")
    if not line:
        raise StoreError(f"passphrase file {path} holds an empty first line",
                         "write the passphrase on its first line")
    return line


# -- the header and the chunk key ----------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _new_header(protection: Protection, key: Any | None,
                scrypt: Mapping[str, int] | None) -> dict[str, Any]:
    header: dict[str, Any] = {
        "cipher": "AES-256-GCM",
        "chunk_size": CHUNK_SIZE,
        "salt": _b64(os.urandom(SALT_SIZE)),
        "nonce_prefix": _b64(os.urandom(NONCE_PREFIX_SIZE)),
    }
    if isinstance(protection, Passphrase):
        from secretfs.crypto.keys import _SCRYPT_DEFAULTS

        header.update(kdf="scrypt", **dict(scrypt or _SCRYPT_DEFAULTS))
    else:
        header.update(kdf="key-file", key_id=key.key_id)
    return header


def _encode_header(header: Mapping[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body


def _check_header(header: Any) -> dict[str, Any]:
    """The header's fields, checked and decoded (salt, nonce_prefix as bytes); ValueError."""
    if not isinstance(header, dict):
        raise ValueError("not an object")
    common = {"cipher", "chunk_size", "salt", "nonce_prefix", "kdf"}
    kdf = header.get("kdf")
    extra = {"scrypt": {"n", "r", "p"}, "key-file": {"key_id"}}.get(kdf) if isinstance(
        kdf, str) else None
    if extra is None or set(header) != common | extra:
        raise ValueError("unexpected fields")
    if header["cipher"] != "AES-256-GCM" or header["chunk_size"] != CHUNK_SIZE:
        raise ValueError("unknown cipher or chunk size")
    checked = dict(header)
    for name, size in (("salt", SALT_SIZE), ("nonce_prefix", NONCE_PREFIX_SIZE)):
        checked[name] = _decode_b64(header[name])
        if len(checked[name]) != size:
            raise ValueError(name)
    if kdf == "scrypt":
        # The limits of the passphrase key provider (crypto/keys.py): at most 1 GiB of memory.
        limits = {"n": (2, 2**22), "r": (1, 64), "p": (1, 16)}
        for name, (low, high) in limits.items():
            if not _is_int(header[name]) or not low <= header[name] <= high:
                raise ValueError(name)
        if header["n"] & (header["n"] - 1) or 128 * header["n"] * header["r"] > 2**30:
            raise ValueError("n")
    elif not isinstance(header["key_id"], str) or len(header["key_id"]) > 64:
        raise ValueError("key_id")
    return checked


def _chunk_key(ikm: bytes, salt: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_CHUNK_INFO).derive(ikm)


@dataclass
class _Cipher:
    """The AEAD of one archive: its chunk key, nonce prefix and header digest."""

    aead: Any
    nonce_prefix: bytes
    digest: bytes

    @classmethod
    def of(cls, header_bytes: bytes, header: Mapping[str, Any], ikm: bytes) -> _Cipher:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        return cls(AESGCM(_chunk_key(ikm, header["salt"])), header["nonce_prefix"],
                   hashlib.sha256(header_bytes).digest())

    def _nonce_aad(self, index: int, final: bool) -> tuple[bytes, bytes]:
        if index >= 2**32:
            raise ArchiveError("a backup archive holds at most 2^32 chunks")
        return (self.nonce_prefix + index.to_bytes(4, "big"),
                self.digest + index.to_bytes(8, "big") + (b"\x01" if final else b"\x00"))

    def seal(self, index: int, final: bool, plaintext: bytes) -> bytes:
        nonce, aad = self._nonce_aad(index, final)
        return self.aead.encrypt(nonce, plaintext, aad)

    def open(self, index: int, final: bool, chunk: bytes) -> bytes | None:
        from cryptography.exceptions import InvalidTag

        nonce, aad = self._nonce_aad(index, final)
        try:
            return self.aead.decrypt(nonce, chunk, aad)
        except InvalidTag:
            return None


# -- writing -------------------------------------------------------------------------------------


class _ChunkWriter:
    """Plaintext in, chunks out: a chunk is sealed once more than a chunk's worth is buffered,
    so the last one (sealed by close, marked final) holds 1 to CHUNK_SIZE bytes (0 if none)."""

    def __init__(self, out: IO[bytes], cipher: _Cipher) -> None:
        self.out = out
        self.cipher = cipher
        self.index = 0
        self.buffer = bytearray()

    def write(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) > CHUNK_SIZE:
            self._emit(bytes(self.buffer[:CHUNK_SIZE]), final=False)
            del self.buffer[:CHUNK_SIZE]

    def record(self, record: Mapping[str, Any]) -> None:
        body = json.dumps(record, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()
        if len(body) > MAX_RECORD_BYTES:
            raise ArchiveError(f"secret {record.get('name')!r} is too large for one record")
        self.write(_RECORD_LENGTH.pack(len(body)) + body)

    def close(self) -> None:
        self._emit(bytes(self.buffer), final=True)
        self.buffer.clear()

    def _emit(self, plaintext: bytes, *, final: bool) -> None:
        self.out.write(self.cipher.seal(self.index, final, plaintext))
        self.index += 1


def _archive_record(backend_kind: str, complete: bool, policies: Mapping[str, Any] | None
                    ) -> dict[str, Any]:
    from secretfs import __version__

    return {"type": "archive", "format": FORMAT_VERSION, "created": time.time(),
            "secretfs": __version__, "backend": backend_kind, "complete": complete,
            "config": dict(policies) if policies else None}


def _secret_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A backend's export record as it is written (values as base64)."""
    out = {"type": "secret", **record}
    out["versions"] = [
        {**version, "value": None if version["value"] is None else _b64(version["value"])}
        for version in record["versions"]
    ]
    return out


@dataclass
class BackupReport:
    path: Path
    secrets: int = 0
    versions: int = 0
    complete: bool = True  # soft-deleted secrets and deleted versions' values included
    created_key_file: Path | None = None


def write_archive(out: IO[bytes], secrets: Iterable[Mapping[str, Any]], protection: Protection,
                  *, key: Any | None = None, backend_kind: str = "local", complete: bool = True,
                  policies: Mapping[str, Any] | None = None,
                  scrypt: Mapping[str, int] | None = None) -> tuple[int, int]:
    """Write an archive of *secrets* (export records, see LocalBackend.export_secrets) to *out*;
    the number of secrets and versions written. *key*: the loaded key file (KeyFile). *scrypt*:
    other scrypt parameters than the passphrase provider's (n=2^15, r=8, p=1) — for tests."""
    header = _new_header(protection, key, scrypt)
    header_bytes = _encode_header(header)
    checked = _check_header(header)
    ikm = protection.ikm(checked) if isinstance(protection, Passphrase) else \
        key.derive_key(_KEY_FILE_PURPOSE)
    writer = _ChunkWriter(out, _Cipher.of(header_bytes, checked, ikm))
    out.write(header_bytes)
    writer.record(_archive_record(backend_kind, complete, policies))
    count = versions = 0
    for record in secrets:
        writer.record(_secret_record(record))
        count += 1
        versions += len(record["versions"])
    writer.record({"type": "end", "secrets": count, "versions": versions})
    writer.close()
    return count, versions


def export_via_protocol(backend: Backend) -> Iterator[dict[str, Any]]:
    """Export records of what the Backend protocol shows: live secrets only, and no value of a
    deleted version (recorded as deleted, without a value). For backends without
    ``export_secrets``."""
    from secretfs.errors import VersionNotFound
    from secretfs.model import encode_value

    now = time.time()
    states = "rotation_state" in getattr(backend, "capabilities", ())
    for name in backend.list_names():
        try:
            metadata = backend.read_metadata(name)
        except NotFound:
            continue  # deleted since the listing
        created = metadata.created.timestamp() if metadata.created else now
        versions = []
        for info in metadata.versions:
            value = None
            if info.readable:
                with contextlib.suppress(VersionNotFound):
                    value = encode_value(backend.read_value(name, info.version))
            versions.append({
                "version": info.version,
                "created": info.created.timestamp() if info.created else created,
                "is_map": info.is_map, "keys": list(info.keys), "sizes": list(info.sizes),
                "deleted": now if info.deleted else None,
                "destroyed": now if info.destroyed or (info.readable and value is None) else None,
                "value": value,
            })
        state = backend.rotation_state(name) if states else None
        yield {
            "name": name, "description": metadata.description, "tags": dict(metadata.tags),
            "rotation": metadata.rotation.to_json() if metadata.rotation else None,
            "created": created,
            "updated": metadata.updated.timestamp() if metadata.updated else created,
            "next_version": max((v.version for v in metadata.versions), default=0) + 1,
            "deleted": None,
            "labels": {label.value: version for label, version in metadata.labels.items()},
            "rotation_state": None if state is None else {
                "version": state.version, "step": state.step.value, "owner": state.owner,
                "started": state.started, "updated": state.updated},
            "versions": versions,
        }


def policy_sections(config: Config) -> dict[str, Any] | None:
    """The configuration's principals and policies: the text of those two top-level sections
    as written (comments included) when it reads back to the same rules, else the rules written
    out anew as YAML. None when there are neither."""
    if not config.principals and not config.policies:
        return None
    text = _section_text(config)
    if text is None:
        text = _canonical_policies(config)
    return {"source": config.source, "text": text}


def _section_text(config: Config) -> str | None:
    from secretfs.config import parse_config

    if not config.source or config.source.startswith("<"):
        return None
    import yaml

    try:
        original = Path(config.source).read_text(encoding="utf-8-sig")
        root = yaml.compose(original, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, UnicodeError, yaml.YAMLError):
        return None  # then the rules are written out anew
    if root is None or root.id != "mapping" or root.flow_style:
        return None
    lines = original.splitlines(keepends=True)
    starts = [(key.value, key.start_mark.line) for key, _ in root.value]
    parts = []
    for at, (key, line) in enumerate(starts):
        if key in ("principals", "policies"):
            end = starts[at + 1][1] if at + 1 < len(starts) else len(lines)
            parts.append("".join(lines[line:end]).rstrip() + "\n")
    text = "".join(parts)
    try:
        again = parse_config(text, "<policies>")
    except SecretfsError:
        return None
    if dict(again.principals) != dict(config.principals) or \
            dict(again.policies) != dict(config.policies):
        return None
    return text


def _canonical_policies(config: Config) -> str:
    import dataclasses

    import yaml

    data: dict[str, Any] = {}
    if config.principals:
        data["principals"] = {
            name: {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
                   if f.name != "name" and getattr(spec, f.name) is not None}
            for name, spec in config.principals.items()}
    if config.policies:
        def rules(items: Iterable[Any]) -> list[dict[str, Any]]:
            return [{"action": list(r.actions), "resources": list(r.resources)} for r in items]

        data["policies"] = {
            name: {key: value for key, value in (
                ("allow", rules(policy.allow)), ("deny", rules(policy.deny)),
                ("conditions", [{"type": c.type, "value": c.value} for c in policy.conditions]),
            ) if value}
            for name, policy in config.policies.items()}
    return yaml.safe_dump(data, sort_keys=False)


def backup(manager: SyncSecretsManager, path: Path, protection: Asked, *,
           force: bool = False, config: Config | None = None,
           scrypt: Mapping[str, int] | None = None) -> BackupReport:
    """Write an archive of the manager's whole store to *path*: 0600, atomically (a temp file
    beside it, fsynced, then linked — or with *force* renamed — into place), audited as one
    ``backup`` record just before it appears."""
    path = Path(path)
    if not force and os.path.lexists(path):
        raise UsageError(f"{path}: exists", "pass --force to replace it")
    report = BackupReport(path)
    protection = _resolve(protection)
    key = None
    if isinstance(protection, KeyFile):
        existed = os.path.lexists(protection.path)
        key = protection.load(create=True)
        if not existed:
            report.created_key_file = protection.path
        store_key = getattr(manager.backend, "master_key", None)
        finder = getattr(store_key, "key_for", None)  # a key ring: any of its keys
        if store_key is not None and (store_key.key_id == key.key_id or (
                finder is not None and finder(key.key_id, reload=False) is not None)):
            raise UsageError(
                f"{protection.path} is the store's master key",
                "a backup must not depend on the host it backs up: use another key file")
    export = getattr(manager.backend, "export_secrets", None)
    if export is not None:
        secrets = export()
    else:
        secrets, report.complete = export_via_protocol(manager.backend), False
    policies = policy_sections(config) if config is not None else None
    records = iter(secrets)
    try:
        with _TempFile(path) as temp:
            report.secrets, report.versions = write_archive(
                temp.file, records, protection, key=key, backend_kind=manager.backend.kind,
                complete=report.complete, policies=policies, scrypt=scrypt)
            temp.finish()
            manager.authorize(None, "read", "*", "backup", archive=str(path),
                              secrets=report.secrets, versions=report.versions)
            temp.publish(force)
    finally:
        close = getattr(records, "close", None)  # a generator: end its read transaction now
        if close is not None:
            close()
    return report


class _TempFile:
    """A 0600 file beside *path*, fsynced, then put in place; removed on any failure."""

    def __init__(self, path: Path) -> None:
        self.path = path
        parent = path.parent
        self.temp = parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.temp, flags, 0o600)
        except OSError as error:
            raise SecretfsError(f"cannot write {path}: {error.strerror}",
                                f"check that {parent} exists and is writable by you") from None
        os.fchmod(fd, 0o600)
        self.file = os.fdopen(fd, "wb")

    def __enter__(self) -> _TempFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.file.closed:
            self.file.close()
        self.temp.unlink(missing_ok=True)

    def finish(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as error:
            raise SecretfsError(f"cannot write {self.path}: {error.strerror}",
                                "check the disk") from None
        self.file.close()

    def publish(self, force: bool) -> None:
        from secretfs.crypto.keys import _fsync_dir

        try:
            if force:
                os.replace(self.temp, self.path)
            else:
                try:
                    os.link(self.temp, self.path)  # never replaces an existing file
                except FileExistsError:
                    raise UsageError(f"{self.path}: exists", "pass --force to replace it"
                                     ) from None
                except OSError as error:
                    if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS,
                                           errno.EMLINK):
                        raise
                    if os.path.lexists(self.path):  # no hard links here: check, then rename
                        raise UsageError(f"{self.path}: exists", "pass --force to replace it"
                                         ) from None
                    os.rename(self.temp, self.path)
        except OSError as error:
            raise SecretfsError(f"cannot write {self.path}: {error.strerror}",
                                "check the path and its folder") from None
        _fsync_dir(self.path.parent)


# -- reading -------------------------------------------------------------------------------------


def _decode_b64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not base64") from None


def _is_int(value: Any) -> bool:
    """An int SQLite can hold (not a bool: JSON true is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool) and -2**62 < value < 2**62


def _is_text(value: Any) -> bool:
    """A str that is UTF-8 (JSON's \\ud800 escapes give lone surrogates, which are not)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_time(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value) and \
        0 <= value < 1e11


def _no_constants(word: str) -> Any:
    raise ValueError(f"{word} is not allowed")


class _Reader:
    """One archive file, opened once: header, key, then the records of a pass over it."""

    def __init__(self, path: Path, protection: Protection) -> None:
        self.path = Path(path)
        self.protection = protection
        try:
            self.file = open(self.path, "rb")  # noqa: SIM115 — closed by close()
        except FileNotFoundError:
            raise NotFound(f"backup archive {self.path} not found") from None
        except OSError as error:
            raise UsageError(f"cannot read {self.path}: {error.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(self.file.fileno()).st_mode):
                raise UsageError(f"{self.path} is not a regular file",
                                 "give the archive file itself")
            self.header_bytes, header = self._header()
            self.cipher = _Cipher.of(self.header_bytes, header, self._ikm(header))
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def damaged(self, detail: str, *, first: bool = True) -> ArchiveError:
        if first:
            what = f"backup archive {self.path} is damaged or the {self.protection.word} is wrong"
        else:  # a later chunk failed: the key was right
            what = f"backup archive {self.path} is damaged"
        return ArchiveError(what, f"{detail}; nothing was restored")

    def _header(self) -> tuple[bytes, dict[str, Any]]:
        prefix = self.file.read(_PREFIX.size)
        if len(prefix) < _PREFIX.size or prefix[:len(MAGIC)] != MAGIC:
            raise ArchiveError(f"{self.path} is not a secretfs backup archive, or is damaged",
                               "give a file written by 'secretfs backup'")
        _, version, length = _PREFIX.unpack(prefix)
        if version != FORMAT_VERSION:
            raise ArchiveError(
                f"backup archive {self.path} has format version {version}, which this secretfs "
                f"does not read (it reads {FORMAT_VERSION}), or is damaged",
                "restore it with the secretfs that wrote it, or a newer one")
        body = self.file.read(length) if length <= MAX_HEADER_BYTES else b""
        if len(body) != length or not length:
            raise self.damaged("its header is cut short or too long")
        try:
            header = _check_header(json.loads(body.decode(), parse_constant=_no_constants))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise self.damaged("its header is not valid") from None
        return prefix + body, header

    def _ikm(self, header: Mapping[str, Any]) -> bytes:
        kind = header["kdf"]
        if isinstance(self.protection, Passphrase):
            if kind != "scrypt":
                raise ArchiveError(f"backup archive {self.path} is protected by a key file, "
                                   "not a passphrase", "give it with --key-file K")
            return self.protection.ikm(header)
        if kind != "key-file":
            raise ArchiveError(f"backup archive {self.path} is protected by a passphrase, not "
                               "a key file", "drop --key-file; give the passphrase")
        key = self.protection.load(create=False)
        if key.key_id != header["key_id"]:
            raise ArchiveError(
                f"backup archive {self.path} was made with key file {header['key_id']}, not "
                f"with {self.protection.path} ({key.key_id}), or is damaged",
                "give the key file it was made with")
        return key.derive_key(_KEY_FILE_PURPOSE)

    # -- a pass --------------------------------------------------------------------------------

    def chunks(self) -> Iterator[bytes]:
        """The authenticated plaintext chunks, from the start; ArchiveError at the first that
        fails (altered, moved, cut short or extended)."""
        self.file.seek(0)
        if self.file.read(len(self.header_bytes)) != self.header_bytes:
            raise self.damaged("its header changed while it was being read")
        size = CHUNK_SIZE + TAG_SIZE
        index = 0
        current = self.file.read(size)
        while True:
            following = self.file.read(size)
            final = not following
            if len(current) < TAG_SIZE or (not final and len(current) != size):
                raise self.damaged("it ends in the middle of a chunk", first=index == 0)
            plaintext = self.cipher.open(index, final, current)
            if plaintext is None:
                where = "its first chunk" if index == 0 else f"chunk {index}"
                raise self.damaged(f"{where} failed authentication: altered, cut short or "
                                   "extended", first=index == 0)
            yield plaintext
            if final:
                return
            index += 1
            current = following

    def records(self) -> Iterator[dict[str, Any]]:
        """The records of one whole pass, each checked; the last one is ``end``."""
        stream = _Stream(self.chunks())
        seen: _Seen = _Seen()
        number = 0
        while True:
            head = stream.read(_RECORD_LENGTH.size)
            if not head:
                raise self.invalid(number, "the archive ends without its end record")
            if len(head) < _RECORD_LENGTH.size:
                raise self.invalid(number, "a record is cut short")
            (length,) = _RECORD_LENGTH.unpack(head)
            if length > MAX_RECORD_BYTES:
                raise self.invalid(number, "a record is too long")
            body = stream.read(length)
            if len(body) != length:
                raise self.invalid(number, "a record is cut short")
            try:
                record = json.loads(body.decode(), parse_constant=_no_constants)
                record = _check_record(record, number, seen)
            except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError,
                    RecursionError, OverflowError) as error:
                raise self.invalid(number, str(error) if isinstance(error, _Invalid) else
                                   "a record is not valid") from None
            number += 1
            yield record
            if record["type"] == "end":
                break
        if stream.read(1):
            raise self.invalid(number, "there is data after the end record")

    def invalid(self, number: int, detail: str) -> ArchiveError:
        return ArchiveError(f"backup archive {self.path} is not a valid secretfs backup",
                            f"record {number}: {detail}; nothing was restored")


class _Stream:
    """Reads exact lengths across chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.buffer = bytearray()
        self.done = False

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size and not self.done:
            chunk = next(self.chunks, None)
            if chunk is None:
                self.done = True
            else:
                self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


class _Invalid(ValueError):
    """A record that breaks the format (its message names why, never a value)."""


@dataclass
class _Seen:
    names: set[str] = field(default_factory=set)
    folders: set[str] = field(default_factory=set)
    secrets: int = 0
    versions: int = 0
    first: dict[str, Any] | None = None


def _expect(condition: bool, why: str) -> None:
    if not condition:
        raise _Invalid(why)


def _check_record(record: Any, number: int, seen: _Seen) -> dict[str, Any]:
    _expect(isinstance(record, dict), "not an object")
    kind = record.get("type")
    if number == 0:
        _expect(kind == "archive", "the first record is not the archive record")
        _expect(record.get("format") == FORMAT_VERSION, "unknown format")
        _expect(_is_time(record.get("created")), "bad creation time")
        _expect(isinstance(record.get("backend"), str), "bad backend")
        _expect(isinstance(record.get("complete"), bool), "bad completeness flag")
        config = record.get("config")
        if config is not None:
            _expect(isinstance(config, dict) and isinstance(config.get("text"), str)
                    and isinstance(config.get("source"), str | None), "bad configuration")
            from secretfs.config import parse_config

            try:
                parse_config(config["text"], "<archive>")
            except SecretfsError:
                raise _Invalid("its principals and policies do not parse") from None
        seen.first = record
        return record
    if kind == "end":
        _expect(_is_int(record.get("secrets")) and _is_int(record.get("versions"))
                and record["secrets"] == seen.secrets and record["versions"] == seen.versions,
                "the end record's counts differ from the records")
        return record
    _expect(kind == "secret", "unknown record type")
    checked = _check_secret(record, seen)
    seen.secrets += 1
    seen.versions += len(checked["versions"])
    return checked


def _check_secret(record: dict[str, Any], seen: _Seen) -> dict[str, Any]:
    from secretfs.model import (
        RotationPolicy,
        decode_value,
        encode_value,
        normalize_value,
        parent_folders,
        validate_key,
        validate_name,
        value_keys,
        value_sizes,
    )

    name = record.get("name")
    _expect(isinstance(name, str), "a secret without a name")
    try:
        validate_name(name)
    except SecretfsError:
        raise _Invalid("a secret name is not valid") from None
    _expect(name not in seen.names, f"secret {name!r} appears twice")
    _expect(name not in seen.folders and not any(p in seen.names for p in parent_folders(name)),
            f"secret {name!r} would be both a secret and a folder")
    where = f"secret {name!r}"
    description, tags = record.get("description"), record.get("tags")
    _expect(_is_text(description), f"{where}: bad description")
    _expect(isinstance(tags, dict) and all(_is_text(k) and _is_text(v) for k, v in tags.items()),
            f"{where}: bad tags")
    for moment in ("created", "updated"):
        _expect(_is_time(record.get(moment)), f"{where}: bad {moment} time")
    _expect(record.get("deleted") is None or _is_time(record["deleted"]),
            f"{where}: bad deleted time")
    rotation = record.get("rotation")
    if rotation is not None:
        _expect(isinstance(rotation, dict) and isinstance(rotation.get("generator", {}), dict)
                and all(rotation.get(k) is None or isinstance(rotation[k], int | float)
                        for k in ("interval", "max_age", "overlap"))
                and all(rotation.get(k) is None or isinstance(rotation[k], str)
                        for k in ("schedule", "set_cmd", "validate_cmd", "key")),
                f"{where}: bad rotation policy")
        RotationPolicy.from_json(rotation)  # ValueError/TypeError on nonsense
    versions = record.get("versions")
    _expect(isinstance(versions, list), f"{where}: bad versions")
    numbers: list[int] = []
    checked_versions = []
    for item in versions:
        _expect(isinstance(item, dict), f"{where}: bad version")
        number = item.get("version")
        _expect(_is_int(number) and number >= 1 and (not numbers or number > numbers[-1]),
                f"{where}: version numbers not increasing from 1")
        numbers.append(number)
        label = f"{where} version {number}"
        _expect(_is_time(item.get("created")), f"{label}: bad creation time")
        for flag in ("deleted", "destroyed"):
            _expect(item.get(flag) is None or _is_time(item[flag]), f"{label}: bad {flag} time")
        is_map, keys, sizes = item.get("is_map"), item.get("keys"), item.get("sizes")
        _expect(isinstance(is_map, bool), f"{label}: bad type")
        _expect(isinstance(keys, list) and all(isinstance(k, str) for k in keys),
                f"{label}: bad keys")
        _expect(isinstance(sizes, list) and all(_is_int(s) and s >= 0 for s in sizes),
                f"{label}: bad sizes")
        value = item.get("value")
        payload = None
        if value is not None:
            _expect(item.get("destroyed") is None, f"{label}: destroyed, yet has a value")
            payload = _decode_b64(value)
            try:
                decoded = normalize_value(decode_value(payload, is_map))
            except (SecretfsError, ValueError, UnicodeDecodeError, RecursionError):
                raise _Invalid(f"{label}: its value is not valid") from None
            _expect(isinstance(decoded, dict) == is_map and encode_value(decoded) == payload,
                    f"{label}: its value is not valid")
            keys, sizes = list(value_keys(decoded)), list(value_sizes(decoded))
        else:
            _expect(item.get("destroyed") is not None or item.get("deleted") is not None,
                    f"{label}: a readable version without a value")
            try:
                for key in keys:
                    if key != "value" or is_map:
                        validate_key(key)
            except SecretfsError:
                raise _Invalid(f"{label}: bad keys") from None
        checked_versions.append({
            "version": number, "created": item["created"], "is_map": is_map, "keys": keys,
            "sizes": sizes, "deleted": item.get("deleted"),
            # Recorded without a value but not destroyed (a deleted version read through the
            # Backend protocol): it comes back destroyed.
            "destroyed": item.get("destroyed") if payload is not None or item.get("destroyed")
            is not None else item["deleted"],
            "value": payload,
        })
    next_version = record.get("next_version")
    _expect(_is_int(next_version) and next_version > (numbers[-1] if numbers else 0),
            f"{where}: bad next version")
    labels = record.get("labels")
    _expect(isinstance(labels, dict) and all(
        label in _LABELS and _is_int(v) and v in numbers for label, v in labels.items()),
        f"{where}: a label points at no version")
    state = record.get("rotation_state")
    if state is not None:
        _expect(isinstance(state, dict) and set(state) == {
            "version", "step", "owner", "started", "updated"} and _is_int(state["version"])
            and state["step"] in _STEPS and _is_text(state["owner"])
            and _is_time(state["started"]) and _is_time(state["updated"]),
            f"{where}: bad rotation state")
    seen.names.add(name)
    seen.folders.update(parent_folders(name))
    return {
        "type": "secret", "name": name, "description": description, "tags": tags,
        "rotation": rotation, "created": record["created"], "updated": record["updated"],
        "next_version": next_version, "deleted": record.get("deleted"), "labels": labels,
        "rotation_state": state, "versions": checked_versions,
    }


# -- restoring -----------------------------------------------------------------------------------


@dataclass
class RestoreReport:
    path: Path
    secrets: int = 0
    versions: int = 0
    created: float = 0.0
    backend: str = ""
    complete: bool = True
    secretfs: str = ""
    policies: dict[str, Any] | None = None
    policies_written: Path | None = None


def read_archive(path: Path, protection: Asked, *, policies_out: Path | None = None
                 ) -> RestoreReport:
    """Decrypt, authenticate and check the whole archive; write nothing to a store. What it
    holds. *policies_out*: write the archive's principals and policies there."""
    _check_policies_out(policies_out)
    with _Reader(path, _resolve(protection)) as reader:
        report = _scan(reader)
    _write_policies(report, policies_out)
    return report


def _scan(reader: _Reader) -> RestoreReport:
    report = RestoreReport(reader.path)
    for record in reader.records():
        if record["type"] == "archive":
            report.created, report.backend = record["created"], record["backend"]
            report.complete, report.policies = record["complete"], record["config"]
            report.secretfs = str(record.get("secretfs", ""))
        elif record["type"] == "secret":
            report.secrets += 1
            report.versions += len(record["versions"])
    return report


def restore(manager: SyncSecretsManager, path: Path, protection: Asked, *,
            policies_out: Path | None = None) -> RestoreReport:
    """Restore the archive at *path* into the manager's store, which must be empty.

    The whole archive is decrypted, authenticated and checked first, and nothing is written
    unless all of it is sound; then one ``restore`` audit record, then one transaction (a second
    pass over the same open file, authenticated again) that a failure rolls back.
    *policies_out*: then write the archive's principals and policies there (0600, never over an
    existing file)."""
    _check_policies_out(policies_out)
    backend = manager.backend
    restore_secrets = getattr(backend, "restore_secrets", None)
    if restore_secrets is None:
        raise SecretfsError(
            f"restore writes into the embedded local store, not into the {backend.kind} backend",
            "restore into a configuration with backend type local, then copy it across with "
            "'secretfs migrate --from LOCAL --to THIS'")
    if backend.list_names():
        raise _not_empty(backend)
    with _Reader(path, _resolve(protection)) as reader:
        report = _scan(reader)
        manager.authorize(None, "write", "*", "restore", archive=str(reader.path),
                          secrets=report.secrets, versions=report.versions)
        restore_secrets(r for r in reader.records() if r["type"] == "secret")
    _write_policies(report, policies_out)
    return report


def _check_policies_out(path: Path | None) -> None:
    if path is not None and os.path.lexists(path):
        raise UsageError(f"--policies-out {path}: exists", "give a new file name")


def _write_policies(report: RestoreReport, path: Path | None) -> None:
    if path is None or report.policies is None:
        return
    from secretfs.crypto.keys import _create_private_file

    if not _create_private_file(Path(path), report.policies["text"].encode()):
        raise UsageError(f"--policies-out {path}: exists", "give a new file name")
    report.policies_written = Path(path)


def policies_note(report: RestoreReport, config: Config | None) -> str:
    """One line on the archive's principals and policies, for the restore command."""
    held = report.policies
    if held is None:
        return "principals and policies: none in the archive"
    from secretfs.config import parse_config

    rules = parse_config(held["text"], "<archive>")
    counts = (f"{len(rules.principals)} principal{'s' * (len(rules.principals) != 1)} and "
              f"{len(rules.policies)} polic{'ies' if len(rules.policies) != 1 else 'y'}")
    source = held.get("source") or "the configuration"
    if report.policies_written is not None:
        return (f"principals and policies: {counts} of {source} written to "
                f"{report.policies_written} (merge them into the configuration)")
    if config is not None and dict(rules.principals) == dict(config.principals) and \
            dict(rules.policies) == dict(config.policies):
        return f"principals and policies: {counts}, the same as the current configuration"
    return (f"principals and policies: the archive holds {counts} of {source}, not in the "
            "current configuration; write them out with --policies-out F")


def _not_empty(backend: Any) -> ConflictError:
    where = getattr(backend, "path", None)
    return ConflictError(
        f"the store{f' {where}' if where else ''} is not empty: restore only fills an empty store",
        "point --config at a new store (then 'secretfs init'), or move this one away first")
