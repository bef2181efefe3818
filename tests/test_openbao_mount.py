"""secretfs in front of a real OpenBao: through a mount, across hosts, during an outage; and the
Transit master key for the local store. Values are generated, compared, never printed."""

from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Store, eventually, make_store, one_line_error
from tests.mounting import mounted
from tests.openbao import OpenBaoServer, running_openbao

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="real mounts need root and /dev/fuse")


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBaoServer]:
    (tmp_path / "openbao").mkdir()
    with running_openbao(tmp_path / "openbao") as server:
        yield server


def openbao_store(root: Path, bao: OpenBaoServer, *, poll: str = "1s", ttl: str = "1h") -> Store:
    """A config whose backend is the OpenBao server (its KV v2 at secret/)."""
    store = make_store(root, init=False)
    token = root / "bao.token"
    token.write_text(bao.root_token)
    token.chmod(0o600)
    store.config.write_text(
        "secrets_manager:\n"
        f"  backend: {{ type: openbao, address: {bao.address}, mount: secret, "
        f"token_file: {token} }}\n"
        "  encryption: { provider: file, key_file: master.key }\n"
        "  audit: { path: audit.log }\n"
        f"  cache: {{ ttl: {ttl}, max_stale: 1h, poll_interval: {poll} }}\n"
    )
    store.cli("init", check=True)
    return store


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def test_bao_writes_show_through_the_mount_and_an_outage_is_ridden_out(
        tmp_path: Path, bao: OpenBaoServer, folder: Path) -> None:
    store = openbao_store(tmp_path / "store", bao, ttl="1s")
    first, second = secrets.token_hex(8), secrets.token_hex(8)
    bao.bao("kv", "put", "secret/db", f"password={first}")
    bao.bao("kv", "put", "secret/cold", f"password={first}")
    with mounted(store, folder / "mnt") as mount:
        target = mount.path / "db/latest/password"
        assert read(target) == first
        bao.bao("kv", "put", "secret/db", f"password={second}")  # written elsewhere
        assert eventually(lambda: read(target) == second, timeout=5), "not seen within the poll"
        bao.stop()  # the outage
        time.sleep(1.5)  # past the ttl: only the backend could say it is still current
        assert read(target) == second  # cached: still served, marked stale
        attributes = subprocess.run(["getfattr", "-d", str(target)], capture_output=True,
                                    text=True).stdout
        assert "user.secretfs.stale" in attributes
        with pytest.raises(OSError) as cold:
            (mount.path / "cold/latest/password").read_text()  # never read: nothing cached
        assert cold.value.errno in (errno.EIO, errno.ENOENT)
        health_file = mount.path / ".secretfs/health"
        health = eventually(lambda: json.loads(health_file.read_text())["status"]
                            == "backend unavailable", timeout=5)
        assert health, health_file.read_text()  # the poller met the outage: operators see it
        document = json.loads(health_file.read_text())
        assert document["nodes"][0]["state"] == "down" and document["backend_unavailable_since"]
        bao.start()  # back (a dev server comes back empty: write again)
        bao.bao("kv", "put", "secret/db", f"password={first}")
        assert eventually(lambda: read(target) == first, timeout=90), "no recovery"
        assert mount.process.poll() is None  # the same daemon: no remount
        assert eventually(lambda: json.loads(health_file.read_text())["status"] == "ok",
                          timeout=10)


def test_two_daemons_on_one_openbao_see_each_others_rotation_and_rotate_once(
        tmp_path: Path, bao: OpenBaoServer, folder: Path) -> None:
    one = openbao_store(tmp_path / "one", bao)
    two = openbao_store(tmp_path / "two", bao)
    one.put("db", secrets.token_hex(8), "--rotate-every", "30d")
    with mounted(one, folder / "a") as a, mounted(two, folder / "b") as b:
        before = read(b.path / "db/latest/value")
        one.cli("secrets", "rotate", "db", check=True)
        now = read(a.path / "db/latest/value")
        assert eventually(lambda: read(b.path / "db/latest/value") != before, timeout=10.0)
        assert eventually(lambda: read(b.path / "db/latest/value") == read(
            a.path / "db/latest/value"), timeout=10.0)
        assert now is not None
    # both hosts find it due at once: one new KV version
    one.put("api", secrets.token_hex(8), "--rotate-every", "1s", "--set-cmd",
            "cat > /dev/null; sleep 0.5")
    time.sleep(1.2)
    runs = [subprocess.Popen([*_cli(), "rotation", "run-due"], env=store.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for store in (one, two)]
    assert [run.wait(timeout=60) for run in runs] == [0, 0]
    versions = json.loads(one.cli("secrets", "versions", "api", "--json", check=True).stdout)
    assert len(versions) == 2


def _cli() -> list[str]:
    import sys

    return [sys.executable, "-m", "secretfs"]


def test_transit_keeps_the_master_key_in_openbao(tmp_path: Path, bao: OpenBaoServer) -> None:
    bao.api("POST", "sys/mounts/transit", {"type": "transit"})
    bao.api("POST", "transit/keys/secretfs", {"type": "aes256-gcm96"})
    bao.api("POST", "transit/keys/secretfs/config", {"deletion_allowed": True})
    store = make_store(tmp_path / "store", init=False)
    store.config.write_text(
        "secrets_manager:\n"
        "  backend: { type: local, path: store.db }\n"
        "  encryption: { provider: openbao_transit, key_name: secretfs, key_file: root.key }\n"
        "  audit: { path: audit.log }\n")
    env = store.env(BAO_ADDR=bao.address, BAO_TOKEN=bao.root_token)
    store.cli("init", check=True, env=env)
    value = secrets.token_hex(8)
    store.cli("secrets", "put", "db", value, check=True, env=env)
    assert store.cli("secrets", "get", "db", env=env, check=True).stdout == value.encode()
    import sqlite3

    with sqlite3.connect(store.db) as db:
        wrapped = db.execute("SELECT wrapped_key, key_id FROM versions").fetchone()
    assert wrapped[0].startswith(b"vault:v1:") and wrapped[1] == "transit:secretfs"
    assert store.cli("audit", "verify", env=env).returncode == 0
    bao.api("DELETE", "transit/keys/secretfs")
    gone = store.cli("secrets", "get", "db", env=env)
    assert gone.returncode == 8
    assert "Transit key 'secretfs'" in one_line_error(gone)
    assert value.encode() not in gone.stdout + gone.stderr


def test_a_mount_in_front_of_openbao_reads_a_map_put_by_bao(
        tmp_path: Path, bao: OpenBaoServer, folder: Path) -> None:
    store = openbao_store(tmp_path / "store", bao)
    password = secrets.token_hex(8)
    bao.bao("kv", "put", "secret/app/db", "user=app", f"password={password}")
    with mounted(store, folder / "mnt") as mount:
        assert read(mount.path / "app/db/latest/password") == password
        assert read(mount.path / "app/db/latest/user") == "app"
    assert json.loads(store.get("app/db")) == {"password": password, "user": "app"}



