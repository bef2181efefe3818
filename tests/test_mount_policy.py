"""Policies through a real mount: principals from uid and exe, listings filtered, SIGHUP."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.cgroups import cgroups
from tests.helpers import Store, make_store
from tests.mounting import as_user, mounted

__all__ = ["cgroups"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="real mounts need root and /dev/fuse")

POLICY = """\
principals:
  service-a: {{ uid: 4242{exe} }}
policies:
  service-a:
    allow:
      - {{ action: [read, list], resources: [db_password, "api_keys/*"] }}
    deny:
      - {{ action: delete, resources: ["*"] }}
"""


@pytest.fixture
def policed(tmp_path: Path):
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    folder.chmod(0o755)
    store = make_store(tmp_path / "store")
    yield store, folder
    shutil.rmtree(folder, ignore_errors=True)


def with_policy(store: Store, exe: str = "") -> None:
    store.config.write_text(store.config.read_text() + POLICY.format(exe=exe))


def test_a_principal_reads_what_its_policy_allows(policed) -> None:
    store, folder = policed
    store.put("db_password", "pw-" + os.urandom(4).hex())
    store.put("api_keys/stripe", "sk-" + os.urandom(4).hex())
    store.put("other_secret", "no-" + os.urandom(4).hex())
    with_policy(store)
    with mounted(store, folder / "mnt") as mount:
        ok = as_user(4242, "cat", str(mount.path / "db_password/latest/value"))
        assert ok.returncode == 0 and ok.stdout == store.get("db_password")
        denied = as_user(4242, "cat", str(mount.path / "other_secret/latest/value"))
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
        listing = as_user(4242, "ls", str(mount.path))
        assert listing.stdout.split() == [b"api_keys", b"db_password"]
        stranger = as_user(4343, "cat", str(mount.path / "db_password/latest/value"))
        assert stranger.returncode != 0


def test_an_exe_rule_admits_only_that_program(policed) -> None:
    store, folder = policed
    store.put("db_password", "pw-" + os.urandom(4).hex())
    with_policy(store, exe=', exe: "/usr/bin/cat"')
    with mounted(store, folder / "mnt") as mount:
        target = str(mount.path / "db_password/latest/value")
        assert as_user(4242, "/usr/bin/cat", target).returncode == 0
        assert as_user(4242, "/usr/bin/head", "-c", "100", target).returncode != 0


def test_a_policy_edit_and_sighup_change_the_next_open(policed) -> None:
    store, folder = policed
    store.put("db_password", "pw-" + os.urandom(4).hex())
    with_policy(store)
    with mounted(store, folder / "mnt") as mount:
        target = str(mount.path / "db_password/latest/value")
        assert as_user(4242, "cat", target).returncode == 0
        store.config.write_text(store.config.read_text().replace("db_password, ", ""))
        mount.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "configuration reloaded" not in mount.log_text():
            time.sleep(0.05)
        assert as_user(4242, "cat", target).returncode != 0


NETWORK_POLICY = """\
principals:
  service-a: { uid: 4242 }
policies:
  service-a:
    allow:
      - { action: read, resources: ["*"] }
    conditions:
      - { type: ip_range, value: 10.0.0.0/8 }
"""


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
def test_ip_range_follows_the_network_namespace_of_the_reader(policed) -> None:
    store, folder = policed
    value = "pw-" + os.urandom(4).hex()
    store.put("db_password", value)
    store.config.write_text(store.config.read_text() + NETWORK_POLICY)
    with mounted(store, folder / "mnt") as mount:
        target = str(mount.path / "db_password/latest/value")
        inside = subprocess.run(
            ["unshare", "--net", "sh", "-c",
             "ip link add veth0 type veth peer name veth1 && "
             "ip addr add 10.1.2.3/24 dev veth0 && ip link set veth0 up && "
             f"ip link set veth1 up && exec setpriv --reuid=4242 --regid=4242 --clear-groups "
             f"cat {target}"], capture_output=True, timeout=30)
        assert inside.returncode == 0, inside.stderr
        assert inside.stdout == value.encode()
        outside = as_user(4242, "cat", target)
        assert outside.returncode != 0 and b"Permission denied" in outside.stderr


def test_a_binary_bind_mounted_over_the_allowed_exe_is_refused(policed) -> None:
    store, folder = policed
    store.put("db_password", "pw-" + os.urandom(4).hex())
    store.config.write_text(store.config.read_text() + POLICY.format(exe=', exe: "/usr/bin/cat"')
                            .replace("uid: 4242", "uid: 65534"))
    with mounted(store, folder / "mnt") as mount:
        target = str(mount.path / "db_password/latest/value")
        assert as_user(65534, "/usr/bin/cat", target).returncode == 0  # the real cat
        probe = as_user(65534, "unshare", "-Urm", "true")
        if probe.returncode != 0:
            pytest.skip("unprivileged user namespaces are not available here")
        spoof = as_user(65534, "unshare", "-Urm", "sh", "-c",
                        f"mount --bind /usr/bin/head /usr/bin/cat && /usr/bin/cat {target}")
        assert spoof.returncode != 0 and b"Permission denied" in spoof.stderr
        denials = [json.loads(line) for line in (store.root / "audit.log").read_text()
                   .splitlines() if '"event":"denied"' in line]
        assert denials, "the denial was not audited"
        assert denials[-1]["caller"]["uid"] == 65534
        assert "is not the file at that path" in denials[-1]["reason"]


def read_in_cgroup(cgroup: Path | None, uid: int, target: str, *argv: str
                   ) -> subprocess.CompletedProcess[bytes]:
    """`cat TARGET` as *uid*, started inside *cgroup* (the shell moves itself, then execs)."""
    enter = f"echo $$ > {cgroup}/cgroup.procs && " if cgroup else ""
    command = " ".join(["exec setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                        *argv, "cat", target])
    return subprocess.run(["sh", "-c", enter + command], capture_output=True, timeout=30)


UNIT_POLICY = """\
principals:
  web: {{ uid: 4242, {matcher} }}
policies:
  web:
    allow:
      - {{ action: read, resources: ["*"] }}
"""


def audit_callers(store: Store) -> list[dict]:
    lines = (store.root / "audit.log").read_text().splitlines()
    return [json.loads(line)["caller"] for line in lines
            if json.loads(line)["event"] in ("read", "denied")]


def test_a_unit_principal_admits_processes_of_that_systemd_unit(policed, cgroups) -> None:
    store, folder = policed
    store.put("db_password", "pw-" + os.urandom(4).hex())
    store.config.write_text(store.config.read_text()
                            + UNIT_POLICY.format(matcher='unit: "web*.service"'))
    unit = cgroups("system.slice/web-api.service")
    other = cgroups("system.slice/cron.service")
    with mounted(store, folder / "mnt") as mount:
        target = str(mount.path / "db_password/latest/value")
        assert read_in_cgroup(unit, 4242, target).returncode == 0
        assert read_in_cgroup(other, 4242, target).returncode != 0
        assert read_in_cgroup(None, 4242, target).returncode != 0
    callers = audit_callers(store)
    assert [c.get("unit") for c in callers if c["uid"] == 4242][:2] == \
        ["web-api.service", "cron.service"]


def test_a_container_principal_admits_processes_of_that_container(policed, cgroups) -> None:
    store, folder = policed
    store.put("db_password", "pw-" + os.urandom(4).hex())
    ours, theirs = os.urandom(32).hex(), os.urandom(32).hex()
    store.config.write_text(store.config.read_text()
                            + UNIT_POLICY.format(matcher=f'container: "{ours[:12]}*"'))
    inside = cgroups(f"system.slice/docker-{ours}.scope")
    elsewhere = cgroups(f"system.slice/docker-{theirs}.scope")
    with mounted(store, folder / "mnt") as mount:
        target = str(mount.path / "db_password/latest/value")
        assert read_in_cgroup(inside, 4242, target).returncode == 0
        assert read_in_cgroup(elsewhere, 4242, target).returncode != 0
    callers = audit_callers(store)
    assert [c.get("container") for c in callers if c["uid"] == 4242][:2] == [ours, theirs]


def test_a_cmdline_principal_matches_the_real_command_line(policed) -> None:
    store, folder = policed
    store.put("db_password", "pw-" + os.urandom(4).hex())
    store.config.write_text(store.config.read_text()
                            + UNIT_POLICY.format(matcher='cmdline: "cat *db_password*"'))
    with mounted(store, folder / "mnt") as mount:
        target = str(mount.path / "db_password/latest/value")
        assert read_in_cgroup(None, 4242, target).returncode == 0
        # same uid, same file, another command line: not the principal
        assert as_user(4242, "head", "-c", "64", target).returncode != 0


def test_an_invalid_policy_on_sighup_is_rejected_with_its_line_and_the_old_one_answers(
        policed) -> None:
    store, folder = policed
    store.put("db_password", "pw-" + os.urandom(4).hex())
    store.put("other_secret", "no-" + os.urandom(4).hex())
    with_policy(store)
    good = store.config.read_text()
    bad = good + "    conditions:\n      - { type: ip_range, value: 10.0.0.0/33 }\n"
    bad_line = len(bad.splitlines())
    with mounted(store, folder / "mnt") as mount:
        allowed = str(mount.path / "db_password/latest/value")
        refused = str(mount.path / "other_secret/latest/value")
        store.config.write_text(bad)
        mount.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "config reload rejected" not in mount.log_text():
            time.sleep(0.05)
        rejected = next(line for line in mount.log_text().splitlines()
                        if "config reload rejected" in line)
        assert f"config.yaml:{bad_line}" in rejected
        assert as_user(4242, "cat", allowed).returncode == 0  # the old policy still answers
        assert as_user(4242, "cat", refused).returncode != 0
