"""Master keys, and the providers that keep them.

A master key does one thing: wrap and unwrap the per-version data keys of
:mod:`secretfs.crypto.envelope`. Three providers hold it locally as 32 bytes:

``file``
    32 random bytes, base64 on one line, in a key file of mode 0600 (the default).
``passphrase``
    scrypt(passphrase, salt); the key file holds only the salt and the scrypt parameters.
``keyring``
    32 random bytes, base64, in the OS keychain; the key file path only names the entry.

Key files are treated like ssh private keys: a key file that is a symbolic link, not a regular
file, not owned by the user running secretfs, or open to group or others is refused, not used.

A store may need more than one master key at a time: while ``secretfs keys rotate``
(crypto/rotate.py) is unfinished, some data keys are wrapped by the old key and some by the new
one. So these providers load a :class:`MasterKeyRing` (:class:`KeySlots` says where its keys
are): the current key wraps, every key of the ring unwraps the data keys that name its id.

The scrypt, getpass, json and keyring imports happen inside the providers that use them, so that
loading a key from a file stays fast.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import stat
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, runtime_checkable

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from secretfs.errors import ConfigError, IntegrityError, StoreError, UnsafeKeyFile

if TYPE_CHECKING:
    from secretfs.config import EncryptionConfig

__all__ = [
    "CARRIED_PURPOSES",
    "LOCAL_PROVIDERS",
    "PROVIDERS",
    "KeySlots",
    "LocalMasterKey",
    "MasterKey",
    "MasterKeyRing",
    "configured_master_key",
    "create_key_file",
    "load_key_ring",
    "load_master_key",
]

MASTER_KEY_SIZE = 32
REMOTE_PROVIDERS = {"openbao_transit": "key_name", "aws_kms": "key_id"}
"""Providers whose key stays in a service (crypto/remote.py), and the setting that names it."""
LOCAL_PROVIDERS = ("file", "passphrase", "keyring")
"""Providers whose key is 32 bytes in this process: they load a :class:`MasterKeyRing`."""
PROVIDERS = (*LOCAL_PROVIDERS, *REMOTE_PROVIDERS)
"""The providers this version implements."""
CARRIED_PURPOSES = (b"audit log v1",)
"""The purposes of :meth:`MasterKey.derive_key` whose keys survive a master-key rotation: they
stay derived from the store's first master key, kept wrapped by the current one (KeySlots)."""

_KEY_ID_LABEL = b"secretfs master key id"
_MAX_KEY_FILE_BYTES = 4096
_KEYRING_SERVICE = "secretfs"
_PASSPHRASE_ENV = "SECRETFS_PASSPHRASE"
_SCRYPT_DEFAULTS = {"n": 2**15, "r": 8, "p": 1}
_SALT_SIZE = 16


@runtime_checkable
class MasterKey(Protocol):
    """What the envelope needs from a master key, wherever the key is kept."""

    key_id: str
    """A stable, public id of the key; stored next to every wrapped data key."""

    def wrap(self, data_key: bytes) -> bytes:
        """Encrypt and authenticate ``data_key``."""
        ...

    def unwrap(self, wrapped: bytes) -> bytes:
        """Return the data key; raise :class:`IntegrityError` if ``wrapped`` is not authentic."""
        ...

    def derive_key(self, purpose: bytes) -> bytes:
        """A 32-byte key for another purpose (the audit log's MAC), bound to this master key."""
        ...


class LocalMasterKey:
    """A 32-byte master key held in this process's memory.

    Wrapping is RFC 3394 AES key wrap: deterministic and authenticated, which is what a key of
    random bytes needs (no nonce to store). The object never shows its key: not in ``repr``, and
    it cannot be pickled, so it does not end up in a cache file or a worker process by accident.
    """

    __slots__ = ("_key", "key_id")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes | bytearray):
            raise TypeError("a master key must be bytes")
        if len(key) != MASTER_KEY_SIZE:
            raise ValueError(f"a master key must be {MASTER_KEY_SIZE} bytes")
        self._key = bytes(key)
        self.key_id: str = _key_id(self._key)

    def wrap(self, data_key: bytes) -> bytes:
        return aes_key_wrap(self._key, data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        try:
            return aes_key_unwrap(self._key, wrapped)
        except (InvalidUnwrap, ValueError):
            raise IntegrityError(
                "store integrity error: a wrapped data key failed authentication",
                "the store was altered; restore it from a backup",
            ) from None

    def derive_key(self, purpose: bytes) -> bytes:
        """A 32-byte key for *purpose* (e.g. the audit log's MAC key), derived with HKDF-SHA256
        so that it reveals nothing about the master key or about keys for other purposes."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"secretfs/" + purpose).derive(self._key)

    def __repr__(self) -> str:
        return f"LocalMasterKey(key_id={self.key_id!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a master key cannot be pickled")


def _key_id(key: bytes) -> str:
    """A public id for ``key``: an HMAC under the key itself, so it reveals nothing about it."""
    import hashlib  # here, not at the top: loading OpenSSL's hashes costs a few ms at startup
    import hmac

    return "mk-" + hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).digest()[:8].hex()


# -- dispatch ---------------------------------------------------------------------------------


def load_master_key(provider: str, key_file: Path, *, create: bool,
                    remote_key: str | None = None, passphrase: str | None = None) -> MasterKey:
    """Load the master key from ``provider``; with ``create``, make it first if there is none.

    ``create=True`` is idempotent and safe against concurrent callers: every caller ends up with
    the same key. With ``create=False`` a missing key is a :class:`StoreError` that tells the user
    to run ``secretfs init``.

    The local providers return a :class:`MasterKeyRing` (one key, or two while a rotation is
    unfinished); *passphrase*, for the ``passphrase`` provider, saves asking for it.
    """
    key_file = Path(key_file)
    if provider in LOCAL_PROVIDERS:
        return load_key_ring(provider, key_file, create=create, passphrase=passphrase)
    if provider in REMOTE_PROVIDERS:
        setting = REMOTE_PROVIDERS[provider]
        if not remote_key:
            raise ConfigError(f"encryption provider '{provider}' needs encryption.{setting}",
                              f"set encryption.{setting} to the key's name in the service")
        from secretfs.crypto import remote  # boto3 for aws_kms: only for these providers

        factory = remote.transit_key if provider == "openbao_transit" else remote.kms_key
        return factory(remote_key, key_file, create=create)
    raise ConfigError(
        f"unknown encryption provider '{provider}'",
        "set encryption.provider to one of: " + ", ".join(PROVIDERS),
    )


def configured_master_key(encryption: EncryptionConfig, *, create: bool) -> MasterKey:
    """The master key an ``encryption:`` section names."""
    return load_master_key(encryption.provider, encryption.key_file, create=create,
                           remote_key=encryption.key_name or encryption.key_id)


def create_key_file(path: Path) -> LocalMasterKey:
    """Create a new ``file``-provider key at ``path``; refuse if a key file is already there.

    Refusing instead of overwriting is the point: the old key is the only way to read whatever it
    sealed. Use ``load_master_key("file", path, create=True)`` for "create unless present".
    """
    path = Path(path)
    key = os.urandom(MASTER_KEY_SIZE)
    if not _create_private_file(path, _encode_key(key)):
        raise StoreError(
            f"a master key already exists at {path}",
            "keep it: it is the only key that can read its store; "
            "to start a new, empty store, move the old store and key away first",
        )
    return LocalMasterKey(key)


def _no_master_key(where: str) -> StoreError:
    return StoreError(
        f"no master key at {where}", "run 'secretfs init' to create the store and its key"
    )


# -- file provider ----------------------------------------------------------------------------


def _load_file_key(path: Path, *, create: bool) -> LocalMasterKey:
    data = _read_private_file(path)
    if data is None:
        if not create:
            raise _no_master_key(str(path))
        key = os.urandom(MASTER_KEY_SIZE)
        if _create_private_file(path, _encode_key(key)):
            return LocalMasterKey(key)
        data = _read_after_lost_race(path)
    return LocalMasterKey(_decode_key(data, f"key file {path}"))


def _encode_key(key: bytes) -> bytes:
    return base64.b64encode(key) + b"\n"


def _decode_key(data: bytes | str, where: str) -> bytes:
    """The 32 key bytes of one base64 line; the message never quotes the content."""
    try:
        key = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != MASTER_KEY_SIZE:
        raise StoreError(
            f"{where} does not hold a master key (expected one line of base64 of "
            f"{MASTER_KEY_SIZE} bytes)",
            "restore the key from your backup; a new key cannot read the existing store",
        )
    return key


# -- passphrase provider ----------------------------------------------------------------------


class _Passphrase:
    """The passphrase, asked for at most once: a rotation's two keys share it."""

    __slots__ = ("_path", "_value")

    def __init__(self, path: Path, value: str | None = None) -> None:
        self._path = path
        self._value = value

    def __call__(self, *, confirm: bool = False) -> str:
        if self._value is None:
            self._value = _get_passphrase(self._path, confirm=confirm)
        return self._value

    def __repr__(self) -> str:
        return "_Passphrase(<hidden>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a passphrase cannot be pickled")


def _scrypt_params_file() -> bytes:
    """A new passphrase parameters file: the default scrypt costs and a fresh salt."""
    import json

    params = {"kdf": "scrypt", **_SCRYPT_DEFAULTS,
              "salt": base64.b64encode(os.urandom(_SALT_SIZE)).decode()}
    return json.dumps(params).encode() + b"\n"


def _load_passphrase_key(path: Path, *, create: bool,
                         ask: _Passphrase | None = None) -> LocalMasterKey:
    ask = ask or _Passphrase(path)
    data = _read_private_file(path)
    if data is None:
        if not create:
            raise _no_master_key(str(path))
        # Ask before writing, so that a failed prompt leaves nothing half-made behind.
        passphrase = ask(confirm=True)
        content = _scrypt_params_file()
        if not _create_private_file(path, content):
            content = _read_after_lost_race(path)
        params = _parse_scrypt_params(path, content)
    else:
        params = _parse_scrypt_params(path, data)
        passphrase = ask(confirm=False)
    return LocalMasterKey(_derive(passphrase, params))


def _parse_scrypt_params(path: Path, data: bytes) -> dict[str, Any]:
    import json

    def bad(detail: str) -> StoreError:
        return StoreError(
            f"key file {path} is not a valid passphrase parameters file ({detail})",
            "restore it from your backup: without its salt the passphrase cannot recreate the key",
        )

    try:
        params = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise bad("not JSON") from None
    if not isinstance(params, dict) or params.get("kdf") != "scrypt":
        raise bad('"kdf" is not "scrypt"')
    limits = {"n": (2, 2**22), "r": (1, 64), "p": (1, 16)}
    for name, (low, high) in limits.items():
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise bad(f'"{name}" must be an integer from {low} to {high}')
    if params["n"] & (params["n"] - 1):
        raise bad('"n" must be a power of two')
    if 128 * params["n"] * params["r"] > 2**30:
        raise bad('"n" and "r" ask for more than 1 GiB of memory')
    try:
        salt = base64.b64decode(params.get("salt", ""), validate=True)
    except (binascii.Error, ValueError, TypeError):
        salt = b""
    if len(salt) < _SALT_SIZE:
        raise bad(f'"salt" must be base64 of at least {_SALT_SIZE} bytes')
    return {"n": params["n"], "r": params["r"], "p": params["p"], "salt": salt}


def _derive(passphrase: str, params: dict[str, Any]) -> bytes:
    import unicodedata

    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    salt = params["salt"]
    if isinstance(salt, str):
        salt = base64.b64decode(salt)
    kdf = Scrypt(salt=salt, length=MASTER_KEY_SIZE, n=params["n"], r=params["r"], p=params["p"])
    # NFC: the same passphrase typed on two systems may arrive in two Unicode normal forms.
    return kdf.derive(unicodedata.normalize("NFC", passphrase).encode())


def _get_passphrase(path: Path, *, confirm: bool) -> str:
    """The passphrase from $SECRETFS_PASSPHRASE, else from the terminal; never empty."""
    passphrase = os.environ.get(_PASSPHRASE_ENV)
    if passphrase is not None:
        if not passphrase:
            raise StoreError(
                f"{_PASSPHRASE_ENV} is set but empty",
                "set it to the store's passphrase, or unset it to be asked on the terminal",
            )
        return passphrase
    if sys.stdin is None or not sys.stdin.isatty():
        raise StoreError("no passphrase given", f"set {_PASSPHRASE_ENV} or run on a terminal")
    import getpass

    try:
        passphrase = getpass.getpass(f"Passphrase for the secretfs master key ({path}): ")
        if not passphrase:
            raise StoreError("the passphrase is empty", "enter a non-empty passphrase")
        if confirm and getpass.getpass("Repeat the passphrase: ") != passphrase:
            raise StoreError("the two passphrases differ", "run the command again")
    except EOFError:
        raise StoreError(
            "no passphrase given", f"set {_PASSPHRASE_ENV} or run on a terminal"
        ) from None
    return passphrase


# -- keyring provider -------------------------------------------------------------------------


def _keychain() -> tuple[Any, str]:
    """The keyring backend, and its name for messages."""
    import keyring

    try:
        backend = keyring.get_keyring()
        return backend, str(getattr(backend, "name", type(backend).__name__))
    except Exception as exc:
        _raise_keyring_error("(backend unknown)", exc, "")


def _keyring_username(key_file: Path, suffix: str = "") -> str:
    """The keychain entry (username) a key file path names; *suffix* for a rotation's keys."""
    return "master-key:" + str(key_file.resolve()) + suffix


def _load_keyring_key(key_file: Path, *, create: bool) -> LocalMasterKey:
    username = _keyring_username(key_file)
    entry = f"keyring entry '{_KEYRING_SERVICE}' / '{username}'"
    backend, backend_name = _keychain()
    try:
        stored = backend.get_password(_KEYRING_SERVICE, username)
    except Exception as exc:
        _raise_keyring_error(backend_name, exc, "")
    if stored is None:
        if not create:
            raise _no_master_key(f"{key_file} (no {entry} in {backend_name})")
        encoded = base64.b64encode(os.urandom(MASTER_KEY_SIZE)).decode()
        try:
            backend.set_password(_KEYRING_SERVICE, username, encoded)
            # A keychain has no create-if-absent. Reading back makes racing creators settle on
            # the last writer's key in all but a narrow window (see docs/encryption.md).
            stored = backend.get_password(_KEYRING_SERVICE, username)
        except Exception as exc:
            _raise_keyring_error(backend_name, exc, encoded)
        if stored is None:
            raise StoreError(
                f"the keyring backend '{backend_name}' did not keep the key written to {entry}",
                "use a keychain that stores passwords, or set encryption.provider to 'file'",
            )
    return LocalMasterKey(_decode_key(stored, f"{entry} in {backend_name}"))


def _raise_keyring_error(backend_name: str, exc: Exception, secret: str) -> NoReturn:
    """Turn any backend failure into a StoreError that names the backend, never the key."""
    from keyring.errors import KeyringLocked, NoKeyringError

    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if secret:
        detail = detail.replace(secret, "<key>")
    if isinstance(exc, NoKeyringError):
        fix = (
            "start an OS keychain (e.g. gnome-keyring or KWallet) or set "
            "encryption.provider to 'file'"
        )
    elif isinstance(exc, KeyringLocked):
        fix = "unlock the keychain and run the command again"
    else:
        fix = (
            "check that the keychain is running and unlocked, or set encryption.provider to 'file'"
        )
    raise StoreError(f"the keyring backend '{backend_name}' failed: {detail}", fix) from None


# -- key slots and the ring -------------------------------------------------------------------


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


class KeySlots:
    """Where a local provider keeps the master keys of one store (see docs/encryption.md).

    - ``current``: ``encryption.key_file`` — the key (``file``), its scrypt salt
      (``passphrase``), or the name of the keychain entry (``keyring``).
    - ``next``: ``<key_file>.next`` (keyring: the entry ``master-key:<key_file>.next``) — the new
      key of an unfinished rotation. While it exists it is the current key, and the key in
      ``current`` only unwraps what it still wraps.
    - ``retired``: the folder ``<key_file>.retired/`` (keyring: entries
      ``master-key:<key_file>.retired/<key id>``) — keys that no stored version needs any more,
      kept only to open backups made before their rotation. Nothing loads keys from there.
    - ``carried``: ``<key_file>.derived`` — the keys of :data:`CARRIED_PURPOSES` (the audit log's
      MAC key), derived from the store's first master key and kept wrapped by each key loaded,
      so that they outlive a rotation. It does not exist before the first rotation.
    - ``lock``: ``<key_file>.lock``, held by a rotation.
    """

    def __init__(self, provider: str, key_file: Path) -> None:
        if provider not in LOCAL_PROVIDERS:
            raise ValueError(f"no key slots for provider {provider!r}")
        self.provider = provider
        self.current = Path(key_file)
        self.next = _sibling(self.current, ".next")
        self.retired = _sibling(self.current, ".retired")
        self.carried = _sibling(self.current, ".derived")
        self.lock = _sibling(self.current, ".lock")

    # -- where ------------------------------------------------------------------------------

    def _suffix(self, path: Path) -> str:
        return str(path)[len(str(self.current)):]

    def where(self, path: Path) -> str:
        """*path* as a user finds it: the file, or the keychain entry."""
        if self.provider == "keyring":
            return (f"keyring entry '{_KEYRING_SERVICE}' / "
                    f"'{_keyring_username(self.current, self._suffix(path))}'")
        return str(path)

    def retired_path(self, key_id: str) -> Path:
        return self.retired / key_id

    # -- reading ----------------------------------------------------------------------------

    def read_raw(self, path: Path) -> bytes | None:
        """What *path* holds (key, salt file, or keychain entry), or None if nothing."""
        if self.provider != "keyring":
            return _read_private_file(path)
        backend, backend_name = _keychain()
        try:
            stored = backend.get_password(_KEYRING_SERVICE,
                                          _keyring_username(self.current, self._suffix(path)))
        except Exception as exc:
            _raise_keyring_error(backend_name, exc, "")
        return None if stored is None else stored.encode()

    def key_of(self, path: Path, raw: bytes, ask: _Passphrase) -> LocalMasterKey:
        if self.provider == "passphrase":
            return LocalMasterKey(_derive(ask(), _parse_scrypt_params(path, raw)))
        return LocalMasterKey(_decode_key(raw, self.where(path)))

    def load(self, path: Path, ask: _Passphrase) -> LocalMasterKey | None:
        raw = self.read_raw(path)
        return None if raw is None else self.key_of(path, raw, ask)

    def load_current(self, *, create: bool, ask: _Passphrase) -> LocalMasterKey:
        """The key in ``current``, made first with *create* (safe against racing creators)."""
        if self.provider == "file":
            return _load_file_key(self.current, create=create)
        if self.provider == "passphrase":
            return _load_passphrase_key(self.current, create=create, ask=ask)
        return _load_keyring_key(self.current, create=create)

    def ring(self, *, create: bool = False, passphrase: str | None = None) -> MasterKeyRing:
        """The keys a store may need now: ``next`` (if a rotation is unfinished), then
        ``current``. ``current`` is made (with *create*) only when no rotation is under way:
        a missing old key must stay missing, and say so, not be replaced by a third key."""
        ask = _Passphrase(self.current, passphrase)
        new = self.load(self.next, ask)
        if new is None:
            base: LocalMasterKey | None = self.load_current(create=create, ask=ask)
            keys = [base]
        else:
            base = self.load(self.current, ask)
            keys = [new] if base is None or base.key_id == new.key_id else [new, base]
        can_reload = self.provider != "passphrase" or passphrase is not None \
            or bool(os.environ.get(_PASSPHRASE_ENV))
        return MasterKeyRing(keys, base=base, carried=self.read_carried(), slots=self,
                             rotating=new is not None,
                             reload=(lambda: self.ring(passphrase=passphrase)) if can_reload
                             else None)

    def read_carried(self) -> dict[bytes, dict[str, bytes]]:
        """``{purpose: {key id: wrapped key}}`` from the ``carried`` file ({} if none)."""
        data = _read_private_file(self.carried)
        if data is None:
            return {}
        import json

        def bad() -> StoreError:
            return StoreError(f"{self.carried} is not a secretfs derived-keys file",
                              "restore it from your backup: the audit log is verified with it")

        try:
            document = json.loads(data)
            carried = {
                purpose.encode(): {key_id: base64.b64decode(wrapped, validate=True)
                                   for key_id, wrapped in entries.items()}
                for purpose, entries in document["keys"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise bad() from None
        if document.get("format") != 1:
            raise bad()
        return carried

    # -- writing (a rotation, crypto/rotate.py) ------------------------------------------------

    def create_next(self, ask: _Passphrase) -> bool:
        """Make a new random key in ``next``, durably; False if one is already there.

        The key is on disk (file and folder fsynced) before this returns, so a version may
        refer to it. ``passphrase``: a new salt under the same passphrase (a new key).
        """
        if self.provider == "file":
            return _create_private_file(self.next, _encode_key(os.urandom(MASTER_KEY_SIZE)))
        if self.provider == "passphrase":
            ask()  # ask before writing: a failed prompt leaves nothing half-made
            return _create_private_file(self.next, _scrypt_params_file())
        if self.read_raw(self.next) is not None:
            return False
        self._keyring_set(self.next, base64.b64encode(os.urandom(MASTER_KEY_SIZE)).decode())
        return True

    def retire(self, key: LocalMasterKey, ask: _Passphrase) -> str:
        """Keep a copy of the key in ``current`` (which must be *key*) under ``retired``;
        return where. Idempotent. Must happen before :meth:`promote` overwrites ``current``."""
        target = self.retired_path(key.key_id)
        existing = self.read_raw(target)
        if existing is not None:
            return self.where(target)
        raw = self.read_raw(self.current)
        if raw is None or self.key_of(self.current, raw, ask).key_id != key.key_id:
            raise StoreError(f"{self.where(self.current)} no longer holds master key "
                             f"'{key.key_id}'", "restore it, then run 'secretfs keys rotate' "
                             "again")
        if self.provider == "keyring":
            self._keyring_set(target, raw.decode())
        else:
            _make_private_dirs(self.retired)
            _fsync_dir(self.retired.parent)  # the folder's own entry, before promote() needs it
            _create_private_file(target, raw)
        return self.where(target)

    def promote(self) -> None:
        """Make ``next`` the ``current`` key; no-op when it already is."""
        if self.provider != "keyring":
            try:
                os.replace(self.next, self.current)  # atomic: current is old or new, never none
            except FileNotFoundError:
                return  # a racing or earlier run promoted it
            _fsync_dir(self.current.parent)
            return
        raw = self.read_raw(self.next)
        if raw is None:
            return
        if self.read_raw(self.current) != raw:
            self._keyring_set(self.current, raw.decode())
        backend, backend_name = _keychain()
        try:
            backend.delete_password(_KEYRING_SERVICE,
                                    _keyring_username(self.current, self._suffix(self.next)))
        except Exception as exc:
            _raise_keyring_error(backend_name, exc, "")

    def write_carried(self, carried: dict[bytes, dict[str, bytes]]) -> None:
        """Replace the ``carried`` file atomically and durably."""
        import json

        document = {"format": 1, "keys": {
            purpose.decode(): {key_id: base64.b64encode(wrapped).decode()
                               for key_id, wrapped in sorted(entries.items())}
            for purpose, entries in carried.items()}}
        _replace_private_file(self.carried, json.dumps(document, sort_keys=True).encode() + b"\n")

    def retired_ids(self) -> list[str]:
        """Key ids under ``retired`` (files only: a keychain cannot be listed)."""
        if self.provider == "keyring":
            return []
        try:
            return sorted(p.name for p in self.retired.iterdir() if p.name.startswith("mk-"))
        except OSError:
            return []

    def _keyring_set(self, path: Path, encoded: str) -> None:
        backend, backend_name = _keychain()
        username = _keyring_username(self.current, self._suffix(path))
        try:
            backend.set_password(_KEYRING_SERVICE, username, encoded)
            stored = backend.get_password(_KEYRING_SERVICE, username)
        except Exception as exc:
            _raise_keyring_error(backend_name, exc, encoded)
        if stored != encoded:
            raise StoreError(
                f"the keyring backend '{backend_name}' did not keep the key written to "
                f"{self.where(path)}", "use a keychain that stores passwords")


class MasterKeyRing:
    """The master keys of one store, by key id: the first (current) one wraps new data keys;
    the others — the old key of an unfinished rotation — only unwrap what names them.

    It is itself a :class:`MasterKey` (``key_id``, ``wrap``, ``unwrap`` are the current key's),
    so code that knows one key keeps working; the local backend asks :meth:`key_for` the key a
    stored version names. A long-running process (the daemon) whose ring lacks a key id that
    the store now names reloads the ring from its slots (at most once a second): a rotation
    run by another process is picked up without a restart.
    """

    __slots__ = ("_lock", "_missing", "_reload", "_state", "slots")

    def __init__(self, keys: list[LocalMasterKey] | tuple[MasterKey, ...], *,
                 base: MasterKey | None = None,
                 carried: dict[bytes, dict[str, bytes]] | None = None,
                 slots: KeySlots | None = None, rotating: bool = False,
                 reload: Any = None) -> None:
        if not keys:
            raise ValueError("a key ring needs a key")
        import threading

        self._state = (tuple(keys), base, dict(carried or {}), rotating)
        self._reload = reload
        self._missing: dict[str, float] = {}  # key id → when a reload last failed to find it
        self._lock = threading.Lock()
        self.slots = slots

    @property
    def current(self) -> MasterKey:
        return self._state[0][0]

    @property
    def key_id(self) -> str:
        return self._state[0][0].key_id

    @property
    def keys(self) -> tuple[MasterKey, ...]:
        return self._state[0]

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(key.key_id for key in self._state[0])

    @property
    def base(self) -> MasterKey | None:
        """The key in ``key_file`` (the old key while a rotation is unfinished), if present."""
        return self._state[1]

    @property
    def carried(self) -> dict[bytes, dict[str, bytes]]:
        return self._state[2]

    @property
    def rotating(self) -> bool:
        """Whether a rotation is unfinished (its new key was found in the ``next`` slot)."""
        return self._state[3]

    def wrap(self, data_key: bytes) -> bytes:
        return self.current.wrap(data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        return self.current.unwrap(wrapped)

    def key_for(self, key_id: str, *, reload: bool = True) -> MasterKey | None:
        """The key with *key_id*; if none, reload the ring and look again. A key id a reload
        did not find is looked for again at most once a second."""
        for key in self._state[0]:
            if key.key_id == key_id:
                return key
        if not reload or self._reload is None:
            return None
        if time.monotonic() - self._missing.get(key_id, -1e9) < 1.0:
            return None
        self.refresh()
        for key in self._state[0]:
            if key.key_id == key_id:
                return key
        if len(self._missing) > 100:
            self._missing.clear()
        self._missing[key_id] = time.monotonic()
        return None

    def refresh(self) -> None:
        """Load the keys again from their slots (a rotation run by another process)."""
        if self._reload is None:
            return
        with self._lock:
            self._state = self._reload()._state

    def derive_key(self, purpose: bytes) -> bytes:
        """The key for *purpose*: the carried one (unwrapped by whichever loaded key wrapped
        it) once a rotation has carried it, else derived from the key in ``key_file``."""
        keys, base, carried, _ = self._state
        entries = carried.get(purpose)
        if entries:
            for key in keys:
                if key.key_id in entries:
                    return key.unwrap(entries[key.key_id])
            where = self.slots.carried if self.slots else "the derived-keys file"
            raise StoreError(
                f"{where} keeps the {purpose.decode()} key for master key(s) "
                f"{', '.join(sorted(entries))}, none of them loaded "
                f"(loaded: {', '.join(self.key_ids)})",
                "restore the master key file(s) and the derived-keys file from the same backup")
        if base is None:
            where = self.slots.where(self.slots.current) if self.slots else "key_file"
            raise StoreError(
                f"the {purpose.decode()} key derives from the master key at {where}, "
                "which is missing while a key rotation is unfinished",
                "restore that key file from your backup, then run 'secretfs keys rotate'")
        return base.derive_key(purpose)

    def missing(self, key_id: str, what: str) -> StoreError:
        """The error for *what* (a stored version) naming key *key_id*, which is not loaded."""
        from secretfs.errors import WrongMasterKey

        loaded = self.key_ids
        if len(loaded) == 1:
            said = f"but the configured master key is '{loaded[0]}'"
        else:
            said = f"but the loaded master keys are {', '.join(repr(k) for k in loaded)}"
        fix = "point encryption.key_file (or the provider) at the key that created this store"
        if self.rotating and self.slots is not None:
            fix = (f"a key rotation is unfinished and its old key is not at "
                   f"{self.slots.where(self.slots.current)}: restore that key from your backup, "
                   "then run 'secretfs keys rotate' to finish")
        return WrongMasterKey(f"{what} is sealed by master key '{key_id}', {said}", fix)

    def __repr__(self) -> str:
        return f"MasterKeyRing(key_ids={list(self.key_ids)!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a master key cannot be pickled")


def load_key_ring(provider: str, key_file: Path, *, create: bool = False,
                  passphrase: str | None = None) -> MasterKeyRing:
    """The :class:`MasterKeyRing` of a local provider (see :class:`KeySlots`)."""
    return KeySlots(provider, Path(key_file)).ring(create=create, passphrase=passphrase)


# -- private files ----------------------------------------------------------------------------


def _read_private_file(path: Path) -> bytes | None:
    """The content of key file ``path``, or None if it does not exist.

    Opened with O_NOFOLLOW and checked on the open descriptor (fstat), so a file swapped in
    between the check and the read is still the one checked. O_NONBLOCK keeps a FIFO planted at
    the path from hanging the caller.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeKeyFile(
                f"key file {path} is a symbolic link",
                "replace the link with the file itself (owned by you, mode 0600)",
            ) from None
        raise StoreError(
            f"cannot open key file {path}: {exc.strerror}",
            "run secretfs as the user that owns the key file, or fix encryption.key_file",
        ) from None
    try:
        _check_private(path, os.fstat(fd))
        chunks = []
        size = 0
        while chunk := os.read(fd, _MAX_KEY_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_KEY_FILE_BYTES:
                raise StoreError(
                    f"key file {path} is larger than {_MAX_KEY_FILE_BYTES} bytes",
                    "point encryption.key_file at the key file secretfs created",
                )
        return b"".join(chunks)
    except OSError as exc:
        raise StoreError(
            f"cannot read key file {path}: {exc.strerror}", "check the disk and the file"
        ) from None
    finally:
        os.close(fd)


def _check_private(path: Path, st: os.stat_result) -> None:
    """Refuse, like ssh, a key file that someone other than its owner could read or replace."""
    import shlex

    if not stat.S_ISREG(st.st_mode):
        raise UnsafeKeyFile(
            f"key file {path} is not a regular file", "point encryption.key_file at the key file"
        )
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafeKeyFile(
            f"key file {path} is owned by uid {st.st_uid}, not by uid {euid} running secretfs",
            f"run secretfs as its owner, or run: chown {euid} {shlex.quote(str(path))}",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        quoted = shlex.quote(str(path))
        if mode & 0o044:
            how = "readable by others"
        elif mode & 0o022:
            how = "writable by others"
        else:
            how = "open to others"
        raise UnsafeKeyFile(
            f"key file {path} is {how} (mode {mode:04o})", f"run: chmod 600 {quoted}"
        )


def _create_private_file(path: Path, data: bytes) -> bool:
    """Create ``path`` with mode 0600 holding ``data``; False if it already exists.

    The content is written and fsynced in a temporary file, then hard-linked into place: link(2)
    never replaces an existing name (so of racing creators exactly one wins) and readers never
    see a half-written key. On a filesystem without hard links, the key file itself is created
    with O_EXCL and written in one call.
    """
    parent = path.parent
    _make_private_dirs(parent)
    tmp = parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    _write_exclusive(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise StoreError(
                f"cannot create key file {path}: {exc.strerror}",
                f"check that {parent} is writable by you",
            ) from None
        try:
            _write_exclusive(path, data)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(parent)
    return True


def _replace_private_file(path: Path, data: bytes) -> None:
    """Write ``path`` (mode 0600) atomically: a fsynced temporary file renamed over it, then
    the folder fsynced; a reader sees the old content or the new, never a mix."""
    parent = path.parent
    _make_private_dirs(parent)
    tmp = parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    _write_exclusive(tmp, data)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc.strerror}",
                         f"check that {parent} is writable by you") from None
    _fsync_dir(parent)


def _write_exclusive(path: Path, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise
    except OSError as exc:
        raise StoreError(
            f"cannot create key file {path}: {exc.strerror}",
            f"check that {path.parent} is writable by you",
        ) from None
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and any missing parents with mode 0700; leave existing ones alone."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=0o700)
        except FileExistsError:
            continue  # a racing creator made it
        except OSError as exc:
            raise StoreError(
                f"cannot create folder {new}: {exc.strerror}",
                f"create it yourself with mode 0700, or check that {new.parent} is writable",
            ) from None
        os.chmod(new, 0o700)


def _fsync_dir(folder: Path) -> None:
    """Make a new directory entry durable; best effort where directories cannot be fsynced."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_after_lost_race(path: Path) -> bytes:
    """The winner's key file, once it is complete.

    With hard links it always is; the O_EXCL fallback leaves a moment between creating the file
    and writing it, so an empty file is waited on for up to a second.
    """
    deadline = time.monotonic() + 1.0
    while True:
        data = _read_private_file(path)
        if data is None:
            raise StoreError(
                f"key file {path} vanished while it was being created",
                "check what else is managing this folder, then run the command again",
            )
        if data or time.monotonic() > deadline:
            return data
        time.sleep(0.01)
