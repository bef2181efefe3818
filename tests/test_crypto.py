"""Envelope encryption and the master-key providers (secretfs.crypto)."""

from __future__ import annotations

import base64
import errno
import io
import json
import multiprocessing
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import keyring
import keyring.backends.fail
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from keyrings.alt.file import PlaintextKeyring

from secretfs.crypto.envelope import SealedValue, associated_data, open_sealed, seal
from secretfs.crypto.keys import LocalMasterKey, MasterKey, create_key_file, load_master_key
from secretfs.errors import (
    ConfigError,
    IntegrityError,
    StoreError,
    UnsafeKeyFile,
    WrongMasterKey,
)

AD = associated_data("db_password", 3)
WHAT = "version 3 of 'db_password'"


@pytest.fixture
def master() -> LocalMasterKey:
    return LocalMasterKey(os.urandom(32))


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# -- envelope ---------------------------------------------------------------------------------


def test_round_trip(master: LocalMasterKey) -> None:
    sealed = seal(master, b"s3cret value", AD)
    assert sealed.key_id == master.key_id
    assert len(sealed.nonce) == 12
    assert len(sealed.ciphertext) == len(b"s3cret value") + 16
    assert open_sealed(master, sealed, AD, what=WHAT) == b"s3cret value"


def test_round_trip_empty_value(master: LocalMasterKey) -> None:
    assert open_sealed(master, seal(master, b"", AD), AD, what=WHAT) == b""


def test_each_seal_has_a_fresh_data_key_and_nonce(master: LocalMasterKey) -> None:
    first = seal(master, b"same plaintext", AD)
    second = seal(master, b"same plaintext", AD)
    assert first.wrapped_key != second.wrapped_key
    assert first.nonce != second.nonce
    assert first.ciphertext != second.ciphertext


def test_associated_data_layout() -> None:
    assert associated_data("api_keys/stripe", 12) == b"secretfs/v1\x00api_keys/stripe\x0012"
    assert associated_data("a", 1) != associated_data("a", 11)
    assert associated_data("a", 11) != associated_data("a1", 1)
    with pytest.raises(ValueError):
        associated_data("a", 0)
    with pytest.raises(TypeError):
        associated_data("a", True)


@pytest.mark.parametrize(
    "other_slot",
    [associated_data("db_password", 2), associated_data("db_passwords", 3), b""],
)
def test_ciphertext_moved_to_another_slot_fails(master: LocalMasterKey, other_slot: bytes) -> None:
    sealed = seal(master, b"value", AD)
    with pytest.raises(IntegrityError) as info:
        open_sealed(master, sealed, other_slot, what=WHAT)
    assert "moved from another slot" in str(info.value)
    assert WHAT in str(info.value)


@pytest.mark.parametrize("index", [0, 5, -1])
def test_flipped_bit_in_ciphertext_fails(master: LocalMasterKey, index: int) -> None:
    sealed = seal(master, b"value that matters", AD)
    altered = SealedValue(
        sealed.key_id, sealed.wrapped_key, sealed.nonce, flip(sealed.ciphertext, index)
    )
    with pytest.raises(IntegrityError, match="failed authentication"):
        open_sealed(master, altered, AD, what=WHAT)


def test_flipped_bit_in_nonce_fails(master: LocalMasterKey) -> None:
    sealed = seal(master, b"value", AD)
    altered = SealedValue(
        sealed.key_id, sealed.wrapped_key, flip(sealed.nonce, 0), sealed.ciphertext
    )
    with pytest.raises(IntegrityError):
        open_sealed(master, altered, AD, what=WHAT)


@pytest.mark.parametrize("index", [0, 20, -1])
def test_flipped_bit_in_wrapped_key_fails(master: LocalMasterKey, index: int) -> None:
    sealed = seal(master, b"value", AD)
    altered = SealedValue(
        sealed.key_id, flip(sealed.wrapped_key, index), sealed.nonce, sealed.ciphertext
    )
    with pytest.raises(IntegrityError) as info:
        open_sealed(master, altered, AD, what=WHAT)
    assert str(info.value) == (
        f"store integrity error: the data key of {WHAT} failed authentication "
        "(the store was altered; restore it from a backup)"
    )


@pytest.mark.parametrize(
    "field, value",
    [("wrapped_key", b""), ("wrapped_key", b"x" * 13), ("nonce", b"n" * 8), ("ciphertext", b"c")],
)
def test_truncated_fields_fail_as_integrity_errors(
    master: LocalMasterKey, field: str, value: bytes
) -> None:
    sealed = seal(master, b"value", AD)
    parts = {
        "key_id": sealed.key_id,
        "wrapped_key": sealed.wrapped_key,
        "nonce": sealed.nonce,
        "ciphertext": sealed.ciphertext,
    }
    parts[field] = value
    with pytest.raises(IntegrityError):
        open_sealed(master, SealedValue(**parts), AD, what=WHAT)


def test_wrong_master_key_names_both_key_ids(master: LocalMasterKey) -> None:
    other = LocalMasterKey(os.urandom(32))
    sealed = seal(master, b"value", AD)
    with pytest.raises(WrongMasterKey) as info:
        open_sealed(other, sealed, AD, what=WHAT)
    message = str(info.value)
    assert master.key_id in message
    assert other.key_id in message
    assert WHAT in message
    assert "encryption.key_file" in message


def test_other_key_claiming_the_same_id_fails_as_integrity_error(master: LocalMasterKey) -> None:
    sealed = seal(LocalMasterKey(os.urandom(32)), b"value", AD)
    forged = SealedValue(master.key_id, sealed.wrapped_key, sealed.nonce, sealed.ciphertext)
    with pytest.raises(IntegrityError, match="data key"):
        open_sealed(master, forged, AD, what=WHAT)


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(min_size=8, max_size=512))
def test_ciphertext_and_reprs_reveal_nothing(plaintext: bytes) -> None:
    key = os.urandom(32)
    master = LocalMasterKey(key)
    sealed = seal(master, plaintext, AD)
    assert plaintext not in sealed.ciphertext
    assert plaintext not in sealed.wrapped_key
    for text in (repr(master), str(master), repr(sealed), str(sealed)):
        assert key.hex() not in text
        assert base64.b64encode(key).decode() not in text
        assert sealed.wrapped_key.hex() not in text
        assert repr(sealed.wrapped_key) not in text
        assert repr(sealed.ciphertext) not in text
        assert repr(plaintext) not in text
    assert master.key_id in repr(master)
    assert open_sealed(master, sealed, AD, what=WHAT) == plaintext


# -- LocalMasterKey ---------------------------------------------------------------------------


def test_key_id_is_stable_and_distinct() -> None:
    key = os.urandom(32)
    assert LocalMasterKey(key).key_id == LocalMasterKey(key).key_id
    assert LocalMasterKey(key).key_id != LocalMasterKey(os.urandom(32)).key_id
    key_id = LocalMasterKey(bytes(32)).key_id
    assert key_id.startswith("mk-") and len(key_id) == 3 + 16
    int(key_id[3:], 16)


def test_local_master_key_is_a_master_key(master: LocalMasterKey) -> None:
    assert isinstance(master, MasterKey)
    data_key = os.urandom(32)
    assert master.unwrap(master.wrap(data_key)) == data_key


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        LocalMasterKey(os.urandom(size))


def test_master_key_is_not_an_int_or_str() -> None:
    with pytest.raises(TypeError):
        LocalMasterKey(32)  # type: ignore[arg-type]  # bytes(32) would be an all-zero key
    with pytest.raises(TypeError):
        LocalMasterKey("k" * 32)  # type: ignore[arg-type]


def test_master_key_cannot_be_pickled(master: LocalMasterKey) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(master)


# -- providers: dispatch ----------------------------------------------------------------------


@pytest.mark.parametrize(("provider", "setting"),
                         [("openbao_transit", "key_name"), ("aws_kms", "key_id")])
def test_remote_providers_need_the_name_of_their_key(tmp_path: Path, provider: str,
                                                     setting: str) -> None:
    with pytest.raises(ConfigError, match=f"encryption.{setting}") as info:
        load_master_key(provider, tmp_path / "k", create=True)
    assert provider in str(info.value)


def test_unknown_provider_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown encryption provider 'vault'"):
        load_master_key("vault", tmp_path / "k", create=True)
    assert not (tmp_path / "k").exists()


# -- file provider ----------------------------------------------------------------------------


def test_missing_key_file_without_create(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    with pytest.raises(StoreError) as info:
        load_master_key("file", path, create=False)
    assert str(info.value) == (
        f"no master key at {path} (run 'secretfs init' to create the store and its key)"
    )
    assert not path.exists()


def test_key_file_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "master.key"
    old_umask = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        created = load_master_key("file", path, create=True)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert text.endswith("\n") and text.count("\n") == 1
    assert len(base64.b64decode(text, validate=False)) == 32
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.key"]  # no temp file left
    assert load_master_key("file", path, create=False).key_id == created.key_id
    assert load_master_key("file", path, create=True).key_id == created.key_id


def test_key_file_holds_the_key(tmp_path: Path) -> None:
    key = os.urandom(32)
    path = tmp_path / "master.key"
    path.write_text(base64.b64encode(key).decode() + "\n")
    path.chmod(0o600)
    assert load_master_key("file", path, create=False).key_id == LocalMasterKey(key).key_id


def test_existing_folder_mode_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    load_master_key("file", folder / "master.key", create=True)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755


def test_create_key_file_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    first = create_key_file(path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="already exists"):
        create_key_file(path)
    assert path.read_bytes() == before
    assert load_master_key("file", path, create=False).key_id == first.key_id


@pytest.mark.parametrize(
    "mode, how",
    [(0o640, "readable by others"), (0o604, "readable by others"), (0o620, "writable by others")],
)
def test_key_file_open_to_others_is_refused(tmp_path: Path, mode: int, how: str) -> None:
    path = tmp_path / "master.key"
    create_key_file(path)
    path.chmod(mode)
    with pytest.raises(UnsafeKeyFile) as info:
        load_master_key("file", path, create=True)
    assert info.value.what == f"key file {path} is {how} (mode {mode:04o})"
    assert info.value.fix == f"run: chmod 600 {path}"
    path.chmod(0o600)
    load_master_key("file", path, create=False)


def test_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real.key"
    create_key_file(target)
    link = tmp_path / "master.key"
    link.symlink_to(target)
    with pytest.raises(UnsafeKeyFile, match="symbolic link"):
        load_master_key("file", link, create=False)
    with pytest.raises(UnsafeKeyFile, match="symbolic link"):
        load_master_key("file", link, create=True)


def test_dangling_symlink_is_not_followed_on_create(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.key"
    link = tmp_path / "master.key"
    link.symlink_to(target)
    with pytest.raises(UnsafeKeyFile):
        load_master_key("file", link, create=True)
    assert not target.exists()


def test_key_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "master.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(UnsafeKeyFile, match="not a regular file"):
        load_master_key("file", folder, create=True)
    fifo = tmp_path / "fifo.key"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UnsafeKeyFile, match="not a regular file"):  # and does not hang
        load_master_key("file", fifo, create=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file away")
def test_key_file_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    create_key_file(path)
    os.chown(path, 65534, -1)
    with pytest.raises(UnsafeKeyFile, match="owned by uid 65534") as info:
        load_master_key("file", path, create=False)
    assert "chown" in str(info.value)


@pytest.mark.parametrize(
    "content", [b"", b"not base64!\n", base64.b64encode(os.urandom(16)) + b"\n", b"x" * 5000]
)
def test_key_file_without_a_key_is_a_store_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "master.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(StoreError) as info:
        load_master_key("file", path, create=True)
    assert str(path) in str(info.value)
    assert type(info.value) is StoreError
    if content:
        assert content.strip().decode()[:20] not in str(info.value)
    assert path.read_bytes() == content  # never replaced by a new key


def _create_and_report(path: str, barrier: multiprocessing.synchronize.Barrier, out) -> None:
    barrier.wait()
    out.put(load_master_key("file", Path(path), create=True).key_id)


@pytest.mark.parametrize("round_", range(3))
def test_concurrent_creation_ends_with_one_key(tmp_path: Path, round_: int) -> None:
    path = tmp_path / "store" / "master.key"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    out = ctx.Queue()
    workers = [
        ctx.Process(target=_create_and_report, args=(str(path), barrier, out)) for _ in range(8)
    ]
    for worker in workers:
        worker.start()
    key_ids = [out.get(timeout=30) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    assert len(set(key_ids)) == 1
    assert load_master_key("file", path, create=False).key_id == key_ids[0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["master.key"]


def test_creation_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / "master.key"
    created = load_master_key("file", path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.key"]
    assert load_master_key("file", path, create=True).key_id == created.key_id


# -- passphrase provider ----------------------------------------------------------------------


def test_passphrase_same_gives_same_key_different_gives_different(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kdf.json"
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "correct horse battery staple")
    created = load_master_key("passphrase", path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_master_key("passphrase", path, create=False).key_id == created.key_id
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "correct horse battery stapler")
    assert load_master_key("passphrase", path, create=False).key_id != created.key_id


def test_passphrase_file_holds_only_scrypt_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kdf.json"
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "pw")
    load_master_key("passphrase", path, create=True)
    params = json.loads(path.read_text())
    assert set(params) == {"kdf", "n", "r", "p", "salt"}
    assert (params["kdf"], params["n"], params["r"], params["p"]) == ("scrypt", 32768, 8, 1)
    assert len(base64.b64decode(params["salt"])) == 16


def test_passphrase_key_is_scrypt_of_passphrase(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    salt = os.urandom(16)
    path = tmp_path / "kdf.json"
    params = {"kdf": "scrypt", "n": 1024, "r": 8, "p": 1, "salt": base64.b64encode(salt).decode()}
    path.write_text(json.dumps(params))
    path.chmod(0o600)
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "pw")
    expected = Scrypt(salt=salt, length=32, n=1024, r=8, p=1).derive(b"pw")
    key_id = load_master_key("passphrase", path, create=False).key_id
    assert key_id == LocalMasterKey(expected).key_id


def test_two_stores_with_one_passphrase_get_different_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "pw")
    one = load_master_key("passphrase", tmp_path / "a.json", create=True)
    two = load_master_key("passphrase", tmp_path / "b.json", create=True)
    assert one.key_id != two.key_id  # a fresh salt each


def test_no_passphrase_and_no_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SECRETFS_PASSPHRASE", raising=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    with pytest.raises(StoreError) as info:
        load_master_key("passphrase", tmp_path / "kdf.json", create=True)
    assert str(info.value) == "no passphrase given (set SECRETFS_PASSPHRASE or run on a terminal)"
    assert not (tmp_path / "kdf.json").exists()


def test_empty_passphrase_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "")
    with pytest.raises(StoreError, match="empty"):
        load_master_key("passphrase", tmp_path / "kdf.json", create=True)
    assert not (tmp_path / "kdf.json").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _answers(monkeypatch: pytest.MonkeyPatch, *answers: str) -> list[str]:
    import getpass

    prompts: list[str] = []
    replies = iter(answers)

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return next(replies)

    monkeypatch.delenv("SECRETFS_PASSPHRASE", raising=False)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    return prompts


def test_terminal_prompt_asks_twice_on_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kdf.json"
    prompts = _answers(monkeypatch, "typed", "typed", "typed")
    created = load_master_key("passphrase", path, create=True)
    assert len(prompts) == 2
    assert load_master_key("passphrase", path, create=False).key_id == created.key_id
    assert len(prompts) == 3
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "typed")
    assert load_master_key("passphrase", path, create=False).key_id == created.key_id


@pytest.mark.parametrize("answers", [("one", "two"), ("", "")])
def test_terminal_prompt_refuses_mismatch_and_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: tuple[str, str]
) -> None:
    _answers(monkeypatch, *answers)
    with pytest.raises(StoreError):
        load_master_key("passphrase", tmp_path / "kdf.json", create=True)
    assert not (tmp_path / "kdf.json").exists()


def test_passphrase_file_permissions_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "kdf.json"
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "pw")
    load_master_key("passphrase", path, create=True)
    path.chmod(0o644)
    with pytest.raises(UnsafeKeyFile, match="chmod 600"):
        load_master_key("passphrase", path, create=False)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        '{"kdf": "argon2", "n": 1024, "r": 8, "p": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="}',
        '{"kdf": "scrypt", "n": 1000, "r": 8, "p": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="}',
        '{"kdf": "scrypt", "n": 1024, "r": 8, "p": 1, "salt": "AAAA"}',
        '{"kdf": "scrypt", "n": 1024, "r": "8", "p": 1, "salt": "AAAAAAAAAAAAAAAAAAAAAA=="}',
    ],
)
def test_bad_passphrase_file_is_a_store_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    path = tmp_path / "kdf.json"
    path.write_text(content)
    path.chmod(0o600)
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "pw")
    with pytest.raises(StoreError, match="not a valid passphrase parameters file") as info:
        load_master_key("passphrase", path, create=True)
    assert str(path) in str(info.value)
    assert path.read_text() == content


def test_missing_passphrase_file_without_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SECRETFS_PASSPHRASE", "pw")
    with pytest.raises(StoreError, match="no master key at"):
        load_master_key("passphrase", tmp_path / "kdf.json", create=False)


# -- keyring provider -------------------------------------------------------------------------


class _TmpKeyring(PlaintextKeyring):
    """keyrings.alt's plaintext file keyring, kept in the test's folder."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    @property
    def file_path(self) -> str:  # type: ignore[override]
        return str(self._path)


@pytest.fixture
def tmp_keyring(tmp_path: Path):
    previous = keyring.get_keyring()
    backend = _TmpKeyring(tmp_path / "keyring" / "keyring_pass.cfg")
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def test_keyring_round_trip(tmp_path: Path, tmp_keyring: _TmpKeyring) -> None:
    key_file = tmp_path / "store" / "master.key"
    with pytest.raises(StoreError, match="no master key at"):
        load_master_key("keyring", key_file, create=False)
    created = load_master_key("keyring", key_file, create=True)
    assert load_master_key("keyring", key_file, create=False).key_id == created.key_id
    assert load_master_key("keyring", key_file, create=True).key_id == created.key_id
    assert not key_file.exists()  # the path only names the entry
    stored = tmp_keyring.get_password("secretfs", "master-key:" + str(key_file.resolve()))
    assert stored is not None
    assert LocalMasterKey(base64.b64decode(stored)).key_id == created.key_id
    other = load_master_key("keyring", tmp_path / "other.key", create=True)
    assert other.key_id != created.key_id


def test_keyring_entry_without_a_key(tmp_path: Path, tmp_keyring: _TmpKeyring) -> None:
    key_file = tmp_path / "master.key"
    tmp_keyring.set_password("secretfs", "master-key:" + str(key_file.resolve()), "garbage")
    with pytest.raises(StoreError, match="does not hold a master key") as info:
        load_master_key("keyring", key_file, create=True)
    assert "garbage" not in str(info.value)


def test_keyring_backend_failure_names_the_backend(tmp_path: Path) -> None:
    previous = keyring.get_keyring()
    keyring.set_keyring(keyring.backends.fail.Keyring())
    try:
        with pytest.raises(StoreError) as info:
            load_master_key("keyring", tmp_path / "master.key", create=True)
    finally:
        keyring.set_keyring(previous)
    assert type(info.value) is StoreError
    assert "keyring" in info.value.what
    assert "fail Keyring" in info.value.what
    assert "encryption.provider" in (info.value.fix or "")


# -- import cost ------------------------------------------------------------------------------


def test_import_pulls_in_no_provider_machinery() -> None:
    code = (
        "import sys, secretfs.crypto.envelope, secretfs.crypto.keys\n"
        "heavy = ['keyring', 'getpass', 'json', 'hashlib',"
        " 'cryptography.hazmat.primitives.kdf.scrypt', 'cryptography.hazmat.primitives.hashes']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


def test_derived_keys_are_stable_per_purpose_and_independent() -> None:
    key = LocalMasterKey(os.urandom(32))
    audit = key.derive_key(b"audit log v1")
    assert len(audit) == 32 and audit == key.derive_key(b"audit log v1")
    assert audit != key.derive_key(b"something else")
    assert audit != LocalMasterKey(os.urandom(32)).derive_key(b"audit log v1")
