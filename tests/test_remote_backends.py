"""Remote backends end to end: AWS (moto) through a real mount with a rotation, the aws_kms
master key, and a migration local → OpenBao → local. Values are generated, never printed."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from secretfs.config import load_config
from secretfs.manager import SyncSecretsManager
from secretfs.migrate import migrate
from secretfs.model import Secret
from tests.helpers import Store, make_store, one_line_error
from tests.moto_server import REGION, moto_endpoint, moto_server  # noqa: F401  (fixtures)
from tests.mounting import mounted
from tests.openbao import OpenBaoServer, running_openbao

needs_mount = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                 reason="real mounts need root and /dev/fuse")


def aws_store(root: Path, endpoint: str) -> Store:
    store = make_store(root, init=False)
    store.config.write_text(
        "secrets_manager:\n"
        f"  backend: {{ type: aws, region: {REGION}, endpoint_url: {endpoint}, prefix: app/ }}\n"
        "  encryption: { provider: file, key_file: master.key }\n"
        "  audit: { path: audit.log }\n"
        "  cache: { poll_interval: 1s }\n")
    store.cli("init", check=True)
    return store


@needs_mount
def test_aws_labels_rotation_and_the_mount(tmp_path: Path, moto_endpoint: str) -> None:  # noqa: F811
    store = aws_store(tmp_path / "store", moto_endpoint)
    client = boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_endpoint)
    store.put("db", "--key", "user=app", "--key", f"password={secrets.token_hex(8)}",
              "--rotate-every", "30d")
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    try:
        with mounted(store, folder / "mnt") as mount:
            password = mount.path / "db/latest/password"
            before = password.read_text()
            store.cli("secrets", "rotate", "db", check=True)
            stages = client.describe_secret(SecretId="app/db")["VersionIdsToStages"]
            assert sorted(stage for labels in stages.values() for stage in labels) == \
                ["AWSCURRENT", "AWSPREVIOUS"]
            current = client.get_secret_value(SecretId="app/db", VersionStage="AWSCURRENT")
            expected = json.loads(current["SecretString"])["password"]
            deadline = time.monotonic() + 10
            while password.read_text() == before:
                assert time.monotonic() < deadline, "the mount did not follow AWSCURRENT"
                time.sleep(0.1)
            same = password.read_text() == expected
            assert same, "the mount does not show the AWSCURRENT value"
            still = (mount.path / "db/previous/password").read_text() == before
            assert still, "previous is not the AWSPREVIOUS value"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_aws_kms_wraps_the_local_stores_data_keys(tmp_path: Path, moto_endpoint: str) -> None:  # noqa: F811
    kms = boto3.client("kms", region_name=REGION, endpoint_url=moto_endpoint)
    key_id = kms.create_key()["KeyMetadata"]["KeyId"]
    store = make_store(tmp_path / "store", init=False)
    store.config.write_text(
        "secrets_manager:\n"
        "  backend: { type: local, path: store.db }\n"
        f"  encryption: {{ provider: aws_kms, key_id: {key_id}, key_file: root.key }}\n"
        "  audit: { path: audit.log }\n")
    env = store.env(AWS_ENDPOINT_URL=moto_endpoint, AWS_REGION=REGION,
                    AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    store.cli("init", check=True, env=env)
    value = secrets.token_hex(8)
    store.cli("secrets", "put", "db", value, check=True, env=env)
    same = store.cli("secrets", "get", "db", check=True, env=env).stdout == value.encode()
    assert same, "the value did not round-trip"
    with sqlite3.connect(store.db) as db:
        assert db.execute("SELECT key_id FROM versions").fetchone()[0] == f"kms:{key_id}"
    # another KMS key (moto does not enforce disabled keys, so this stands for a revoked one)
    other = kms.create_key()["KeyMetadata"]["KeyId"]
    store.config.write_text(store.config.read_text().replace(key_id, other))
    refused = store.cli("secrets", "get", "db", env=env)
    assert refused.returncode == 8, "a store sealed by another KMS key must not open"
    assert value.encode() not in refused.stdout
    assert "KMS key" in one_line_error(refused) or "master key" in one_line_error(refused)


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[OpenBaoServer]:
    (tmp_path / "openbao").mkdir()
    with running_openbao(tmp_path / "openbao") as server:
        yield server


def test_migrate_local_to_openbao_and_back(tmp_path: Path, bao: OpenBaoServer) -> None:
    token = tmp_path / "bao.token"
    token.write_text(bao.root_token)
    token.chmod(0o600)
    first, last = make_store(tmp_path / "first"), make_store(tmp_path / "last")
    remote = tmp_path / "remote.yaml"
    remote.write_text(
        "secrets_manager:\n"
        f"  backend: {{ type: openbao, address: {bao.address}, mount: secret, "
        f"token_file: {token} }}\n"
        f"  encryption: {{ provider: file, key_file: {first.key_file} }}\n"
        f"  audit: {{ path: {tmp_path / 'remote-audit.log'} }}\n")
    source = SyncSecretsManager.from_config(load_config(first.config))
    for i in range(300):
        for v in range(3):
            source.store(Secret(f"team{i % 6}/s{i:03d}", f"v{v}-{secrets.token_hex(6)}",
                                tags={"team": str(i % 6)}, description=f"secret {i}"))
    middle = SyncSecretsManager.from_config(load_config(remote))

    class Interrupted(Exception):
        pass

    def stop_half_way(done: int, total: int) -> None:
        if done == 150:
            raise Interrupted

    with pytest.raises(Interrupted):
        migrate(source, middle, progress=stop_half_way)
    assert migrate(source, middle).secrets == 300  # resumed
    back = SyncSecretsManager.from_config(load_config(last.config))
    assert migrate(middle, back).written == 900
    for name in source.backend.list_names():
        mine, theirs = source.metadata(name), back.metadata(name)
        assert [source.backend.read_value(name, v.version) for v in mine.versions] == \
            [back.backend.read_value(name, v.version) for v in theirs.versions]
        assert dict(theirs.tags) == dict(mine.tags) and theirs.description == mine.description
        assert {label: back.backend.read_value(name, v) for label, v in theirs.labels.items()} \
            == {label: source.backend.read_value(name, v) for label, v in mine.labels.items()}
    remote_versions = sum(len(middle.metadata(n).versions) for n in middle.backend.list_names())
    assert remote_versions == 900  # no version written twice by the interrupted run
