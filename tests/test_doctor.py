"""`secretfs doctor`: each check against the real thing it looks at.

Every run is the real command in a fresh process. Runs that need a host condition changed do it
for real in a private mount namespace (``unshare --mount``), never on the host: a regular empty
file bind-mounted over /dev/fuse, and — so that another test's mount elsewhere on this host
cannot change the verdict — every secretfs mount except the test's own detached there first.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from secretfs.doctor import CHECKS
from tests.cluster import Cluster, cluster  # noqa: F401  (a fixture)
from tests.helpers import SEED_POLICY, Store, free_port
from tests.mounting import force_unmount, is_mounted, start
from tests.openbao import OpenBaoServer, openbao, requires_openbao  # noqa: F401  (a fixture)

NAMES = [name for name, _ in CHECKS]
LINE = re.compile(r"(ok|warn|fail) +(\S+) +(\S.*)")
ROOT_NS = os.geteuid() == 0 and shutil.which("unshare") is not None
needs_root_ns = pytest.mark.skipif(not ROOT_NS, reason="needs root and unshare")
needs_mount = pytest.mark.skipif(not ROOT_NS or not os.path.exists("/dev/fuse"),
                                 reason="real mounts need root, unshare and /dev/fuse")

# Runs inside `unshare --mount` (private propagation: nothing here reaches the host).
ISOLATE = r"""
import os, re, subprocess, sys
keep = os.environ.pop("DOCTOR_KEEP", "")
fake_fuse = os.environ.pop("DOCTOR_FAKE_FUSE", "")
with open("/proc/self/mountinfo") as mountinfo:
    points = []
    for line in mountinfo:
        fields = line.split()
        if fields[fields.index("-") + 1] == "fuse.secretfs":
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
for point in points:
    if not (keep and (point == keep or point.startswith(keep + "/"))):
        subprocess.run(["umount", "-l", point], capture_output=True)
if fake_fuse:
    subprocess.run(["mount", "--bind", fake_fuse, "/dev/fuse"], check=True)
os.execv(sys.executable, [sys.executable, "-m", "secretfs", "doctor", *sys.argv[1:]])
"""


def doctor(env: dict[str, str], *args: str, keep: Path | None = None,
           fake_fuse: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`secretfs doctor ARGS`, in a private mount namespace when we can make one."""
    if ROOT_NS:
        env = {**env, "DOCTOR_KEEP": str(keep or ""), "DOCTOR_FAKE_FUSE": str(fake_fuse or "")}
        argv = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", ISOLATE,
                *args]
    else:
        assert fake_fuse is None
        argv = [sys.executable, "-m", "secretfs", "doctor", *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)


def report(result: subprocess.CompletedProcess[str]) -> dict[str, tuple[str, str]]:
    """check → (status, line), after asserting the output's shape: one line per check, in
    order, no traceback; on stderr nothing (exit 0) or one `secretfs: …` line (exit 1)."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(NAMES), result.stdout
    found = {}
    for line, name in zip(lines, NAMES, strict=True):
        match = LINE.fullmatch(line)
        assert match is not None and match[2] == name, line
        status = match[1]
        assert ("(fix: " in line) == (status != "ok"), line
        found[name] = (status, line)
    failed = [name for name, (status, _) in found.items() if status == "fail"]
    if failed:
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("secretfs: doctor: ")
        assert all(name in result.stderr for name in failed)
    else:
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    return found


def assert_never_shown(result: subprocess.CompletedProcess[str], *values: str) -> None:
    for value in values:
        assert value not in result.stdout and value not in result.stderr


@pytest.fixture
def host_fuse() -> Iterator[None]:
    """Proof afterwards that a test's fake /dev/fuse stayed in its namespace."""
    yield
    assert stat.S_ISCHR(os.stat("/dev/fuse").st_mode)


# -- a healthy host -------------------------------------------------------------------------------


def test_healthy_store_every_check_ok_or_warn(store: Store) -> None:
    store.put("db_password", "--generate", "--length", "40")
    value = store.get("db_password").decode()
    store.put("db", "--key", "user=app", "--key", f"password={value[::-1]}")

    human = doctor(store.env())
    found = report(human)
    assert human.returncode == 0
    assert all(status in ("ok", "warn") for status, _ in found.values())
    assert found["config"][0] == "ok" and str(store.config) in found["config"][1]
    assert found["key-file"][0] == "ok" and "mode 0600" in found["key-file"][1]
    assert found["backend"][0] == "ok" and "2 secrets" in found["backend"][1]
    # put, get, put: three audit lines whose links and MACs were checked
    assert found["audit"][0] == "ok" and "links and MACs" in found["audit"][1]

    as_json = doctor(store.env(), "--json")
    assert as_json.returncode == 0
    document = json.loads(as_json.stdout)
    assert [entry["check"] for entry in document] == NAMES
    for entry in document:
        assert set(entry) == {"check", "status", "detail", "fix"}
        assert entry["status"] in ("ok", "warn")
        assert (entry["fix"] is None) == (entry["status"] == "ok")
    assert_never_shown(human, value, value[::-1])
    assert_never_shown(as_json, value, value[::-1])


# -- fuse-device ----------------------------------------------------------------------------------


@needs_root_ns
def test_dev_fuse_replaced_by_a_regular_file(store: Store, tmp_path: Path,
                                             host_fuse: None) -> None:
    empty = tmp_path / "not-a-device"
    empty.touch()
    result = doctor(store.env(), fake_fuse=empty)
    found = report(result)
    status, line = found["fuse-device"]
    assert status == "fail"
    assert "/dev/fuse is a regular file, not the FUSE character device" in line
    assert "--device /dev/fuse" in line and "mknod" in line
    assert result.returncode == 1


# -- key-file -------------------------------------------------------------------------------------


def test_group_readable_key_file(store: Store) -> None:
    store.key_file.chmod(0o640)
    result = doctor(store.env())
    found = report(result)
    status, line = found["key-file"]
    assert status == "fail"
    assert "readable by group or others (mode 0640" in line
    assert f"(fix: chmod 600 {store.key_file})" in line
    # one cause, one fail: the store is not opened with a key that was refused
    assert found["backend"][0] == "warn" and "master key did not load" in found["backend"][1]
    assert result.returncode == 1


def test_world_writable_data_folder(store: Store) -> None:
    store.root.chmod(0o777)
    try:
        found = report(doctor(store.env()))
    finally:
        store.root.chmod(0o755)
    status, line = found["key-file"]
    assert status == "fail" and f"chmod go-w {store.root}" in line


# -- backend --------------------------------------------------------------------------------------


def openbao_config(root: Path, address: str | list[str], token: str) -> Path:
    """A config for the openbao backend with its token in a 0600 file, and the master key
    (which keys the audit log's MAC) of a local store made in *root* beforehand."""
    token_file = root / "bao-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = root / "openbao.yaml"
    addresses = address if isinstance(address, str) else f"[{', '.join(address)}]"
    config.write_text(
        "secrets_manager:\n"
        f"  backend: {{ type: openbao, address: {addresses}, token_file: bao-token }}\n"
        "  encryption: { provider: file, key_file: master.key }\n"
        "  audit: { path: audit.log }\n")
    return config


def test_openbao_unreachable(store: Store) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    token = "s." + secrets.token_hex(12)
    config = openbao_config(store.root, address, token)
    started = time.monotonic()
    result = doctor(store.env(SECRETFS_CONFIG=str(config)))
    assert time.monotonic() - started < 30
    found = report(result)
    status, line = found["backend"]
    assert status == "fail"
    assert "backend unreachable" in line
    assert f"(fix: check address {address} " in line
    assert_never_shown(result, token)


@requires_openbao
def test_openbao_cluster_shows_each_nodes_role(store: Store,
                                              cluster: Cluster) -> None:  # noqa: F811
    config = openbao_config(store.root, cluster.addresses, cluster.root_token)
    env = store.env(SECRETFS_CONFIG=str(config))
    leader = cluster.leader()
    status, line = report(doctor(env))["backend"]
    assert status == "ok", line
    for index, address in enumerate(cluster.addresses):
        assert f"{address} {'active' if index == leader else 'standby'}" in line

    standby = next(index for index in range(3) if index != leader)
    cluster.kill(standby)
    result = doctor(env)
    status, line = report(result)["backend"]
    assert status == "warn" and result.returncode == 0, line
    assert f"{cluster.addresses[standby]} unreachable" in line
    assert f"{cluster.addresses[leader]} active" in line and "degraded" in line
    assert_never_shown(result, cluster.root_token)


@requires_openbao
def test_openbao_wrong_then_right_token(store: Store,
                                        openbao: OpenBaoServer) -> None:  # noqa: F811
    wrong = "s." + secrets.token_hex(12)
    config = openbao_config(store.root, openbao.address, wrong)
    env = store.env(SECRETFS_CONFIG=str(config))
    result = doctor(env)
    found = report(result)
    status, line = found["backend"]
    assert status == "fail"
    assert "refused the token" in line
    assert f"put a valid token in {store.root / 'bao-token'}" in line
    assert result.returncode == 1
    assert_never_shown(result, wrong, openbao.root_token)

    openbao_config(store.root, openbao.address, openbao.root_token)
    store.cli("secrets", "put", "api_key", "--generate", env=env, check=True)
    value = store.cli("secrets", "get", "api_key", env=env, check=True).stdout.decode()
    result = doctor(env)
    found = report(result)
    status, line = found["backend"]
    assert status == "ok"
    assert f"at {openbao.address}: token accepted (policies root" in line
    assert "secret/ lists 1 entry" in line
    assert result.returncode == 0
    assert_never_shown(result, openbao.root_token, value)


# -- config and policy ----------------------------------------------------------------------------


def line_of(path: Path, text: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_policy_for_an_unknown_principal(store: Store) -> None:
    with store.config.open("a") as config:
        config.write("principals:\n"
                     "  service-a: { uid: 1001 }\n"
                     "policies:\n"
                     "  service-b:\n"
                     "    allow:\n"
                     "      - { action: read, resources: [db_password] }\n")
    result = doctor(store.env())
    found = report(result)
    status, line = found["policy"]
    assert status == "fail"
    where = f"{store.config}:{line_of(store.config, 'service-b:')}: policies.service-b"
    assert where in line and "no principal is named 'service-b'" in line
    assert "did you mean 'service-a'?" in line
    assert found["config"][0] == "ok"
    assert result.returncode == 1


def test_rule_with_an_unknown_action(store: Store) -> None:
    with store.config.open("a") as config:
        config.write("principals:\n"
                     "  service-a: { uid: 1001 }\n"
                     "policies:\n"
                     "  service-a:\n"
                     "    allow:\n"
                     "      - { action: reed, resources: [db_password] }\n")
    result = doctor(store.env())
    found = report(result)
    status, line = found["config"]
    assert status == "fail"
    assert f"{store.config}:{line_of(store.config, 'reed')}: policies.service-a.allow[0]" in line
    assert "'reed' is not one of read, list, write, delete, rotate, *" in line
    # what needs the configuration says it was not checked, rather than failing again
    for name in ("policy", "allow-other", "key-file", "backend", "audit"):
        assert found[name][0] == "warn" and "not checked" in found[name][1]
    assert result.returncode == 1


def test_time_windows_bring_in_the_clock(store: Store) -> None:
    with store.config.open("a") as config:
        config.write(SEED_POLICY)
    found = report(doctor(store.env()))
    status, line = found["clock"]
    assert status in ("ok", "warn")  # warn when this host's clock is not NTP-synchronized
    assert "1 time_window condition (zones: local)" in line
    if status == "warn":
        assert "not synchronized" in line and "timedatectl set-ntp true" in line


# -- mount ----------------------------------------------------------------------------------------


@needs_mount
def test_live_stopped_then_dead_mount(store: Store, tmp_path: Path) -> None:
    store.put("db_password", "--generate")
    mountpoint = tmp_path / "mnt"
    process = None
    try:
        process = start(store, mountpoint, tmp_path / "mount.log")
        found = report(doctor(store.env(), keep=mountpoint))
        status, line = found["mount"]
        assert status == "ok" and f"{mountpoint} answers, health ok (1 secret)" in line

        process.send_signal(signal.SIGSTOP)  # a daemon that no longer answers: no hang here
        started = time.monotonic()
        found = report(doctor(store.env(), keep=mountpoint))
        assert time.monotonic() - started < 20
        status, line = found["mount"]
        assert status == "fail" and f"{mountpoint} does not answer within 3s" in line
        assert f"fusermount3 -uz {mountpoint}" in line

        process.kill()  # SIGKILL: no unmount, the mount is left behind answering ENOTCONN
        process.wait(10)
        assert is_mounted(mountpoint)
        result = doctor(store.env(), keep=mountpoint)
        found = report(result)
        status, line = found["mount"]
        assert status == "fail"
        assert f"{mountpoint} is a dead mount" in line
        assert f"(fix: fusermount3 -uz {mountpoint} " in line
        assert result.returncode == 1
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        force_unmount(mountpoint)
    assert not is_mounted(mountpoint)


def test_configured_mount_folder_without_a_mount(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "served-here"
    folder.mkdir()
    with store.config.open("a") as config:
        config.write(f"  mount: {{ path: {folder} }}\n")
    found = report(doctor(store.env()))
    status, line = found["mount"]
    assert status == "warn"
    assert f"nothing is mounted at mount.path {folder}, though the folder exists" in line
    assert f"secretfs mount {folder}" in line


# -- audit ----------------------------------------------------------------------------------------


def test_edited_audit_line(store: Store) -> None:
    store.put("db_password", "--generate")
    store.put("api_key", "--generate")
    log = store.root / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) >= 2
    record = json.loads(lines[-2])
    record["resource"] = "someone_else"  # still canonical JSON, so only the MAC can tell
    lines[-2] = json.dumps(record, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False) + "\n"
    log.write_text("".join(lines))
    found = report(doctor(store.env()))
    status, line = found["audit"]
    assert status == "fail"
    assert f"{log}:{len(lines) - 1}: MAC mismatch" in line
    assert "secretfs audit verify" in line


# -- as another user ------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv")
def test_as_an_unprivileged_user() -> None:
    """uid 65534 with root's /dev/fuse (0600 here) and policies for other principals: the
    device is refused with a fix, and the allow_other judgement names those principals."""
    folder = Path(tempfile.mkdtemp(prefix="doctor-"))
    try:
        folder.chmod(0o755)
        config = folder / "config.yaml"
        config.write_text(
            "secrets_manager:\n"
            f"  backend: {{ type: local, path: {folder}/store.db }}\n"
            f"  encryption: {{ provider: file, key_file: {folder}/master.key }}\n"
            "principals:\n  service-a: { uid: 1001 }\n"
            "policies:\n  service-a:\n    allow:\n      - { action: read, resources: ['*'] }\n")
        config.chmod(0o644)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECRETFS_")}
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             sys.executable, "-m", "secretfs", "doctor", "--config", str(config)],
            capture_output=True, text=True, env={**env, "HOME": str(folder)}, timeout=60)
        found = report(result)
        status, line = found["allow-other"]
        assert status == "warn"
        assert "readable by uid 65534 alone" in line and "principal service-a" in line
        if not os.stat("/dev/fuse").st_mode & stat.S_IROTH:
            status, line = found["fuse-device"]
            assert status == "fail" and "uid 65534 cannot open /dev/fuse" in line
        assert found["fusermount"][0] == "ok"
    finally:
        shutil.rmtree(folder)
