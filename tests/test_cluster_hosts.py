"""Two hosts in front of a real three-node OpenBao Raft cluster (tests/cluster.py), each with
its own store folder, config, CLI and real FUSE mount: the cluster's acceptance lines.

1. SIGKILL of the active node: cached reads on both mounts never fail, an uncached read
   succeeds within one request timeout, a ``secrets put`` through each host's CLI succeeds
   soon after the new leader is elected, and both mounts see it within the poll interval.
2. A rotation that falls due on both hosts while there is no leader happens exactly once,
   after the election (each host's daemon runs its own scheduler, as in a deployment).
3. The whole cluster stopped: cached reads go on (marked ``user.secretfs.stale``), an uncached
   read fails with EIO within the timeout, ``secretfs doctor`` says "backend unreachable";
   after a restart reads are fresh again without a remount.

Host A lists the nodes as 0, 1, 2 and host B as 2, 1, 0, so they do not both stick to one node.
Values are generated and compared, never printed; the timings are printed (run with ``-s``).
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from tests.cluster import Cluster, cluster  # noqa: F401  (the fixture)
from tests.helpers import Store, make_store
from tests.mounting import Mount, mounted
from tests.openbao import requires_openbao

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="real mounts need root and /dev/fuse"),
    requires_openbao,
]

REQUEST_TIMEOUT = 3.0  # backend.timeout: one HTTP request, failover included
BACKEND_TIMEOUT = 3.5  # secrets_manager.backend_timeout: the daemon's bound on one backend read
SLACK = 1.0
READ_BOUND = REQUEST_TIMEOUT + SLACK  # an uncached read after a SIGKILL, or its EIO in an outage
POLL = 1.0  # cache.poll_interval
VISIBLE_BOUND = POLL + 1.5  # a write made through one host's CLI shows on both mounts
# After a full outage: the poller has backed off (1 s, 2 s, 4 s…), and nodes finish unsealing
# and catching up at different moments, so the first reads after the restart may still meet a
# sealed node; "fresh again without a remount" within this.
RECOVERY_BOUND = 10.0
PUT_BOUND = 10.0  # a put succeeds this soon after the new leader is reported
ELECTION_BOUND = 30.0
ROTATE_EVERY = 12  # seconds: long enough to mount both hosts before the rotation falls due
# The schedulers' retries back off from 1 s while writes are refused (1, 2, 4, 8 s…): a
# rotation that fell due in an election of up to ~5 s happens within ~10 s of its end, not at
# the scheduler's next minute.
ROTATION_AFTER_ELECTION = 15.0
ROTATION_GRACE = 5.0  # after the new version: both schedulers have had their go


# -- hosts ------------------------------------------------------------------------------------


def host(root: Path, cluster: Cluster, order: list[int], *,  # noqa: F811
         ttl: str | None = None) -> Store:
    """A host's store folder and config: the cluster's nodes in *order*, then ``init``."""
    store = make_store(root, init=False)
    token = root / "bao.token"
    token.write_text(cluster.root_token)
    token.chmod(0o600)
    addresses = ", ".join(f'"{cluster.addresses[index]}"' for index in order)
    cache = (f"ttl: {ttl}, " if ttl else "") + f"max_stale: 1h, poll_interval: {POLL:g}s"
    store.config.write_text(
        "secrets_manager:\n"
        f"  backend: {{ type: openbao, address: [{addresses}], mount: secret, "
        f"token_file: {token}, timeout: {REQUEST_TIMEOUT:g}s }}\n"
        "  encryption: { provider: file, key_file: master.key }\n"
        "  audit: { path: audit.log }\n"
        f"  cache: {{ {cache} }}\n"
        f"  backend_timeout: {round(BACKEND_TIMEOUT * 1000)}ms\n"
    )
    store.cli("init", check=True)
    return store


def two_hosts(tmp_path: Path, cluster: Cluster, *, ttl: str | None = None,  # noqa: F811
              ttl_b: str | None = None) -> tuple[Store, Store]:
    """Host A (nodes 0, 1, 2) and host B (nodes 2, 1, 0); B's ttl is *ttl_b* if given."""
    return (host(tmp_path / "host-a", cluster, [0, 1, 2], ttl=ttl),
            host(tmp_path / "host-b", cluster, [2, 1, 0], ttl=ttl_b or ttl))


def value() -> str:
    return secrets.token_hex(16)


def put(store: Store, name: str, secret: str, *options: str
        ) -> subprocess.CompletedProcess[bytes]:
    """``secretfs secrets put NAME --stdin`` (the value never in argv)."""
    return store.cli("secrets", "put", name, "--stdin", *options, input=secret.encode())


@dataclass
class Put:
    """A put retried until it succeeds or *deadline*: how many tries, when it succeeded."""

    host: str
    name: str
    attempts: int = 0
    done_at: float | None = None  # time.monotonic() of success
    errors: list[str] = field(default_factory=list)  # (exit code and stderr: no values)


def put_until(label: str, store: Store, name: str, secret: str, deadline: float) -> Put:
    result = Put(label, name)
    while True:
        result.attempts += 1
        done = put(store, name, secret)
        if done.returncode == 0:
            result.done_at = time.monotonic()
            return result
        result.errors.append(f"exit {done.returncode}: "
                             f"{redact(done.stderr.decode(errors='replace'), secret).strip()}")
        if time.monotonic() > deadline:
            return result
        time.sleep(0.25)


def redact(text: str, *values: str) -> str:
    for secret in values:
        text = text.replace(secret, "<value>")
    return text


def read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def timed_read(path: Path) -> tuple[str | None, int | None, float]:
    """(the text or None, the errno or None, seconds taken) of an open+read."""
    started = time.monotonic()
    try:
        text = path.read_text()
    except OSError as error:
        return None, error.errno, time.monotonic() - started
    return text, None, time.monotonic() - started


def first_seen(checks: dict[str, Callable[[], bool]], since: dict[str, float],
               timeout: float) -> dict[str, float | None]:
    """Poll every check until all hold or *timeout* past the latest *since*; for each, how long
    after its own *since* it first held (None: not within the timeout)."""
    seen: dict[str, float | None] = dict.fromkeys(checks)
    deadline = max(since.values()) + timeout
    while True:
        for key, check in checks.items():
            if seen[key] is None and check():
                seen[key] = time.monotonic() - since[key]
        if all(v is not None for v in seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.02)


class Reader(threading.Thread):
    """Opens and reads one file in a loop (a fresh open each time) until stopped; counts
    errors, wrong contents and how long each read took."""

    def __init__(self, label: str, path: Path, expected: str) -> None:
        super().__init__(name=f"reader-{label}", daemon=True)
        self.label = label
        self.path = path
        self.expected = expected.encode()
        self.halt = threading.Event()
        self.reads: list[tuple[float, float]] = []  # (started, seconds)
        self.errors: list[tuple[float, str]] = []  # (started, errno name)
        self.wrong = 0

    def run(self) -> None:
        while not self.halt.is_set():
            started = time.monotonic()
            try:
                with open(self.path, "rb") as file:
                    data = file.read()
            except OSError as error:
                self.errors.append((started, errno.errorcode.get(error.errno or 0, "?")))
            else:
                if data != self.expected:
                    self.wrong += 1
            self.reads.append((started, time.monotonic() - started))
            time.sleep(0.02)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)

    def between(self, start: float, end: float) -> int:
        return sum(1 for started, _ in self.reads if start <= started <= end)

    @property
    def slowest(self) -> float:
        return max((seconds for _, seconds in self.reads), default=0.0)

    def problems(self) -> list[str]:
        found = []
        if self.errors:
            kinds = sorted({name for _, name in self.errors})
            found.append(f"host {self.label}: {len(self.errors)} of {len(self.reads)} cached "
                         f"reads failed ({', '.join(kinds)})")
        if self.wrong:
            found.append(f"host {self.label}: {self.wrong} cached reads returned a wrong value")
        if self.slowest > BACKEND_TIMEOUT + SLACK:
            found.append(f"host {self.label}: a cached read took {self.slowest:.2f}s "
                         f"(> backend_timeout {BACKEND_TIMEOUT:g}s + {SLACK:g}s)")
        return found


def stop_readers(readers: list[Reader], start: float, end: float, during: str) -> list[str]:
    """Stop *readers*; their problems, and a problem for each that read nothing between
    *start* and *end* (the window the test is about: *during*)."""
    for reader in readers:
        reader.stop()
    found = []
    for reader in readers:
        found.extend(reader.problems())
        if reader.between(start, end) == 0:
            found.append(f"host {reader.label}: no cached read ran {during}")
    return found


def log_lines(mount: Mount, *words: str) -> list[str]:
    return [line for line in mount.log_text().splitlines() if any(w in line for w in words)]


def kv_metadata(cluster: Cluster, name: str) -> dict:  # noqa: F811
    return cluster.api("GET", f"secret/metadata/{name}").json()["data"]


# -- 1. the active node SIGKILLed -------------------------------------------------------------


def test_leader_sigkill_reads_never_fail_and_puts_resume_after_the_election(
        tmp_path: Path, cluster: Cluster, folder: Path) -> None:  # noqa: F811
    # Host A's cached values go past their ttl every 2 s, so its cached reads ask the cluster
    # again during the election (a failure must be answered from the cache, stale); host B keeps
    # the default ttl (300 s), so only its poller can tell it about the puts after the election.
    a, b = two_hosts(tmp_path, cluster, ttl="2s", ttl_b="300s")
    shared, cold = value(), value()
    old = {"from_a": value(), "from_b": value()}
    for name, secret in (("shared", shared), ("cold", cold), *old.items()):
        put(a, name, secret).check_returncode()
    problems: list[str] = []
    with mounted(a, folder / "a") as mount_a, mounted(b, folder / "b") as mount_b:
        mounts = {"A": mount_a, "B": mount_b}
        for label, mount in mounts.items():  # both read the same secret, written through A
            assert read(mount.path / "shared/latest/value") == shared, f"host {label}"
            for name, secret in old.items():
                assert read(mount.path / f"{name}/latest/value") == secret, f"host {label}"
        readers = [Reader(label, mount.path / "shared/latest/value", shared)
                   for label, mount in mounts.items()]
        for reader in readers:
            reader.start()
        time.sleep(0.5)

        leader = cluster.leader()
        killed_at = time.monotonic()
        cluster.kill(leader)

        # an uncached secret (never looked up through either mount), read during the election
        cold_reads = {}
        for label, mount in mounts.items():
            text, error, took = timed_read(mount.path / "cold/latest/value")
            cold_reads[label] = took
            if text != cold:
                problems.append(f"host {label}: the uncached read after the SIGKILL failed "
                                f"({errno.errorcode.get(error or 0, 'wrong value')}) after "
                                f"{took:.2f}s")
            elif took > READ_BOUND:
                problems.append(f"host {label}: the uncached read after the SIGKILL took "
                                f"{took:.2f}s (> {READ_BOUND:g}s)")

        new_leader = cluster.wait_for_leader(exclude=[leader], timeout=ELECTION_BOUND)
        elected_at = time.monotonic()

        # a put through each host's CLI, at once, retried only if it fails
        new = {"from_a": value(), "from_b": value()}
        limit = elected_at + 2 * PUT_BOUND  # keep trying a while longer, to report when
        with ThreadPoolExecutor(2) as pool:
            puts = [pool.submit(put_until, "A", a, "from_a", new["from_a"], limit),
                    pool.submit(put_until, "B", b, "from_b", new["from_b"], limit)]
            done = [future.result() for future in puts]
        for result in done:
            if result.done_at is None:
                problems.append(f"host {result.host}: `secrets put {result.name}` never "
                                f"succeeded in {result.attempts} attempts over "
                                f"{2 * PUT_BOUND:g}s after the election; last: "
                                f"{result.errors[-1] if result.errors else '?'}")
            elif result.done_at - elected_at > PUT_BOUND:
                problems.append(f"host {result.host}: `secrets put` succeeded only "
                                f"{result.done_at - elected_at:.2f}s after the new leader "
                                f"(attempt {result.attempts}; refused before: "
                                f"{result.errors[:3]})")

        # both mounts show both new values within the poll interval (+ slack)
        checks, since = {}, {}
        for result in done:
            if result.done_at is None:
                continue
            for label, mount in mounts.items():
                path = mount.path / f"{result.name}/latest/value"
                key = f"{result.name}@{label}"
                checks[key] = lambda path=path, secret=new[result.name]: read(path) == secret
                since[key] = result.done_at
        seen = first_seen(checks, since, VISIBLE_BOUND + 10) if checks else {}
        for key, took in seen.items():
            if took is None or took > VISIBLE_BOUND:
                when = "not within 10 s more" if took is None else f"after {took:.2f}s"
                problems.append(f"{key}: the new value showed {when} (> {VISIBLE_BOUND:g}s "
                                "after the put)")

        problems.extend(stop_readers(readers, killed_at, elected_at, "during the election"))
        assert mount_a.process.poll() is None and mount_b.process.poll() is None

    print(f"\n[sigkill] node-{leader} killed; node-{new_leader} active after "
          f"{elected_at - killed_at:.2f}s; uncached reads "
          + ", ".join(f"{k} {v:.2f}s" for k, v in cold_reads.items())
          + "; puts " + ", ".join(
              f"{r.host} {r.attempts} attempt(s) "
              + (f"done {r.done_at - elected_at:.2f}s after the election" if r.done_at
                 else "never succeeded") for r in done)
          + "; visible " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}s'}"
                                     for k, v in seen.items())
          + "; cached reads " + ", ".join(
              f"{r.label} {len(r.reads)} ({r.between(killed_at, elected_at)} in the election, "
              f"slowest {r.slowest:.3f}s, {len(r.errors)} errors)" for r in readers))
    assert not problems, "\n".join(problems)


# -- 2. a rotation due during the election ----------------------------------------------------


def test_a_rotation_due_on_both_hosts_during_the_election_happens_once_after_it(
        tmp_path: Path, cluster: Cluster, folder: Path) -> None:  # noqa: F811
    a, b = two_hosts(tmp_path, cluster)
    original = value()
    put(a, "api", original, "--rotate-every", f"{ROTATE_EVERY}s").check_returncode()
    info = json.loads(a.cli("secrets", "info", "api", "--json", check=True).stdout)
    due = datetime.fromisoformat(info["next_rotation"]).timestamp()  # wall clock, jitter incl.
    problems: list[str] = []
    rotated = original
    # Each host's daemon runs the scheduler (rotation.enabled defaults to true): it looked at
    # start and sleeps until the secret is due.
    with mounted(a, folder / "a") as mount_a, mounted(b, folder / "b") as mount_b:
        mounts = {"A": mount_a, "B": mount_b}
        for label, mount in mounts.items():
            assert read(mount.path / "api/latest/value") == original, f"host {label}"
        wait = due - time.time() - 0.7  # the kill, just before the secret falls due
        assert wait > 0, f"mounting took too long: raise ROTATE_EVERY ({ROTATE_EVERY}s)"
        time.sleep(wait)

        leader = cluster.leader()
        killed = time.time()
        cluster.kill(leader)
        new_leader = cluster.wait_for_leader(exclude=[leader], timeout=ELECTION_BOUND)
        elected = time.time()
        elected_at = time.monotonic()
        assert killed < due < elected, (
            f"the scenario needs the rotation to fall due during the election: killed at "
            f"{killed - due:+.2f}s from due, elected at {elected - due:+.2f}s")

        # exactly one new version, after the election
        def current_version() -> int:
            return int(kv_metadata(cluster, "api")["current_version"])

        deadline = elected_at + ROTATION_AFTER_ELECTION
        while current_version() < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        rotated_at = time.monotonic()
        if current_version() < 2:
            problems.append(f"no rotation within {ROTATION_AFTER_ELECTION:g}s after the "
                            "election")
        else:
            time.sleep(ROTATION_GRACE)  # both schedulers have had their go
            kv = kv_metadata(cluster, "api")
            if int(kv["current_version"]) != 2:
                problems.append(f"KV has {kv['current_version']} versions, not 2: the "
                                "rotation happened more than once")
            listed = json.loads(a.cli("secrets", "versions", "api", "--json",
                                      check=True).stdout)
            if len(listed) != 2:
                problems.append(f"`secrets versions api` lists {len(listed)} versions, not 2")
            rotated = cluster.api("GET", "secret/data/api").json()["data"]["data"]["value"]
            if rotated == original:
                problems.append("the rotated version holds the old value")
            # both mounts serve that one new value (the rotating host's at once, the other
            # within its poll interval)
            seen = first_seen(
                {label: (lambda m=mount: read(m.path / "api/latest/value") == rotated)
                 for label, mount in mounts.items()},
                dict.fromkeys(mounts, rotated_at), VISIBLE_BOUND + 10)
            for label, took in seen.items():
                if took is None or took > VISIBLE_BOUND + ROTATION_GRACE:
                    problems.append(f"host {label}: the rotated value is not served "
                                    f"({'-' if took is None else f'{took:.2f}s'})")
        outcomes = {label: [line.split("INFO ", 1)[-1] for line in
                            log_lines(mount, "rotation of api", "rotation check failed")]
                    for label, mount in mounts.items()}
        rotations = sum(1 for lines in outcomes.values() for line in lines
                        if "rotation of api: rotated" in line)
        if rotations != 1:
            problems.append(f"{rotations} hosts report `rotation of api: rotated`, not 1")

    print(f"\n[rotation] slept {wait:.2f}s after mounting; due {due - killed:.2f}s after "
          f"node-{leader} was killed; node-"
          f"{new_leader} active {elected - killed:.2f}s after the kill; the new version "
          f"{rotated_at - elected_at:.2f}s after the election; host logs: "
          + "; ".join(f"{label}: {redact(' | '.join(lines), original, rotated)}"
                      for label, lines in outcomes.items()))
    assert not problems, "\n".join(problems)


# -- 3. the whole cluster down, then back -----------------------------------------------------


def test_whole_cluster_down_serves_stale_then_fresh_again_without_a_remount(
        tmp_path: Path, cluster: Cluster, folder: Path) -> None:  # noqa: F811
    ttl = 1.0  # short, so that "still current" is a question only the backend can answer
    a, b = two_hosts(tmp_path, cluster, ttl=f"{ttl:g}s")
    warm, cold = value(), value()
    put(a, "warm", warm).check_returncode()
    put(a, "cold", cold).check_returncode()
    problems: list[str] = []
    with mounted(a, folder / "a") as mount_a, mounted(b, folder / "b") as mount_b:
        mounts = {"A": mount_a, "B": mount_b}
        for label, mount in mounts.items():
            assert read(mount.path / "warm/latest/value") == warm, f"host {label}"
        readers = [Reader(label, mount.path / "warm/latest/value", warm)
                   for label, mount in mounts.items()]
        for reader in readers:
            reader.start()

        stopping = time.monotonic()
        cluster.stop_all()
        stopped_at = time.monotonic()
        time.sleep(ttl + 0.5)  # past the ttl

        outage_reads: dict[str, float] = {}
        for label, mount in mounts.items():
            target = mount.path / "warm/latest/value"
            text, error, took = timed_read(target)
            outage_reads[label] = took
            if text != warm:
                problems.append(f"host {label}: the cached read in the outage failed "
                                f"({errno.errorcode.get(error or 0, 'wrong value')})")
            try:
                stale = os.getxattr(target, "user.secretfs.stale")
            except OSError as failure:
                stale = errno.errorcode.get(failure.errno or 0, "?").encode()
            if stale != b"1":
                problems.append(f"host {label}: user.secretfs.stale is {stale!r}, not b'1'")
        uncached: dict[str, tuple[str, float]] = {}
        for label, mount in mounts.items():
            text, error, took = timed_read(mount.path / "cold/latest/value")
            uncached[label] = (errno.errorcode.get(error or 0, "read"), took)
            if error != errno.EIO:
                problems.append(f"host {label}: the uncached read in the outage gave "
                                f"{'a value' if text is not None else uncached[label][0]}, "
                                "not EIO")
            if took > READ_BOUND:
                problems.append(f"host {label}: the uncached read in the outage took "
                                f"{took:.2f}s (> {READ_BOUND:g}s)")

        started = time.monotonic()
        doctor = a.cli("doctor")
        doctor_took = time.monotonic() - started
        said = doctor.stdout.decode(errors="replace") + doctor.stderr.decode(errors="replace")
        if doctor.returncode != 1:
            problems.append(f"`secretfs doctor` exited {doctor.returncode}, not 1")
        if "backend unreachable" not in said:
            backend_lines = [line for line in said.splitlines() if "backend" in line.lower()]
            problems.append(f"`secretfs doctor` does not say 'backend unreachable': "
                            f"{redact(' | '.join(backend_lines), warm, cold)[:600]}")

        restarting = time.monotonic()
        leader = cluster.restart_all()
        restarted_at = time.monotonic()
        problems.extend(stop_readers(readers, stopped_at, restarting, "in the outage"))

        # fresh again, same daemons: a new version written after the restart
        new = value()
        result = put_until("A", a, "warm", new, restarted_at + 2 * PUT_BOUND)
        if result.done_at is None:
            problems.append(f"`secrets put` after the restart never succeeded "
                            f"({result.attempts} attempts): {result.errors[-1:]}")
        else:
            seen = first_seen(
                {label: (lambda m=mount: read(m.path / "warm/latest/value") == new)
                 for label, mount in mounts.items()},
                dict.fromkeys(mounts, result.done_at), RECOVERY_BOUND + 10)
            for label, took in seen.items():
                if took is None or took > RECOVERY_BOUND:
                    problems.append(f"host {label}: the value written after the restart "
                                    f"showed {'-' if took is None else f'after {took:.2f}s'} "
                                    f"(> {RECOVERY_BOUND:g}s)")
            for label, mount in mounts.items():
                if "user.secretfs.stale" in os.listxattr(mount.path / "warm/latest/value"):
                    problems.append(f"host {label}: still marked stale after the restart")
                if read(mount.path / "cold/latest/value") != cold:
                    problems.append(f"host {label}: the uncached secret is not readable after "
                                    "the restart")
        for label, mount in mounts.items():
            if mount.process.poll() is not None:
                problems.append(f"host {label}: the daemon exited")
        if problems:  # what the daemons said about it (values redacted)
            for label, mount in mounts.items():
                said = log_lines(mount, "WARNING", "ERROR", "backend", "metadata changed")[-15:]
                problems.append(f"host {label} log: "
                                + redact(" | ".join(said), warm, cold, new)[:3000])

    print(f"\n[outage] stop_all {stopped_at - stopping:.2f}s; cached reads in the outage "
          + ", ".join(f"{k} {v:.3f}s" for k, v in outage_reads.items())
          + "; uncached " + ", ".join(f"{k} {e} in {t:.2f}s" for k, (e, t) in uncached.items())
          + f"; doctor exit {doctor.returncode} in {doctor_took:.2f}s; restart_all (node-"
          f"{leader} active) {restarted_at - restarting:.2f}s; put after the restart: "
          f"{result.attempts} attempt(s)"
          + (f", {result.done_at - restarted_at:.2f}s after the leader" if result.done_at
             else "") + "; cached reads " + ", ".join(
              f"{r.label} {len(r.reads)} (slowest {r.slowest:.3f}s, {len(r.errors)} errors)"
              for r in readers))
    assert not problems, "\n".join(problems)
