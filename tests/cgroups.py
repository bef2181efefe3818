"""Real cgroups for tests: ``/proc/PID/cgroup`` of a process moved into one shows it, which is
how the daemon learns a caller's systemd unit or container (secretfs/access/identity.py).

Use the ``cgroups`` fixture (``from tests.cgroups import cgroups``): ``cgroups("system.slice/
docker-<id>.scope")`` makes that cgroup under a private test folder of the cgroup2 hierarchy;
after the test every process left in it is killed and the folders are removed. Tests skip when no
cgroup2 hierarchy is mounted or a cgroup cannot be created.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest


def cgroup2_root() -> Path | None:
    """Where the unified (v2) cgroup hierarchy is mounted, if anywhere."""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] == "cgroup2":
                return Path(fields[1])
    return None


@pytest.fixture
def cgroups():
    """Makes cgroups (real ones: /proc/PID/cgroup shows them) and removes them after the test."""
    root = cgroup2_root()
    if root is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    base = root / f"secretfs-test-{os.getpid()}-{os.urandom(3).hex()}"
    made: list[Path] = []

    def make(name: str) -> Path:
        path = base / name
        try:
            path.mkdir(parents=True)
        except OSError as error:
            pytest.skip(f"cannot create a cgroup: {error}")
        made.append(path)
        return path

    try:
        yield make
    finally:
        for path in made:
            for pid in (path / "cgroup.procs").read_text().split():
                os.kill(int(pid), signal.SIGKILL)
        # deepest first; a cgroup can be removed once its processes are gone (rmdir, even
        # though it shows control files)
        for folder, _, _ in sorted(os.walk(base), key=lambda entry: -len(entry[0])):
            deadline = time.monotonic() + 5
            while True:
                try:
                    os.rmdir(folder)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
