"""The OpenBao backend against a real dev server (tests/openbao.py). Values are never printed."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretfs.backends.base import MetadataUpdate
from secretfs.backends.openbao import OpenBaoBackend, decode_kv, encode_kv, open_openbao
from secretfs.config import parse_config
from secretfs.errors import BackendUnavailable, ConflictError, SecretNotFound, VersionNotFound
from secretfs.model import Label, RotationState, RotationStep
from secretfs.testing.backend_conformance import BackendConformance
from tests.openbao import OpenBaoServer, free_port, openbao, requires_openbao, running_openbao

pytestmark = requires_openbao
__all__ = ["openbao"]  # the fixture, re-exported for pytest


def fresh_mount(server: OpenBaoServer) -> str:
    mount = "kv-" + secrets.token_hex(4)
    server.api("POST", f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "2"}})
    return mount


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    with running_openbao(tmp_path_factory.mktemp("openbao")) as server:
        yield server


class TestOpenBaoConformance(BackendConformance):
    @pytest.fixture
    def backend(self, shared_server: OpenBaoServer) -> Iterator[OpenBaoBackend]:
        backend = OpenBaoBackend(shared_server.address, mount=fresh_mount(shared_server),
                                 token=shared_server.root_token)
        yield backend
        backend.close()


@pytest.fixture
def backend(openbao: OpenBaoServer) -> Iterator[OpenBaoBackend]:
    backend = OpenBaoBackend(openbao.address, token=openbao.root_token, max_versions=3)
    yield backend
    backend.close()


def test_value_encoding() -> None:
    assert encode_kv(b"abc") == {"__secretfs": "text", "value": "abc"}
    assert decode_kv(encode_kv(b"\xff\x00")) == b"\xff\x00"
    assert list(decode_kv(encode_kv({"user": "a", "password": "b"}))) == ["user", "password"]
    assert encode_kv({"a": "1", "b": "2"}) == {"a": "1", "b": "2"}  # sorted: no marker
    assert decode_kv({"value": "x"}) == {"value": "x"}  # other tools: a map
    assert decode_kv({"n": 3}) == {"n": "3"}


def test_round_trips_and_cli_view(backend: OpenBaoBackend, openbao: OpenBaoServer) -> None:
    value = secrets.token_bytes(32)
    assert backend.write_version("bin", value) == 1
    assert backend.read_value("bin", 1) == value
    backend.write_version("db", {"user": "app", "password": "pw-" + secrets.token_hex(8)})
    shown = openbao.api("GET", "secret/data/db").json()["data"]["data"]
    assert shown["user"] == "app" and "__secretfs" in shown  # readable, order kept aside
    info = backend.read_metadata("db").version_info(1)
    assert info is not None and info.is_map and info.keys == ("user", "password")


def test_secret_written_by_bao_cli(backend: OpenBaoBackend, openbao: OpenBaoServer) -> None:
    openbao.bao("kv", "put", "secret/ext", "password=one")
    openbao.bao("kv", "put", "secret/ext", "password=two", "user=app")
    metadata = backend.read_metadata("ext")
    assert metadata.labels == {Label.CURRENT: 2, Label.PREVIOUS: 1}
    assert backend.read_value("ext", 2) == {"password": "two", "user": "app"}
    assert metadata.version_info(2).keys == ("password", "user")
    backend.write_version("ext", {"password": "three"})
    assert backend.read_metadata("ext").labels == {Label.CURRENT: 3, Label.PREVIOUS: 2}
    openbao.bao("kv", "put", "secret/ext", "password=four")  # an outside write after ours
    assert backend.read_metadata("ext").labels == {Label.CURRENT: 4, Label.PREVIOUS: 3}
    assert backend.list_names() == ["ext"]


def test_pending_keeps_current_and_outside_writes(backend: OpenBaoBackend) -> None:
    backend.write_version("db", b"one")
    pending = backend.write_version("db", b"two", label=Label.PENDING)
    assert backend.read_metadata("db").labels == {Label.CURRENT: 1, Label.PENDING: pending}
    with pytest.raises(ConflictError):
        backend.write_version("db", b"three", label=Label.PENDING)
    with pytest.raises(ConflictError):
        backend.update_labels("db", {Label.CURRENT: pending}, expect={Label.CURRENT: 2})
    backend.update_labels("db", {Label.CURRENT: pending, Label.PREVIOUS: 1, Label.PENDING: None},
                          expect={Label.CURRENT: 1, Label.PENDING: pending})
    assert backend.read_metadata("db").labels == {Label.CURRENT: 2, Label.PREVIOUS: 1}


def test_max_versions_keep_labelled(backend: OpenBaoBackend) -> None:
    backend.write_version("db", b"v1")
    for index in range(6):  # pending versions written and abandoned: current stays 1
        version = backend.write_version("db", b"p%d" % index, label=Label.PENDING)
        backend.update_labels("db", {Label.PENDING: None})
    metadata = backend.read_metadata("db")
    assert [v.version for v in metadata.versions] == [1, version - 2, version - 1, version]
    assert backend.read_value("db", 1) == b"v1"
    with pytest.raises(VersionNotFound):
        backend.read_value("db", 2)


def test_delete_undelete_destroy_and_folders(backend: OpenBaoBackend,
                                             openbao: OpenBaoServer) -> None:
    backend.write_version("app/db/password", b"x")
    backend.write_version("app/api", b"y")
    backend.write_version("other", b"z")
    assert backend.list_names("app/") == ["app/api", "app/db/password"]
    backend.delete("app/api")
    assert openbao.api("GET", "secret/data/app/api", check=False).status_code == 404
    assert backend.list_names() == ["app/db/password", "other"]
    backend.undelete("app/api")
    assert backend.read_value("app/api", 1) == b"y"
    backend.destroy("app/api")
    with pytest.raises(SecretNotFound):
        backend.read_metadata("app/api")


def test_rotation_state_and_metadata(backend: OpenBaoBackend) -> None:
    long_description = "é" * 700  # over one custom_metadata value: split in pieces
    backend.write_version("db", b"x", metadata=MetadataUpdate(
        description=long_description, tags={"env": "prod", "empty": ""}))
    state = RotationState(2, RotationStep.APPLYING, "host:1", 1.5, 2.5)
    backend.set_rotation_state("db", state)
    assert backend.rotation_state("db") == state
    metadata = backend.read_metadata("db")
    assert metadata.description == long_description
    assert dict(metadata.tags) == {"empty": "", "env": "prod"}
    backend.set_rotation_state("db", None)
    assert backend.rotation_state("db") is None


def test_approle_token_expiry_never_fails_a_read(openbao: OpenBaoServer, tmp_path: Path
                                                  ) -> None:
    secret_id_file = tmp_path / "secret-id"
    role_id = openbao.create_role("secretfs", secret_id_file, token_ttl="3s",
                                  token_max_ttl="6s")
    backend = OpenBaoBackend(openbao.address, approle={"role_id": role_id,
                                                       "secret_id_file": secret_id_file})
    try:
        backend.write_version("db", b"value")
        deadline, reads = time.monotonic() + 8, 0
        while time.monotonic() < deadline:
            assert backend.read_value("db", 1) == b"value"
            reads += 1
            time.sleep(0.2 if reads % 10 else 3.5)  # also idle across a whole TTL once
        assert reads > 10
    finally:
        backend.close()


def test_token_file_replaced(openbao: OpenBaoServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(openbao.create_token(ttl="1h") + "\n")
    config = parse_config(
        "secrets_manager:\n  backend:\n    type: openbao\n"
        f"    address: {openbao.address}\n    token_file: {token_file}\n")
    backend = open_openbao(config)
    try:
        backend.write_version("db", b"x")
        old = token_file.read_text().strip()
        token_file.write_text(openbao.create_token(ttl="1h"))
        openbao.api("POST", "auth/token/revoke", {"token": old})
        assert backend.read_value("db", 1) == b"x"  # re-read the file on 403, retried
    finally:
        backend.close()


def test_tls_is_verified_against_ca_file(tmp_path: Path) -> None:
    with running_openbao(tmp_path, tls=True) as server:
        value = secrets.token_bytes(16)
        trusting = OpenBaoBackend(server.address, token=server.root_token,
                                  ca_file=server.ca_file)
        trusting.write_version("tls/one", value)
        assert trusting.read_value("tls/one", 1) == value
        trusting.close()
        # the dev server's CA is in no trust store: without ca_file the server is not believed
        untrusting = OpenBaoBackend(server.address, token=server.root_token)
        with pytest.raises(BackendUnavailable, match=r"certificate of .* is not trusted"):
            untrusting.read_value("tls/one", 1)
        untrusting.close()


def test_first_address_dead(openbao: OpenBaoServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    backend = OpenBaoBackend((dead, openbao.address), token=openbao.root_token)
    try:
        backend.write_version("db", b"x")
        assert backend.read_value("db", 1) == b"x"
    finally:
        backend.close()


def test_outage(openbao: OpenBaoServer) -> None:
    backend = OpenBaoBackend(openbao.address, token=openbao.root_token, timeout=2)
    try:
        backend.write_version("db", b"x")
        openbao.stop()
        with pytest.raises(BackendUnavailable) as caught:
            backend.read_value("db", 1)
        assert caught.value.exit_code == 5 and openbao.address in str(caught.value)
        openbao.start()  # a dev server comes back empty: write again
        backend.write_version("db", b"y")
        assert backend.read_value("db", 1) == b"y"
    finally:
        backend.close()


def test_concurrent_pending_writers_one_wins(backend: OpenBaoBackend) -> None:
    backend.write_version("db", b"x")
    outcomes: list[str] = []

    def rotate() -> None:
        try:
            backend.write_version("db", secrets.token_bytes(8), label=Label.PENDING)
            outcomes.append("won")
        except ConflictError:
            outcomes.append("conflict")

    threads = [threading.Thread(target=rotate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["won"]
    assert backend.read_metadata("db").labels[Label.CURRENT] == 1


class Counted:
    """Counts the HTTP requests a backend sends, by path (without /v1/ and the query)."""

    def __init__(self, backend: OpenBaoBackend) -> None:
        self.paths: list[str] = []
        request = backend._client.request

        def counted(method: str, url: str, **options: object) -> object:
            self.paths.append(url.split("/v1/", 1)[1].split("?")[0])
            return request(method, url, **options)
        backend._client.request = counted  # type: ignore[method-assign]


def fingerprints(backend: OpenBaoBackend, prefix: str = "") -> dict[str, bytes] | None:
    scanned = backend.scan_metadata(prefix)
    return None if scanned is None else {name: entry.fingerprint
                                         for name, entry in scanned.items()}


def test_fingerprints_cost_a_request_per_folder_and_follow_every_change(
        backend: OpenBaoBackend, openbao: OpenBaoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import secretfs.backends.openbao as module

    for name in ("app/a", "app/b", "app/sub/c", "top"):
        backend.write_version(name, secrets.token_bytes(8))
    counted = Counted(backend)
    prints = fingerprints(backend)
    assert prints is not None and set(prints) == {"app/a", "app/b", "app/sub/c", "top"}
    assert sorted(counted.paths) == ["secret/detailed-metadata/",
                                     "secret/detailed-metadata/app/",
                                     "secret/detailed-metadata/app/sub/"]
    assert set(backend.scan_metadata("app/") or {}) == {"app/a", "app/b", "app/sub/c"}
    monkeypatch.setattr(module, "LIST_PAGE", 1)  # a page per name: the same answer
    assert fingerprints(backend) == prints
    monkeypatch.undo()

    def changed_by(change: object) -> set[str]:
        before = fingerprints(backend) or {}
        after = fingerprints(backend) or {}
        assert after == before  # nothing changes by itself
        assert callable(change)
        change()
        after = fingerprints(backend) or {}
        return {name for name in after.keys() | before.keys()
                if after.get(name) != before.get(name)}

    assert changed_by(lambda: backend.write_version("app/a", b"new")) == {"app/a"}
    assert changed_by(lambda: backend.update_metadata(
        "app/b", MetadataUpdate(description="d"))) == {"app/b"}
    assert changed_by(lambda: backend.update_labels("app/a", {Label.PREVIOUS: None})) == {"app/a"}
    assert changed_by(lambda: openbao.bao("kv", "put", "secret/top", "k=v")) == {"top"}
    assert changed_by(lambda: backend.delete("top")) == {"top"}  # still listed, print changed
    assert "top" in (fingerprints(backend) or {})
    listed = backend.scan_metadata() or {}
    assert listed["top"].metadata() is None  # deleted: nothing to serve from the listing
    assert listed["app/a"].metadata() == backend.read_metadata("app/a")  # as a read gives it


def test_fingerprints_are_none_where_the_server_has_no_detailed_listing(
        backend: OpenBaoBackend) -> None:
    from secretfs.backends.http import Response

    asked: list[str] = []

    def vault(method: str, path: str, body: object = None, params: object = None) -> Response:
        asked.append(path)  # what HashiCorp Vault answers for detailed-metadata
        return Response(404, b'{"data":null,"warnings":["Invalid path for a versioned K/V '
                             b'secrets engine. See the API docs ..."]}')
    backend._request = vault  # type: ignore[method-assign]
    assert backend.scan_metadata() is None
    assert backend.scan_metadata() is None and len(asked) == 1  # asked once, remembered


async def test_a_poll_pass_over_many_secrets_costs_one_request(
        backend: OpenBaoBackend) -> None:
    from secretfs.cache import TtlCache
    from secretfs.manager import SecretsManager, SyncSecretsManager
    from secretfs.poll import MetadataPoller

    names = {f"fleet/s{index:03d}" for index in range(60)}
    for name in names:
        backend.write_version(name, secrets.token_bytes(8))
    manager = SecretsManager(SyncSecretsManager(backend),
                             cache=TtlCache(ttl=3600, max_size=1000, max_stale=0))
    reported: list[set[str]] = []

    async def changed(changes: set[str]) -> None:
        reported.append(set(changes))
        for name in changes:
            manager.forget(name)
            await manager.metadata(name)

    opened = {"fleet/s001", "fleet/s002"}
    for name in opened:  # read since the start: cached before the first scan, maybe older
        await manager.metadata(name)
    held = names - {"fleet/s003"}  # the caller does not hold this one yet
    poller = MetadataPoller(manager, known=lambda: held, changed=changed)
    await poller.poll_once(1)  # the first look: what may be older than the scan is reported
    assert reported == [opened | {"fleet/s003"}]
    counted = Counted(backend)
    await poller.poll_once(1)
    assert counted.paths == ["secret/detailed-metadata/", "secret/detailed-metadata/fleet/"]
    backend.write_version("fleet/s007", b"changed")
    counted.paths.clear()
    await poller.poll_once(1)
    assert reported[-1] == {"fleet/s007"}
    assert counted.paths[:2] == ["secret/detailed-metadata/", "secret/detailed-metadata/fleet/"]

    # The listing carried every secret's metadata: the held names are cached from it, so a
    # first read of any costs one request — its value.
    assert all(manager.cached_metadata(name) is not None for name in held)
    counted.paths.clear()
    assert await manager.resolve("secretfs://fleet/s050") is not None
    assert counted.paths == ["secret/data/fleet/s050"]


def test_another_host_learns_a_versions_files_from_metadata_alone(
        backend: OpenBaoBackend, openbao: OpenBaoServer) -> None:
    """The writer records each version's keys and sizes in the metadata: a host that did not
    write it shows its files without reading its value (no value in its memory, no request)."""
    backend.write_version("single", secrets.token_bytes(33))
    backend.write_version("pair", {"user": "app", "password": secrets.token_hex(12)})
    backend.write_version("pair", {"user": "app2", "password": secrets.token_hex(20)})
    other = OpenBaoBackend(openbao.address, token=openbao.root_token, max_versions=3)
    try:
        counted = Counted(other)
        single = other.read_metadata("single").version_info(1)
        pair = other.read_metadata("pair")
        assert counted.paths == ["secret/metadata/single", "secret/metadata/pair"]  # no data
        assert single is not None and (single.is_map, single.keys, single.sizes) == (
            False, ("value",), (33,))
        newest, oldest = pair.version_info(2), pair.version_info(1)
        assert newest is not None and oldest is not None
        assert (newest.keys, newest.sizes) == (("user", "password"), (4, 40))
        assert (oldest.keys, oldest.sizes) == (("user", "password"), (3, 24))

        openbao.bao("kv", "put", "secret/single", "k=vv")  # another tool: no shape recorded
        counted.paths.clear()
        outside = other.read_metadata("single").version_info(2)
        assert outside is not None and (outside.keys, outside.sizes) == (("k",), (2,))
        assert counted.paths == ["secret/metadata/single", "secret/data/single"]  # read once
    finally:
        other.close()


def test_recorded_shapes_stay_small(backend: OpenBaoBackend) -> None:
    """Shapes are kept only for the versions shown (max_versions 3 here) and within
    SHAPES_MAX bytes: a map with many long keys drops its oldest versions' shapes, which are
    then read when needed — the metadata never outgrows OpenBao's 64 entries."""
    from secretfs.backends.openbao import SHAPES_MAX, _shapes_of

    for _ in range(5):
        backend.write_version("small", secrets.token_bytes(4))
    kv = backend._get_kv("small")
    assert kv is not None and sorted(_shapes_of(kv.custom)) == [3, 4, 5]

    wide = {f"key-{index:03d}-" + "k" * 40: secrets.token_hex(4) for index in range(40)}
    for _ in range(3):
        backend.write_version("wide", wide)
    kv = backend._get_kv("wide")
    assert kv is not None
    assert len(backend._shapes) > 0 and sorted(_shapes_of(kv.custom)) == [3]  # 2 KB each
    assert len(kv.custom) < 64 and sum(len(v.encode()) for k, v in kv.custom.items()
                                       if k.startswith("secretfs.shapes")) <= SHAPES_MAX
    assert backend.read_metadata("wide").version_info(1).keys == tuple(wide)  # (remembered)


async def test_the_poller_learns_what_another_tool_wrote_once(
        backend: OpenBaoBackend, openbao: OpenBaoServer) -> None:
    """A version `bao kv put` wrote has no recorded keys and sizes: the first pass that caches
    its metadata reads it once for them; after that a first open is one request."""
    from secretfs.cache import TtlCache
    from secretfs.manager import SecretsManager, SyncSecretsManager
    from secretfs.poll import MetadataPoller

    openbao.bao("kv", "put", "secret/outside", "password=" + secrets.token_hex(8))
    manager = SecretsManager(SyncSecretsManager(backend),
                             cache=TtlCache(ttl=3600, max_size=100, max_stale=0))

    async def changed(changes: set[str]) -> None:
        raise AssertionError(f"nothing changed, nothing held was cached: {changes}")

    poller = MetadataPoller(manager, known=lambda: {"outside"}, changed=changed)
    counted = Counted(backend)
    await poller.poll_once(1)
    assert counted.paths == ["secret/detailed-metadata/", "secret/data/outside"]
    assert manager.cached_metadata("outside") is not None
    counted.paths.clear()
    await poller.poll_once(1)  # known now: the listing alone
    assert counted.paths == ["secret/detailed-metadata/"]


def test_a_node_without_the_mount_is_not_taken_for_an_empty_one(
        openbao: OpenBaoServer) -> None:
    """A node that is sealing or stopping tears its mount table down first and answers 404
    "no handler for route" for every path: that must not read as "every secret deleted"
    (the poller would drop every cached value mid-outage). Likewise a misconfigured mount."""
    wrong = OpenBaoBackend(openbao.address, mount="no-such-mount", token=openbao.root_token)
    try:
        for call in (lambda: wrong.read_metadata("db"), lambda: wrong.scan_metadata(),
                     lambda: wrong.list_names(), lambda: wrong.read_value("db", 1)):
            with pytest.raises(BackendUnavailable) as caught:
                call()
            assert "no no-such-mount/ mount" in str(caught.value)
    finally:
        wrong.close()
