"""Envelope encryption of one stored value.

Each call to :func:`seal` makes a fresh random 256-bit data key, encrypts the value with
AES-256-GCM under it, and wraps the data key with the master key. The master key therefore only
ever encrypts 32 random bytes, a leaked data key exposes one version of one secret, and rotating
the master key means re-wrapping data keys without touching ciphertexts.

The associated data binds a ciphertext to its slot (name and version, see
:func:`associated_data`): a ciphertext copied to another slot of the store fails to decrypt
instead of handing out the wrong secret.

This module imports only the AES-GCM part of ``cryptography`` so that one-shot commands start fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from secretfs.errors import IntegrityError, WrongMasterKey

if TYPE_CHECKING:
    from secretfs.crypto.keys import MasterKey

__all__ = ["SealedValue", "associated_data", "open_sealed", "seal"]

DATA_KEY_SIZE = 32  # AES-256
NONCE_SIZE = 12  # the GCM nonce size that needs no extra hashing
TAG_SIZE = 16
_AD_PREFIX = b"secretfs/v1\x00"


@dataclass(frozen=True, slots=True)
class SealedValue:
    """One encrypted value as it is stored: nothing here is secret without the master key.

    The repr shows sizes only, so a sealed value in a log line or traceback leaks no bytes.
    """

    key_id: str
    """The id of the master key that wrapped ``wrapped_key``."""
    wrapped_key: bytes
    """The per-version 256-bit data key, wrapped with RFC 3394 AES key wrap."""
    nonce: bytes
    """12 random bytes."""
    ciphertext: bytes
    """The AES-256-GCM output: ciphertext followed by the 16-byte tag."""

    def __repr__(self) -> str:
        return (
            f"SealedValue(key_id={self.key_id!r}, wrapped_key=<{len(self.wrapped_key)} bytes>, "
            f"nonce=<{len(self.nonce)} bytes>, ciphertext=<{len(self.ciphertext)} bytes>)"
        )


def associated_data(name: str, version: int) -> bytes:
    """The AEAD associated data of version ``version`` of secret ``name``.

    The NUL separators keep the encoding unambiguous (a version is digits only), and the prefix
    names the format so that a later scheme can never be confused with this one.
    """
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError("version must be an int")
    if version < 1:
        raise ValueError("versions start at 1")
    return _AD_PREFIX + name.encode() + b"\x00" + str(version).encode()


def seal(master: MasterKey, plaintext: bytes, associated_data: bytes) -> SealedValue:
    """Encrypt ``plaintext`` under a new data key, and wrap that key with ``master``.

    The data key exists only for the duration of this call. A random nonce under a key used once
    cannot repeat, so there is no nonce state to keep.
    """
    data_key = AESGCM.generate_key(bit_length=DATA_KEY_SIZE * 8)
    nonce = os.urandom(NONCE_SIZE)
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, associated_data)
    return SealedValue(
        key_id=master.key_id,
        wrapped_key=master.wrap(data_key),
        nonce=nonce,
        ciphertext=ciphertext,
    )


def open_sealed(
    master: MasterKey, sealed: SealedValue, associated_data: bytes, *, what: str
) -> bytes:
    """Decrypt ``sealed``, checking that it belongs to the slot named by ``associated_data``.

    ``what`` names the slot in error messages, e.g. ``"version 3 of 'db_password'"``.

    Raises :class:`~secretfs.errors.WrongMasterKey` when another master key sealed the value (so
    a misconfigured key is not reported as corruption), and
    :class:`~secretfs.errors.IntegrityError` when the wrapped key or the ciphertext was altered,
    or the ciphertext was moved from another slot.
    """
    if sealed.key_id != master.key_id:
        raise WrongMasterKey(
            f"{what} is sealed by master key '{sealed.key_id}', "
            f"but the configured master key is '{master.key_id}'",
            "point encryption.key_file (or the provider) at the key that created this store",
        )
    try:
        data_key = master.unwrap(sealed.wrapped_key)
    except IntegrityError:
        data_key = b""
    if len(data_key) != DATA_KEY_SIZE:
        raise IntegrityError(
            f"store integrity error: the data key of {what} failed authentication",
            "the store was altered; restore it from a backup",
        )
    try:
        if len(sealed.nonce) != NONCE_SIZE or len(sealed.ciphertext) < TAG_SIZE:
            raise InvalidTag
        return AESGCM(data_key).decrypt(sealed.nonce, sealed.ciphertext, associated_data)
    except InvalidTag:
        raise IntegrityError(
            f"store integrity error: {what} failed authentication "
            "(its ciphertext was altered or moved from another slot)",
            "restore the store from a backup",
        ) from None
