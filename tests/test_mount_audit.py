"""Auditing through a real mount: a line per open and per denial, no value, tamper-evident."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.helpers import make_store, one_line_error
from tests.mounting import as_user, mounted

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="real mounts need root and /dev/fuse")


def test_every_open_and_denial_is_one_line_and_the_chain_holds(tmp_path: Path) -> None:
    store = make_store(tmp_path / "store")
    value = "pw-" + os.urandom(8).hex()
    store.put("db", value)
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    folder.chmod(0o755)
    try:
        with mounted(store, folder / "mnt") as mount:
            target = mount.path / "db/latest/value"
            for _ in range(3):
                assert target.read_text() == value
            denied = as_user(4242, "cat", str(target))
            assert denied.returncode != 0
            # the denial is on disk at once, before any flush
            lines = (store.root / "audit.log").read_text().splitlines()
            assert any(json.loads(line)["event"] == "denied" for line in lines)
        # stopped: everything flushed
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log = store.root / "audit.log"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    reads = [r for r in records if r["event"] == "read" and r["resource"] == "db"]
    denials = [r for r in records if r["event"] == "denied"]
    assert len(reads) == 3 and len(denials) == 1
    assert denials[0]["caller"]["uid"] == 4242 and denials[0]["decision"] == "deny"
    assert reads[0]["caller"]["pid"] and reads[0]["principal"] == "root"
    assert value not in log.read_text()
    assert oct(log.stat().st_mode & 0o777) == oct(0o600)

    verified = store.cli("audit", "verify")
    assert verified.returncode == 0 and b"intact" in verified.stdout
    shown = json.loads(store.cli("audit", "tail", "-n", "2", "--json", check=True).stdout)
    assert len(shown) == 2

    lines = log.read_text().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if '"event":"denied"' in line)
    lines[victim] = lines[victim].replace('"uid":4242', '"uid":4243')
    log.write_text("".join(lines))
    tampered = store.cli("audit", "verify")
    assert tampered.returncode == 1
    assert f"audit.log:{victim + 1}:" in one_line_error(tampered)


def test_reads_fail_closed_while_the_audit_log_cannot_be_written(tmp_path: Path) -> None:
    import errno
    import time

    store = make_store(tmp_path / "store")
    value = "pw-" + os.urandom(8).hex()
    store.put("db", value)
    log = store.root / "audit.log"
    folder = Path(tempfile.mkdtemp(prefix="secretfs-test-"))
    try:
        with mounted(store, folder / "mnt") as mount:
            target = mount.path / "db/latest/value"
            assert target.read_text() == value
            log.rename(store.root / "audit.log.moved")
            log.mkdir()  # the daemon can no longer append: EISDIR, even as root
            target.read_text()  # buffered; the flusher (every second) finds out
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and "cannot be written" not in mount.log_text():
                time.sleep(0.05)
            assert "cannot be written" in mount.log_text()
            with pytest.raises(OSError) as refused:
                target.read_text()
            assert refused.value.errno == errno.EIO
            log.rmdir()
            (store.root / "audit.log.moved").rename(log)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    assert target.read_text() == value
                    break
                except OSError:
                    time.sleep(0.1)
            assert target.read_text() == value
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert value not in log.read_text()
    assert store.cli("audit", "verify").returncode == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    reads = [(r["event"], r["decision"]) for r in records if r["resource"] == "db"
             and r["event"] in ("read", "denied")]
    # the refused read is on record as refused, and why (written once the disk was back)
    assert ("denied", "deny") in reads and reads[:2] == [("read", "allow")] * 2
    assert any("audit log could not be written" in r["reason"] for r in records)
