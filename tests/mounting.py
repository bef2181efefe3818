"""Real mounts for tests: start `secretfs mount --foreground`, wait until it answers, and
always unmount — on success, failure or interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import Store

MOUNT_TIMEOUT = 20.0


@dataclass
class Mount:
    path: Path
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stats(self) -> dict:
        import json

        return json.loads((self.path / ".secretfs" / "stats").read_text())


def is_mounted(path: Path) -> bool:
    return any(line.split()[1] == str(path) for line in Path("/proc/mounts").read_text()
               .splitlines())


def force_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-uz", str(path)], capture_output=True)


def wait_until_answering(path: Path, process: subprocess.Popen[bytes] | None, log: Path,
                         timeout: float = MOUNT_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"mount exited {process.returncode}: {log.read_text()[-2000:]}")
        if is_mounted(path):
            try:
                os.listdir(path)  # reaches the daemon (a stat may be answered from cache)
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"mount did not answer in {timeout}s: {log.read_text()[-2000:]}")


def start(store: Store, path: Path, log: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    path.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "secretfs", "mount", str(path), "--foreground"],
            env=env or store.env(), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
        )
    wait_until_answering(path, process, log)
    return process


def stop(mount: Mount, timeout: float = 10.0) -> int | None:
    """SIGTERM the daemon and wait; returns its exit code (None if it had to be killed)."""
    code = None
    if mount.process.poll() is None:
        mount.process.send_signal(signal.SIGTERM)
        try:
            code = mount.process.wait(timeout)
        except subprocess.TimeoutExpired:
            mount.process.kill()
            mount.process.wait()
    else:
        code = mount.process.returncode
    force_unmount(mount.path)
    return code


@contextmanager
def mounted(store: Store, path: Path, env: dict[str, str] | None = None) -> Iterator[Mount]:
    log = path.parent / f"{path.name}.log"
    try:
        process = start(store, path, log, env)
    except BaseException:
        force_unmount(path)
        raise
    mount = Mount(path, process, log)
    try:
        yield mount
    finally:
        stop(mount)


def as_user(uid: int, *argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run a command as another uid/gid with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        capture_output=True, timeout=30,
    )
