"""Rotation: the workflow, its failure and crash paths, schedules, and two rotators at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from secretfs.backends.local import LocalBackend
from secretfs.config import RotationSettings
from secretfs.crypto.keys import LocalMasterKey
from secretfs.errors import RotationFailed
from secretfs.manager import SyncSecretsManager
from secretfs.model import Label, RotationPolicy, RotationState, RotationStep, Secret
from tests.helpers import Store, make_store, one_line_error
from tests.mounting import mounted


def fresh() -> str:
    return "pw-" + os.urandom(10).hex()


def audit_lines(store: Store) -> list[dict]:
    return [json.loads(line) for line in (store.root / "audit.log").read_text().splitlines()]


def labels(store: Store, name: str) -> dict[str, int]:
    info = json.loads(store.cli("secrets", "info", name, "--json", check=True).stdout)
    return info["labels"]


# -- the workflow through the CLI -----------------------------------------------------------------


def test_rotate_moves_the_labels_and_keeps_the_other_keys(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    old = fresh()
    applied, env = tmp_path / "applied", tmp_path / "env"
    store.put("db", "--key", "user=app", "--key", f"password={old}", "--rotate-every", "30d",
              "--set-cmd", f'cat > {applied}; echo "$SECRETFS_NAME $SECRETFS_VERSION '
                           f'$SECRETFS_KEY" > {env}',
              "--validate-cmd", f"cmp -s - {applied}")
    done = store.cli("secrets", "rotate", "db")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"db: rotated (1 \xe2\x86\x92 2)\n"
    assert labels(store, "db") == {"current": 2, "previous": 1}
    new = json.loads(store.get("db"))
    assert new["user"] == "app" and new["password"] != old and len(new["password"]) == 32
    assert applied.read_text() == new["password"]  # the set hook got the new value on stdin
    assert env.read_text() == "db 2 password\n"
    assert json.loads(store.get("db/previous"))["password"] == old
    rotations = [r for r in audit_lines(store) if r["event"] == "rotate"]
    assert [(r["outcome"], r["from_version"], r["to_version"]) for r in rotations] == \
        [("rotated", 1, 2)]
    assert new["password"] not in (store.root / "audit.log").read_text()


def test_a_failing_validate_changes_nothing_and_exits_6_naming_the_step(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    value = fresh()
    store.put("db", value, "--rotate-every", "30d",
              "--validate-cmd", 'cat > /dev/null; echo "login refused for app" >&2; exit 1')
    before = audit_lines(store)
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    try:
        with mounted(store, folder / "mnt") as mount:
            target = mount.path / "db/latest/value"
            assert target.read_text() == value
            done = store.cli("secrets", "rotate", "db")
            assert done.returncode == 6
            assert "validate exited 1: login refused for app" in one_line_error(done)
            assert target.read_text() == value  # the mounted file never changed
            assert not (mount.path / "db/pending").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert store.get("db") == value.encode()
    assert labels(store, "db") == {"current": 1}  # pending discarded
    new_lines = [r for r in audit_lines(store)[len(before):] if r["event"] == "rotate"]
    assert len(new_lines) == 1 and new_lines[0]["outcome"] == "failed"
    assert new_lines[0]["step"] == "validate"
    assert "validate exited 1" in new_lines[0]["failure"]


def test_kill_9_during_a_slow_set_then_run_due_resumes_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.put("db", fresh(), "--rotate-every", "30d",
              "--set-cmd", f"if [ ! -e {tmp_path}/slow ]; then touch {tmp_path}/slow; "
                           f"sleep 60; fi; cat > {tmp_path}/applied")
    rotating = subprocess.Popen([sys.executable, "-m", "secretfs", "secrets", "rotate", "db"],
                                env=store.env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "slow").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(rotating.pid, signal.SIGKILL)  # mid-set: the hook has the value, current not
        rotating.wait()
    finally:
        os.killpg(rotating.pid, signal.SIGKILL)  # the orphaned hook too
    assert labels(store, "db") == {"current": 1, "pending": 2}
    resumed = store.cli("rotation", "run-due")
    assert resumed.returncode == 0, resumed.stderr
    assert b"db: resumed (1 \xe2\x86\x92 2)" in resumed.stdout
    assert labels(store, "db") == {"current": 2, "previous": 1}
    assert (tmp_path / "applied").read_bytes() == store.get("db")  # set ran again, to the end
    outcomes = [r["outcome"] for r in audit_lines(store) if r["event"] == "rotate"]
    assert outcomes == ["resumed"]
    assert store.cli("rotation", "run-due").stdout == b""  # nothing left to do


# -- the workflow in Python, with a clock ---------------------------------------------------------

T0 = datetime(2027, 1, 1, 0, 0, 1, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def manager_on(path: Path, clock: Clock) -> SyncSecretsManager:
    key = LocalMasterKey(b"k" * 32)
    backend = LocalBackend.open(path, key, create=True, clock=clock)
    return SyncSecretsManager(backend, rotation=RotationSettings(overlap=3600))


def test_crash_before_set_is_rolled_back(tmp_path: Path) -> None:
    clock = Clock()
    manager = manager_on(tmp_path / "s.db", clock)
    manager.store(Secret("api", "v1", rotation=RotationPolicy(interval=86400)))
    pending = manager.backend.write_version("api", b"half-made", label=Label.PENDING, cas=1)
    manager.backend.set_rotation_state("api", RotationState(
        pending, RotationStep.CREATED, "elsewhere:1", clock.now, clock.now))
    clock.now += 601  # the other host's lease ran out
    results = manager.rotator(clock=clock).run_due()
    assert [(r.outcome, r.new_version) for r in results] == [("rolled back", None)]
    metadata = manager.metadata("api")
    assert dict(metadata.labels) == {Label.CURRENT: 1}
    assert manager.backend.rotation_state("api") is None


def test_a_python_validator_can_refuse(tmp_path: Path) -> None:
    manager = manager_on(tmp_path / "s.db", Clock())
    manager.store(Secret("api", "v1"))
    seen = []

    def validator(name: str, value: bytes) -> bool:
        seen.append((name, len(value)))
        return False

    with pytest.raises(RotationFailed, match="validator"):
        manager.rotate("api", validator=validator)
    assert seen == [("api", 32)] and manager.metadata("api").current_version == 1


def test_a_cron_schedule_rotates_once_per_slot_and_once_after_downtime(tmp_path: Path) -> None:
    clock = Clock()
    manager = manager_on(tmp_path / "s.db", clock)
    manager.store(Secret("api", "v1", rotation=RotationPolicy(schedule="*/5 * * * *",
                                                               overlap=120)))
    rotator = manager.rotator(clock=clock, jitter=0)

    def run_at(offset: float) -> list[str]:
        clock.now = T0 + offset
        return [r.outcome for r in rotator.run_due()]

    assert run_at(60) == []
    assert run_at(298) == []  # T0 is 00:00:01, the slot is at 00:05:00
    assert run_at(299) == ["rotated"]
    assert run_at(299) == []  # once per slot
    assert run_at(300) == []
    assert run_at(400) == []
    assert Label.PREVIOUS in manager.metadata("api").labels  # within the overlap
    assert run_at(421) == []
    assert Label.PREVIOUS not in manager.metadata("api").labels  # overlap (120 s) is over
    assert run_at(600) == ["rotated"]
    # down across three slots (00:15, 00:20, 00:25): one rotation on start, not three
    assert run_at(600 + 3 * 300 + 10) == ["rotated"]
    assert run_at(600 + 3 * 300 + 20) == []
    assert manager.metadata("api").current_version == 4
    # next: previous goes at the end of the overlap, before the 00:30 slot
    assert rotator.next_wakeup() == pytest.approx(T0 + 1510 + 120)
    assert run_at(1510 + 121) == [] and Label.PREVIOUS not in manager.metadata("api").labels
    assert rotator.next_wakeup() == pytest.approx(T0 - 1 + 1800)  # the 00:30 slot


def test_jitter_spreads_secrets_on_one_schedule(tmp_path: Path) -> None:
    from secretfs.rotation.schedule import due_at

    manager = manager_on(tmp_path / "s.db", Clock())
    for i in range(50):
        manager.store(Secret(f"s{i}", "v", rotation=RotationPolicy(schedule="0 * * * *")))
    settings = RotationSettings()
    times = {due_at(m, settings) for m in manager.backend.list()}
    assert len(times) > 40  # spread...
    assert all(0 <= t - (T0 - 1 + 3600) <= 30 for t in times)  # ...by at most 30 s


def test_two_rotators_on_one_store_make_one_new_version(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.put("db", fresh(), "--rotate-every", "1s", "--set-cmd", "cat > /dev/null; sleep 0.5")
    time.sleep(1.2)
    runs = [subprocess.Popen([sys.executable, "-m", "secretfs", "rotation", "run-due"],
                             env=store.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    versions = json.loads(store.cli("secrets", "versions", "db", "--json", check=True).stdout)
    assert len(versions) == 2  # one rotation, not two
    assert labels(store, "db") == {"current": 2, "previous": 1}


# -- the daemon's scheduler -----------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="real mounts need root and /dev/fuse")
def test_the_daemon_rotates_what_falls_due_and_the_mount_follows(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    first = fresh()
    store.put("db", first, "--rotate-every", "2s")
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    try:
        with mounted(store, folder / "mnt") as mount:
            target = mount.path / "db/latest/value"
            deadline = time.monotonic() + 10
            while target.read_text() == first:
                assert time.monotonic() < deadline, "not rotated within 10 s"
                time.sleep(0.2)
            assert (mount.path / "db/previous/value").read_text() == first
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_put_sets_the_generator_and_the_rotated_key(tmp_path: Path) -> None:
    import uuid

    store = make_store(tmp_path)
    store.put("token", "--generate", "--kind", "uuid")
    assert uuid.UUID(store.get("token").decode()).version == 4
    store.put("db", "--key", "user=app", "--key", "pin=0000", "--rotate-every", "30d",
              "--rotate-key", "pin", "--charset", "numeric", "--length", "6", "--max-age", "60d")
    info = json.loads(store.cli("secrets", "info", "db", "--json", check=True).stdout)
    assert info["rotation"]["key"] == "pin" and info["rotation"]["max_age"] == 60 * 86400
    store.cli("secrets", "rotate", "db", check=True)
    rotated = json.loads(store.get("db"))
    assert rotated["user"] == "app" and rotated["pin"].isdigit() and len(rotated["pin"]) == 6
    refused = store.cli("secrets", "put", "x", "--generate", "--charset", "custom:a")
    assert refused.returncode == 2


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="real mounts need root and /dev/fuse")
def test_pending_appears_under_the_mount_while_a_rotation_runs(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    store.put("db", fresh(), "--rotate-every", "30d",
              "--set-cmd", f"cat > /dev/null; touch {tmp_path}/setting; sleep 2")
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    try:
        with mounted(store, folder / "mnt") as mount:
            rotating = subprocess.Popen([sys.executable, "-m", "secretfs", "secrets", "rotate",
                                         "db"], env=store.env(), stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while not (mount.path / "db/pending/value").exists():
                assert time.monotonic() < deadline, "pending never appeared"
                time.sleep(0.05)
            assert rotating.wait(timeout=30) == 0
            deadline = time.monotonic() + 5
            while (mount.path / "db/pending").exists():
                assert time.monotonic() < deadline, "pending did not go away"
                time.sleep(0.05)
            assert (mount.path / "db/previous/value").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
