"""The manager: the seed's async API on trio, and the one door every operation goes through."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
import trio

from secretfs.access import Caller, Decision
from secretfs.backends.local import LocalBackend
from secretfs.crypto.keys import LocalMasterKey
from secretfs.errors import AccessDenied, KeyNotFound, SecretNotFound, VersionNotFound
from secretfs.manager import SecretsManager, SyncSecretsManager
from secretfs.model import Label, RotationPolicy, Secret, SecretRef


@pytest.fixture
def sync(tmp_path: Path) -> SyncSecretsManager:
    key = LocalMasterKey(secrets.token_bytes(32))
    manager = SyncSecretsManager(LocalBackend.open(tmp_path / "store.db", key, create=True))
    yield manager
    manager.close()


@pytest.fixture
def manager(sync: SyncSecretsManager) -> SecretsManager:
    return SecretsManager(sync)


async def test_the_seeds_store_get_delete(manager: SecretsManager) -> None:
    value = secrets.token_hex(16)
    version = await manager.store(Secret(
        name="db_password", value=value, description="Database password",
        tags={"environment": "production", "service": "database"},
        rotation=RotationPolicy(interval=90 * 86400.0),
    ))
    assert version == 1
    secret = await manager.get("db_password")
    assert (secret.text(), secret.version, secret.description) == (value, 1, "Database password")
    assert secret.rotation == RotationPolicy(interval=90 * 86400.0)
    assert [m.name for m in await manager.list()] == ["db_password"]
    await manager.delete("db_password")
    with pytest.raises(SecretNotFound):
        await manager.get("db_password")


async def test_resolve_references_and_resolvers(manager: SecretsManager) -> None:
    user, password = "app", secrets.token_hex(8)
    await manager.store(Secret("db", {"user": user, "password": password}))
    ref = SecretRef("db").with_version(Label.CURRENT).with_key("password")
    assert await manager.resolve(ref) == password.encode()
    assert await manager.resolve("secretfs://db/1/user") == b"app"

    async def dsn(secrets_manager: SecretsManager) -> str:
        login = await secrets_manager.resolve("db/latest/user")
        secret = await secrets_manager.resolve("db/latest/password")
        return f"postgres://{login.decode()}:{secret.decode()}@db/app"

    derived = SecretRef("db").with_resolver(dsn)
    assert await manager.resolve(derived) == f"postgres://app:{password}@db/app".encode()


async def test_validate_checks_without_decrypting(manager: SecretsManager) -> None:
    await manager.store(Secret("db", {"user": "app"}))
    info = await manager.validate("db/latest/user")
    assert info.version == 1 and info.keys == ("user",)
    with pytest.raises(KeyNotFound):
        await manager.validate("db/latest/password")
    with pytest.raises(VersionNotFound, match="has no previous version"):
        await manager.validate("db/previous")


async def test_concurrent_calls_run_in_worker_threads(manager: SecretsManager) -> None:
    values = {f"s{i}": secrets.token_hex(8) for i in range(20)}
    async with trio.open_nursery() as nursery:
        for name, value in values.items():
            nursery.start_soon(manager.store, Secret(name, value))
    results: dict[str, str] = {}

    async def read(name: str) -> None:
        results[name] = (await manager.get(name)).text()

    async with trio.open_nursery() as nursery:
        for name in values:
            nursery.start_soon(read, name)
    assert results == values


class DenyWrites:
    """A policy that allows reading and listing only (stands in for the policies of access/)."""

    def check(self, caller: Caller | None, action: str, resource: str) -> Decision:
        allowed = action in ("read", "list")
        return Decision(allowed, "reader", "rule: allow read, list" if allowed else "no rule")


class Recorded:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, bool, dict[str, Any]]] = []

    def record(self, event: str, *, caller: Caller | None, resource: str, decision: Decision,
               **fields: Any) -> None:
        self.events.append((event, resource, decision.allowed, fields))


def test_every_operation_passes_the_door(sync: SyncSecretsManager) -> None:
    sync.store(Secret("db", "v"))
    audit = Recorded()
    guarded = SyncSecretsManager(sync.backend, access=DenyWrites(), audit=audit)
    assert guarded.read("db") == b"v"
    with pytest.raises(AccessDenied) as caught:
        guarded.store(Secret("db", "new"))
    assert caught.value.exit_code == 4 and "reader may not write 'db'" in str(caught.value)
    with pytest.raises(AccessDenied):
        guarded.delete("db")
    assert [(e, r, ok) for e, r, ok, _ in audit.events] == [
        ("read", "db", True), ("denied", "db", False), ("denied", "db", False)]
    assert sync.read("db") == b"v"  # nothing changed


async def test_the_seeds_apply_policy_and_check_access(manager: SecretsManager) -> None:
    from secretfs.access.policy import AccessPolicy

    policy = (AccessPolicy().with_allow("read", "db_password").with_allow("write", "api_keys/*")
              .with_deny("delete", "*"))
    await manager.apply_policy("service-a", policy)
    assert await manager.check_access("service-a", "read", "db_password")
    assert await manager.check_access("service-a", "write", "api_keys/stripe")
    assert not await manager.check_access("service-a", "delete", "db_password")
    assert not await manager.check_access("service-a", "read", "other")
    assert not await manager.check_access("service-b", "read", "db_password")
