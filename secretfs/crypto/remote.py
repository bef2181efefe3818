"""Master keys that never leave a key service: OpenBao's Transit engine, or AWS KMS.

With ``encryption.provider: openbao_transit`` (``key_name``) or ``aws_kms`` (``key_id``), the
store's data keys are wrapped and unwrapped by the service: the store holds only wrapped keys,
and whoever copies it (and the key file beside it) without access to the service reads nothing.
Revoking the service key — deleting it in Transit, disabling it in KMS — makes every value
unreadable at once.

The audit log needs a MAC key derived from the master key (``derive_key``), which a remote key
cannot give. So a random *root key* is made once, wrapped by the service, and kept (wrapped) in
``encryption.key_file``; it is unwrapped on first use, in memory only. It protects the audit
log's integrity, never a secret's confidentiality.

Where the service is: for Transit, ``$BAO_ADDR`` (or ``$VAULT_ADDR``) with the token in
``$BAO_TOKEN``/``$VAULT_TOKEN`` or ``~/.vault-token``, the Transit mount ``transit``; for KMS,
boto3's usual configuration (``AWS_REGION``, credentials, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from secretfs.errors import BackendUnavailable, StoreError

ROOT_KEY_SIZE = 32


class RemoteKey:
    """A :class:`~secretfs.crypto.keys.MasterKey` whose wrap/unwrap are calls to a service."""

    def __init__(self, key_id: str, encrypt: Callable[[bytes], bytes],
                 decrypt: Callable[[bytes], bytes], root_file: Path, *, create: bool) -> None:
        self.key_id = key_id
        self._encrypt, self._decrypt = encrypt, decrypt
        self._root_file = Path(root_file)
        self._root: bytes | None = None
        if create:
            self._root_key(create=True)

    def wrap(self, data_key: bytes) -> bytes:
        return self._encrypt(data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        return self._decrypt(wrapped)

    def _root_key(self, *, create: bool = False) -> bytes:
        from secretfs.crypto.keys import _create_private_file, _read_private_file

        if self._root is None:
            wrapped = _read_private_file(self._root_file)
            if wrapped is None:
                if not create:
                    raise StoreError(f"no wrapped root key at {self._root_file}",
                                     "run 'secretfs init' to create it")
                _create_private_file(self._root_file, self._encrypt(os.urandom(ROOT_KEY_SIZE)))
                wrapped = _read_private_file(self._root_file)
            assert wrapped is not None
            self._root = self._decrypt(wrapped)
        return self._root

    def derive_key(self, purpose: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"secretfs/" + purpose).derive(self._root_key())

    def __repr__(self) -> str:
        return f"RemoteKey(key_id={self.key_id!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a master key cannot be pickled")


# -- OpenBao / Vault Transit ----------------------------------------------------------------------


def _bao_token() -> str | None:
    for variable in ("BAO_TOKEN", "VAULT_TOKEN"):
        if os.environ.get(variable):
            return os.environ[variable]
    path = Path.home() / ".vault-token"
    return path.read_text().strip() if path.exists() else None


def transit_key(key_name: str, root_file: Path, *, create: bool,
                address: str | None = None, token: str | None = None,
                mount: str = "transit") -> RemoteKey:
    """A master key in OpenBao's (or Vault's) Transit engine, named *key_name*."""
    from secretfs.backends.http import HttpClient, TransportError

    address = (address or os.environ.get("BAO_ADDR") or os.environ.get("VAULT_ADDR")
               or "http://127.0.0.1:8200").rstrip("/")
    client = HttpClient(headers={"X-Vault-Token": token or _bao_token() or ""}, timeout=10.0,
                        ca_file=os.environ.get("BAO_CACERT") or os.environ.get("VAULT_CACERT"))
    where = f"Transit key '{key_name}' at {address}"

    def call(operation: str, body: dict[str, str]) -> dict[str, Any]:
        try:
            response = client.request("POST", f"{address}/v1/{mount}/{operation}/{key_name}",
                                      json=body)
        except TransportError as error:
            raise BackendUnavailable(f"cannot reach {where}: {error}",
                                     "check that OpenBao runs and BAO_ADDR points at it") from None
        if response.status_code >= 400:
            try:
                detail = "; ".join(response.json().get("errors", []))[:200]
            except ValueError:
                detail = f"HTTP {response.status_code}"
            raise StoreError(f"{where} cannot {operation}: {detail}",
                             "the master key must exist in Transit and the token may use it")
        return response.json()["data"]

    def encrypt(plaintext: bytes) -> bytes:
        data = call("encrypt", {"plaintext": base64.b64encode(plaintext).decode()})
        return data["ciphertext"].encode()

    def decrypt(wrapped: bytes) -> bytes:
        data = call("decrypt", {"ciphertext": wrapped.decode()})
        return base64.b64decode(data["plaintext"])

    return RemoteKey(f"transit:{key_name}", encrypt, decrypt, root_file, create=create)


# -- AWS KMS --------------------------------------------------------------------------------------


def kms_key(key_id: str, root_file: Path, *, create: bool, client: Any = None) -> RemoteKey:
    """A master key in AWS KMS (*key_id*: an id, ARN or ``alias/…``)."""
    if client is None:
        import boto3

        client = boto3.client("kms")
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"KMS key '{key_id}'"

    def call(function: Callable[..., dict[str, Any]], **arguments: Any) -> dict[str, Any]:
        try:
            return function(KeyId=key_id, **arguments)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "error")
            raise StoreError(f"{where} refused: {code}",
                             "the key must exist, be enabled, and allow this identity") from None
        except BotoCoreError as error:
            raise BackendUnavailable(f"cannot reach {where}: {type(error).__name__}",
                                     "check the region, the endpoint and the network") from None

    def encrypt(plaintext: bytes) -> bytes:
        return call(client.encrypt, Plaintext=plaintext)["CiphertextBlob"]

    def decrypt(wrapped: bytes) -> bytes:
        return call(client.decrypt, CiphertextBlob=wrapped)["Plaintext"]

    return RemoteKey(f"kms:{key_id}", encrypt, decrypt, root_file, create=create)


__all__ = ["RemoteKey", "kms_key", "transit_key"]
