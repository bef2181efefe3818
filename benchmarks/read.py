"""How much a warm read through the secretfs mount costs, as ratios to baselines in the same run.

Baselines, all measured in this run: the same 32-byte file on tmpfs (/dev/shm), and the floor
(benchmarks/floor.py: a bare pyfuse3 filesystem serving one constant file with secretfs's mount
options and kernel-cache settings). Whatever secretfs costs above the floor is its own work per
open: caller identity, policy decision, audit append, snapshot.

Each measurement is one child process (a normal reader) looping open + read(4096) + close for
about a second and reporting every iteration's time; targets take turns, round after round, so
that noise on this shared machine hits each alike. Results are percentiles of all samples.
Targets:
  warm read      secretfs p50 ≤ 1.3× the floor's p50
  policy         the same reads decided by a 50-rule policy ≤ 1.15× the built-in policy's
  concurrency    4 readers at once: aggregate opens/s ≥ one reader's; p99 ≤ 5× p50
  scale          daemon RSS ≤ 300 MB and `ls` of the top folder ≤ 3 s with 1k (and, with
                 --large, 100k) secrets; a warm open at 100k within 1.2× of one at 1k

    python benchmarks/read.py               # 1k secrets; the 100k row needs --large
    python benchmarks/read.py --large       # also a 100k-secret store (takes minutes to build)
    python benchmarks/read.py --floor-only  # tmpfs and the floor only (no secretfs)
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = Path(__file__).resolve().parent / "floor.py"
VALUE_SIZE = 32
MOUNT_TIMEOUT = 30.0
TARGET_FLOOR_RATIO = 1.3
TARGET_TAIL_RATIO = 5.0
TARGET_RSS_MB = 300.0
TARGET_LS_SECONDS = 3.0
TARGET_SCALE_RATIO = 1.2
TARGET_POLICY_RATIO = 1.15
POLICY_LABEL = "secretfs 50-rule policy"
# The reader (root) is principal `bench`; 49 rules that do not match come before the one that does.
FIFTY_RULES = "principals:\n  bench: { uid: 0 }\npolicies:\n  bench:\n    allow:\n" + "".join(
    f"      - {{ action: read, resources: [\"team{i}/*\"] }}\n" for i in range(49)
) + "      - { action: [read, list], resources: [\"bench/*\", \"s*\"] }\n"
CONFIG = (
    "secrets_manager:\n"
    "  backend: { type: local, path: store.db }\n"
    "  encryption: { provider: file, key_file: master.key }\n"
    "  audit: { path: audit.log }\n"
)

# The measured process: a plain reader. argv: path, seconds, start (wall clock), expected hex.
# Writes to stdout: start and end (wall clock, two doubles), then one int64 ns per iteration.
READER = r"""
import os, sys, time
from array import array
path, seconds, start_at, expected = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), \
    bytes.fromhex(sys.argv[4])
fd = os.open(path, os.O_RDONLY)
data = os.read(fd, 4096)
os.close(fd)
if data != expected:
    sys.exit(f"{path}: read {len(data)} bytes that differ from the stored value")
warm_until = time.perf_counter() + 0.05
while time.perf_counter() < warm_until:
    fd = os.open(path, os.O_RDONLY); os.read(fd, 4096); os.close(fd)
while time.time() < start_at:
    pass
samples = array("q")
clock = time.perf_counter_ns
began = time.time()
now = clock()
end = now + int(seconds * 1e9)
while now < end:
    fd = os.open(path, os.O_RDONLY)
    os.read(fd, 4096)
    os.close(fd)
    later = clock()
    samples.append(later - now)
    now = later
out = sys.stdout.buffer
out.write(array("d", [began, time.time()]).tobytes())
out.write(samples.tobytes())
"""


class BenchError(Exception):
    """A failure to set up or measure, with a message for the user."""


@dataclass
class Target:
    label: str
    path: Path
    expected: bytes


@dataclass
class Run:
    """One reader's result."""

    began: float
    ended: float
    samples: array


@dataclass
class Mounted:
    label: str
    mountpoint: Path
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Store:
    config: Path
    value: bytes
    count: int
    names: list[str] = field(default_factory=list)


# -- measuring --------------------------------------------------------------------------------


def start_readers(target: Target, seconds: float, count: int) -> list[subprocess.Popen[bytes]]:
    start_at = time.time() + 0.3 + 0.1 * count  # after every reader has started and warmed up
    return [subprocess.Popen([sys.executable, "-I", "-c", READER, str(target.path),
                              str(seconds), repr(start_at), target.expected.hex()],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(count)]


def collect(target: Target, readers: list[subprocess.Popen[bytes]]) -> list[Run]:
    runs = []
    for reader in readers:
        output, errors = reader.communicate()
        if reader.returncode != 0:
            raise BenchError(f"reader of {target.label} ({target.path}) failed "
                             f"(exit {reader.returncode}): {errors.decode().strip()[-500:]}")
        head = 2 * struct.calcsize("d")
        began, ended = struct.unpack("2d", output[:head])
        samples = array("q")
        samples.frombytes(output[head:])
        runs.append(Run(began, ended, samples))
    return runs


def measure(target: Target, seconds: float, count: int = 1) -> list[Run]:
    readers = start_readers(target, seconds, count)
    try:
        return collect(target, readers)
    finally:
        for reader in readers:
            if reader.poll() is None:
                reader.kill()
                reader.wait()


def percentile(ordered: Sequence[int], p: float) -> float:
    return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])


@dataclass
class Latency:
    p50: float
    p99: float
    per_second: float  # one reader's opens per second
    round_p50: list[float] = field(default_factory=list)  # each round's own p50


def latency(samples: array) -> Latency:
    ordered = sorted(samples)
    return Latency(percentile(ordered, 0.50), percentile(ordered, 0.99),
                   len(ordered) / (sum(ordered) / 1e9))


def warm_reads(targets: list[Target], rounds: int, seconds: float) -> dict[str, Latency]:
    for target in targets:  # the first opens fill the caches; these samples are dropped
        measure(target, 0.2)
    samples: dict[str, array] = {target.label: array("q") for target in targets}
    round_p50: dict[str, list[float]] = {target.label: [] for target in targets}
    for number in range(rounds):
        turn = number % len(targets)  # rotate the order so no target always goes first
        for target in targets[turn:] + targets[:turn]:
            for run in measure(target, seconds):
                samples[target.label].extend(run.samples)
                round_p50[target.label].append(statistics.median(run.samples))
    results = {label: latency(values) for label, values in samples.items()}
    for label, result in results.items():
        result.round_p50 = round_p50[label]
    return results


@dataclass
class Concurrency:
    single: float  # opens/s, one reader (median of rounds)
    aggregate: float  # opens/s, all readers together (median of rounds)
    p50: float
    p99: float


def concurrency(targets: list[Target], readers: int, rounds: int, seconds: float
                ) -> dict[str, Concurrency]:
    single: dict[str, list[float]] = {target.label: [] for target in targets}
    aggregate: dict[str, list[float]] = {target.label: [] for target in targets}
    pooled: dict[str, array] = {target.label: array("q") for target in targets}
    for _ in range(rounds):
        for target in targets:
            (run,) = measure(target, seconds)
            single[target.label].append(len(run.samples) / (run.ended - run.began))
            runs = measure(target, seconds, readers)
            window = max(run.ended for run in runs) - min(run.began for run in runs)
            aggregate[target.label].append(sum(len(run.samples) for run in runs) / window)
            for run in runs:
                pooled[target.label].extend(run.samples)
    result = {}
    for target in targets:
        ordered = sorted(pooled[target.label])
        result[target.label] = Concurrency(
            statistics.median(single[target.label]), statistics.median(aggregate[target.label]),
            percentile(ordered, 0.50), percentile(ordered, 0.99))
    return result


def time_ls(folder: Path, times: int = 3) -> list[float]:
    durations = []
    for _ in range(times):
        start = time.perf_counter()
        subprocess.run(["ls", str(folder)], stdout=subprocess.DEVNULL, check=True,
                       timeout=300)
        durations.append(time.perf_counter() - start)
    return durations


# -- stores and mounts ------------------------------------------------------------------------


def secretfs_env(config: Path) -> dict[str, str]:
    return {**os.environ, "SECRETFS_CONFIG": str(config)}


def build_store(folder: Path, extra: int) -> Store:
    """A local store with bench/value (32 random bytes) and *extra* more secrets at the top."""
    folder.mkdir()
    config = folder / "config.yaml"
    config.write_text(CONFIG)
    value = secrets.token_bytes(VALUE_SIZE)
    value_file = folder / "value.bin"
    value_file.write_bytes(value)
    env = secretfs_env(config)
    for argv in (["init"], ["secrets", "put", "bench/value", "--from-file", str(value_file)]):
        result = subprocess.run([sys.executable, "-m", "secretfs", *argv], env=env, cwd=ROOT,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise BenchError(f"secretfs {' '.join(argv)} failed: "
                             f"{(result.stderr or result.stdout).strip()}")
    value_file.unlink()

    from secretfs.config import load_config
    from secretfs.manager import SyncSecretsManager
    from secretfs.model import Secret

    names = [f"s{i:06d}" for i in range(extra)]
    with SyncSecretsManager.from_config(load_config(config)) as manager:
        for name in names:
            manager.store(Secret(name, secrets.token_hex(VALUE_SIZE // 2)))
    return Store(config, value, extra, names)


def mounted_points() -> set[str]:
    with open("/proc/self/mounts") as mounts:
        return {line.split()[1] for line in mounts}


def is_mounted(mountpoint: Path) -> bool:
    return str(mountpoint) in mounted_points()


def wait_until_answering(mount: Mounted, probe: Path, expected: bytes) -> None:
    """Until *probe* reads back *expected* through the mount, or MOUNT_TIMEOUT."""
    deadline = time.monotonic() + MOUNT_TIMEOUT
    problem = "not mounted"
    while time.monotonic() < deadline:
        if mount.process.poll() is not None:
            raise BenchError(f"{mount.label} exited (code {mount.process.returncode}) before "
                             f"answering at {mount.mountpoint}: {tail(mount.log)}")
        if is_mounted(mount.mountpoint) and os.path.ismount(mount.mountpoint):
            try:  # in a child: a mount that never answers must not hang this process
                result = subprocess.run(["cat", str(probe)], capture_output=True,
                                        timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problem = f"reading {probe} did not return"
                break
            if result.returncode == 0 and result.stdout == expected:
                return
            problem = (f"reading {probe}: {result.stderr.decode().strip()}"
                       if result.returncode else f"{probe} holds other bytes than stored")
        time.sleep(0.1)
    raise BenchError(f"{mount.label} did not answer at {mount.mountpoint} within "
                     f"{MOUNT_TIMEOUT:.0f} s ({problem}); its log: {tail(mount.log)}")


def tail(log: Path, lines: int = 8) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n  ".join(["", *text[-lines:]]) if text else "(empty)"


@contextmanager
def mounted(label: str, argv: list[str], mountpoint: Path, log: Path,
            env: dict[str, str] | None = None) -> Iterator[Mounted]:
    """Run a FUSE daemon in the foreground for the block; always stop it and unmount."""
    mountpoint.mkdir()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   cwd=ROOT, start_new_session=True,  # ^C reaches us only
                                   preexec_fn=_stop_with_parent)
    try:
        yield Mounted(label, mountpoint, process, log)
    finally:
        stop(process)
        if is_mounted(mountpoint):
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


@contextmanager
def secretfs_daemon(mountpoint: Path, env: dict[str, str], ready: Path) -> Iterator[Mounted]:
    """`secretfs mount --foreground` at *mountpoint* for the block, from the moment *ready*
    (a path under it) exists; the other benchmarks use it too."""
    argv = [sys.executable, "-m", "secretfs", "mount", str(mountpoint), "--foreground"]
    log = mountpoint.with_name(mountpoint.name + ".log")
    with mounted("secretfs", argv, mountpoint, log, env) as mount:
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not ready.exists():
            if mount.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"secretfs did not come up at {mountpoint}: {tail(log)}")
            time.sleep(0.05)
        yield mount


def _stop_with_parent() -> None:
    """In the daemon before exec: SIGTERM it if this benchmark dies without its cleanup (e.g.
    SIGKILL), so that it unmounts itself instead of leaving a mount behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


# -- output -----------------------------------------------------------------------------------


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def thousands(count: int) -> str:
    return f"{count // 1000}k" if count >= 1000 and count % 1000 == 0 else str(count)


def report_reads(results: dict[str, Latency], rounds: int, seconds: float,
                 floor: str, tmpfs: str, secretfs: list[str]) -> None:
    print(f"Warm read: open + read + close of a 32-byte file, one reader process, "
          f"{rounds} interleaved rounds × {seconds:g} s per target (µs for context; the ratios "
          f"are the result)")
    print(f"  {'target':<24} {'p50 µs':>8} {'p99 µs':>8} {'opens/s':>9} {'vs floor':>9} "
          f"{'vs tmpfs':>9}")
    base, tmp = results[floor].p50, results[tmpfs].p50
    for label, result in results.items():
        note = ""
        if label in secretfs:
            ratio = result.p50 / base
            note = f"  target ≤ {TARGET_FLOOR_RATIO}×  {verdict(ratio <= TARGET_FLOOR_RATIO)}"
        print(f"  {label:<24} {result.p50 / 1e3:8.1f} {result.p99 / 1e3:8.1f} "
              f"{result.per_second:9,.0f} {result.p50 / base:8.2f}× {result.p50 / tmp:8.1f}×"
              f"{note}")


def report_concurrency(results: dict[str, Concurrency], readers: int, rounds: int,
                       seconds: float, targeted: list[str]) -> None:
    print(f"Concurrency: {readers} readers at once vs 1 reader, {seconds:g} s each, median of "
          f"{rounds} rounds; {os.cpu_count()} CPUs")
    for label, result in results.items():
        scale = result.aggregate / result.single
        tail_ratio = result.p99 / result.p50
        aims = label in targeted
        print(f"  {label:<24} aggregate/single {scale:5.2f}× "
              f"({result.aggregate:,.0f} vs {result.single:,.0f} opens/s)"
              + (f"  target ≥ 1×  {verdict(scale >= 1.0)}" if aims else ""))
        print(f"  {'':<24} p99/p50 over all readers {tail_ratio:5.2f}× "
              f"({result.p99 / 1e3:.1f} / {result.p50 / 1e3:.1f} µs)"
              + (f"  target ≤ {TARGET_TAIL_RATIO:.0f}×  {verdict(tail_ratio <= TARGET_TAIL_RATIO)}"
                 if aims else ""))


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="seconds per target per round (default 1)")
    parser.add_argument("--readers", type=int, default=4, help="concurrent readers (default 4)")
    parser.add_argument("--concurrency-rounds", type=int, default=3)
    parser.add_argument("--concurrency-seconds", type=float, default=2.0)
    parser.add_argument("--secrets", type=int, default=1000,
                        help="secrets in the store of the main rows (default 1000)")
    parser.add_argument("--large", action="store_true",
                        help="also build and mount a 100,000-secret store for the scale row")
    parser.add_argument("--large-secrets", type=int, default=100_000, help=argparse.SUPPRESS)
    parser.add_argument("--floor-only", action="store_true",
                        help="measure tmpfs and the floor only (secretfs is not mounted)")
    options = parser.parse_args()

    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        print("read benchmark: needs /dev/fuse and fusermount3 (apt-get install fuse3)",
              file=sys.stderr)
        return 1
    # SIGTERM (e.g. a CI timeout) unwinds like ^C, so every mount below is undone.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        run(options)
    except BenchError as error:
        print(f"read benchmark: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("read benchmark: interrupted; mounts undone", file=sys.stderr)
        return 130
    return 0


def run(options: argparse.Namespace) -> None:
    with ExitStack() as stack:  # unwinds in reverse: daemons stop before their folders go
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="secretfs-read-")))
        shm = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="secretfs-read-",
                                                                   dir="/dev/shm")))
        from floor import VALUE as FLOOR_VALUE  # benchmarks/ is sys.path[0]

        tmpfs_value = secrets.token_bytes(VALUE_SIZE)
        (shm / "value").write_bytes(tmpfs_value)
        tmpfs = Target("tmpfs (/dev/shm)", shm / "value", tmpfs_value)
        floor_mount = stack.enter_context(mounted(
            "floor", [sys.executable, str(FLOOR), str(folder / "floor")], folder / "floor",
            folder / "floor.log"))
        floor = Target("floor (bare pyfuse3)", floor_mount.mountpoint / "value", FLOOR_VALUE)
        wait_until_answering(floor_mount, floor.path, floor.expected)
        targets = [tmpfs, floor]
        stores: dict[str, tuple[Store, Mounted]] = {}
        if not options.floor_only:
            sizes = [options.secrets] + ([options.large_secrets] if options.large else [])
            for size in sizes:
                label = f"secretfs {thousands(size)}"
                started = time.perf_counter()
                if size >= 10_000:
                    print(f"(building a {size:,}-secret store …)", file=sys.stderr, flush=True)
                store = build_store(folder / f"store-{size}", size)
                built = time.perf_counter() - started
                if size >= 10_000:
                    print(f"(built in {built:.0f} s)", file=sys.stderr, flush=True)
                mount = stack.enter_context(mounted(
                    label, [sys.executable, "-m", "secretfs", "mount", str(folder / f"mnt-{size}"),
                            "--foreground"],
                    folder / f"mnt-{size}", folder / f"mount-{size}.log",
                    secretfs_env(store.config)))
                target = Target(label, mount.mountpoint / "bench" / "value" / "latest" / "value",
                                store.value)
                wait_until_answering(mount, target.path, target.expected)
                stores[label] = (store, mount)
                targets.append(target)
                if size == options.secrets:  # the same store, decided by a 50-rule policy
                    policed = store.config.with_name("policy.yaml")
                    policed.write_text(CONFIG + FIFTY_RULES)
                    mount = stack.enter_context(mounted(
                        POLICY_LABEL, [sys.executable, "-m", "secretfs", "mount",
                                       str(folder / "mnt-policy"), "--foreground"],
                        folder / "mnt-policy", folder / "mount-policy.log",
                        secretfs_env(policed)))
                    policy_target = Target(POLICY_LABEL, mount.mountpoint / "bench" / "value"
                                           / "latest" / "value", store.value)
                    wait_until_answering(mount, policy_target.path, policy_target.expected)
                    targets.append(policy_target)

        secretfs_labels = list(stores)
        main_label = secretfs_labels[0] if secretfs_labels else None
        reads = warm_reads(targets, options.rounds, options.seconds)
        contended = [floor] + [t for t in targets if t.label == main_label]
        together = concurrency(contended, options.readers, options.concurrency_rounds,
                               options.concurrency_seconds)

        # Scale: `ls` of the top folder (all the extra secrets sit there), then the daemon's RSS.
        scale: dict[str, tuple[list[float], list[float], float]] = {}
        for label, (store, mount) in stores.items():
            baseline = shm / f"ls-{store.count}"
            baseline.mkdir()
            for name in [*store.names, "bench"]:
                (baseline / name).touch()
            listing = time_ls(mount.mountpoint)
            scale[label] = (listing, time_ls(baseline), rss_mb(mount.process.pid))
            shutil.rmtree(baseline)

        report_reads(reads, options.rounds, options.seconds, floor.label, tmpfs.label,
                     secretfs_labels)
        if main_label:
            ratio = reads[main_label].p50 / reads[floor.label].p50
            each = [ours / base for ours, base in zip(reads[main_label].round_p50,
                                                      reads[floor.label].round_p50,
                                                      strict=True)]
            print(f"  {main_label} p50 / floor p50 = {ratio:.2f}× (rounds {min(each):.2f}–"
                  f"{max(each):.2f}×)  target ≤ {TARGET_FLOOR_RATIO}×  "
                  f"{verdict(ratio <= TARGET_FLOOR_RATIO)};  / tmpfs p50 = "
                  f"{reads[main_label].p50 / reads[tmpfs.label].p50:.1f}× (no target)")
        else:
            print("  secretfs not measured (--floor-only)")
        if POLICY_LABEL in reads and main_label:
            ratio = reads[POLICY_LABEL].p50 / reads[main_label].p50
            print(f"  {POLICY_LABEL} p50 / built-in policy p50 = {ratio:.2f}×  target ≤ "
                  f"{TARGET_POLICY_RATIO}×  {verdict(ratio <= TARGET_POLICY_RATIO)} "
                  "(both audit every open)")
        report_concurrency(together, options.readers, options.concurrency_rounds,
                           options.concurrency_seconds, [main_label] if main_label else [])
        if not scale:
            return
        print("Scale: the extra secrets all sit in the top folder; `ls` is the median of 3 (the "
              "target applies to the slowest), against `ls` of a tmpfs folder of as many files")
        for label, (listing, baseline, rss) in scale.items():
            ls_time = statistics.median(listing)
            print(f"  {label:<24} daemon RSS {rss:6.1f} MB  target ≤ {TARGET_RSS_MB:.0f} MB  "
                  f"{verdict(rss <= TARGET_RSS_MB)}")
            slowest = max(listing)
            print(f"  {'':<24} ls {ls_time:6.3f} s (slowest {slowest:.3f}) = "
                  f"{ls_time / statistics.median(baseline):.0f}× tmpfs  "
                  f"target ≤ {TARGET_LS_SECONDS:.0f} s  {verdict(slowest <= TARGET_LS_SECONDS)}")
        if len(secretfs_labels) > 1:
            large = secretfs_labels[-1]
            ratio = reads[large].p50 / reads[main_label].p50
            print(f"  warm open p50 at {large.split()[-1]} / at {main_label.split()[-1]} = "
                  f"{ratio:.2f}×  target ≤ {TARGET_SCALE_RATIO}×  "
                  f"{verdict(ratio <= TARGET_SCALE_RATIO)}")
        else:
            print(f"  the {thousands(options.large_secrets)} row (RSS, ls, warm open vs "
                  f"{main_label.split()[-1]}) needs --large (building that store takes minutes)")


if __name__ == "__main__":
    sys.exit(main())
