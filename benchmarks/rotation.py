"""What rotation costs: rotations per second, and what a batch of them does to readers.

1. Throughput: 1,000 secrets on the embedded store, all due (their versions were made 31 days
   ago and they rotate every 30 days), no hooks: one `run_due` pass, timed — rotations/s.
2. Readers during a batch: the same kind of store behind a mount whose daemon starts with all
   1,000 due, so its scheduler rotates them at once; meanwhile this process reads one secret's
   file in a loop. The p50 of those reads is compared with the p50 of the same reads once the
   batch is over (idle), measured in the same run. Target (issue "Rotation"): ≤ 2×.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from read import secretfs_daemon

COUNT = 1000
MONTH = 30 * 86400
TARGET_RATIO = 2.0
CONFIG = (
    "secrets_manager:\n"
    "  backend: { type: local, path: store.db }\n"
    "  encryption: { provider: file, key_file: master.key }\n"
    "  audit: { path: audit.log }\n"
)


def build(folder: Path) -> Path:
    """A store of COUNT secrets made 31 days ago that rotate every 30 days: all due now."""
    from secretfs.backends.local import LocalBackend
    from secretfs.config import load_config
    from secretfs.crypto.keys import configured_master_key
    from secretfs.manager import SyncSecretsManager
    from secretfs.model import RotationPolicy, Secret

    config = folder / "config.yaml"
    config.write_text(CONFIG)
    SyncSecretsManager.from_config(load_config(config), create=True).close()
    key = configured_master_key(load_config(config).manager.encryption, create=False)
    made = time.time() - 31 * 86400
    backend = LocalBackend.open(folder / "store.db", key, clock=lambda: made)
    manager = SyncSecretsManager(backend)
    policy = RotationPolicy(interval=MONTH)
    for i in range(COUNT):
        manager.store(Secret(f"app{i % 10}/s{i:04d}", os.urandom(16).hex(), rotation=policy))
    manager.close()
    return config


def throughput() -> float:
    from secretfs.config import load_config
    from secretfs.manager import SyncSecretsManager

    with tempfile.TemporaryDirectory(prefix="secretfs-bench-rot-") as folder:
        config = build(Path(folder))
        with SyncSecretsManager.from_config(load_config(config)) as manager:
            start = time.perf_counter()
            results = manager.rotator(jitter=0).run_due()
            elapsed = time.perf_counter() - start
        assert sum(r.outcome == "rotated" for r in results) == COUNT, "not all rotated"
    return COUNT / elapsed


def rotated(store: Path) -> int:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM labels WHERE label = 'previous'").fetchone()[0]


def read_p50(path: Path, seconds: float,
             until: Callable[[], bool] | None = None) -> tuple[float, int]:
    """p50 (µs) of open+read+close of *path* for *seconds* (or until *until()* is true)."""
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end and not (until and until()):
        for _ in range(50):
            start = time.perf_counter_ns()
            with open(path, "rb") as file:
                file.read(4096)
            samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000, len(samples)


def during_batch() -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="secretfs-bench-rot-") as folder:
        root = Path(folder)
        config = build(root)
        mountpoint = root / "mnt"
        env = {**os.environ, "SECRETFS_CONFIG": str(config)}
        target = mountpoint / "app0/s0000/current/value"
        with secretfs_daemon(mountpoint, env, target):
            started = time.monotonic()
            busy, busy_n = read_p50(target, 60, until=lambda: rotated(root / "store.db") >= COUNT)
            batch = time.monotonic() - started
            idle, idle_n = read_p50(target, 2)
            print(f"  (reads: {busy_n} during the batch of {batch:.1f} s, {idle_n} idle)")
    return busy, idle


def main() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("benchmarks/rotation.py mounts a filesystem: run it as root")
    rate = throughput()
    print(f"Rotation, {COUNT} due secrets on the embedded store, no hooks")
    print(f"  throughput                {rate:8.0f} rotations/s (one run_due pass)")
    busy, idle = during_batch()
    ratio = busy / idle
    verdict = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"  daemon read p50 during the batch / idle = {ratio:.2f}× "
          f"({busy:.0f} / {idle:.0f} µs)  target ≤ {TARGET_RATIO:.0f}×  {verdict}")


if __name__ == "__main__":
    main()
