"""Crash safety of the embedded store: writers killed with SIGKILL at random moments.

Each trial starts 8 writer processes on one store (forked from a server process that has
imported secretfs, so starting them takes milliseconds). A writer loops: store a fresh value (and
now and then destroy a version it just wrote), and only once the call has returned print one
line, ``put NAME VERSION SHA256`` or ``destroyed NAME VERSION``, unbuffered. The test kills
every writer with SIGKILL at its own random moment (some before they even opened the store, or
while they wait for the write lock), then checks the store: SQLite's integrity check passes,
every version row is whole (a sealed value, or destroyed with nothing left), labels point at
versions that exist, every live version decrypts, and every acknowledged put reads back with
the acknowledged content. 20 trials on the same store; the seed is printed on failure and can
be set with SECRETFS_CRASH_SEED.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import secrets
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from secretfs.backends.local import LocalBackend
from secretfs.crypto.keys import LocalMasterKey
from secretfs.model import encode_value

TRIALS = 20
WRITERS = 8
MAX_VERSIONS = 1_000_000  # nothing is pruned: every acknowledged version must still be there
LIFE = 0.6  # seconds a writer may live at most



def writer(db: str, key: bytes, me: str, seed: int, out: str) -> None:
    """One writer process (forked from a server that imported secretfs already, so a trial
    does not wait for 8 interpreters to start). Never returns: it is killed."""
    from secretfs.manager import SyncSecretsManager
    from secretfs.model import Secret, normalize_value

    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(descriptor, 1)  # the acknowledgements go to this process's stdout …

    def acknowledge(line: str) -> None:
        os.write(1, line.encode())  # … unbuffered: written when the call returns

    rng = random.Random(seed)
    manager = SyncSecretsManager(LocalBackend.open(Path(db), LocalMasterKey(key),
                                                   max_versions=MAX_VERSIONS))
    acknowledge("ready\n")
    for i in range(10**9):
        if i % 10 == 9:  # a version written, then destroyed (crypto-shredded)
            name = f"crash/{me}-scratch"
            version = manager.store(Secret(name, os.urandom(64)))
            manager.delete(name, version=version, destroy=True)
            acknowledge(f"destroyed {name} {version}\n")
            continue
        name = f"crash/shared{i % 3}" if i % 2 else f"crash/{me}"
        value: bytes | dict[str, str]
        if rng.random() < 0.3:
            value = {"user": me, "password": os.urandom(rng.randrange(1, 64)).hex()}
        else:
            value = os.urandom(rng.randrange(1, 4096))
        version = manager.store(Secret(name, value))
        digest = hashlib.sha256(encode_value(normalize_value(value))).hexdigest()
        acknowledge(f"put {name} {version} {digest}\n")  # only once the put returned


def read_acks(path: Path) -> tuple[dict[tuple[str, int], str], set[tuple[str, int]], bool]:
    """(acknowledged puts → sha256, acknowledged destroys, whether the writer got ready).
    A last line cut short by the kill is no acknowledgement."""
    puts: dict[tuple[str, int], str] = {}
    destroyed: set[tuple[str, int]] = set()
    ready = False
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        words = line.split()
        if words == ["ready"]:
            ready = True
        elif words[0] == "put":
            puts[words[1], int(words[2])] = words[3]
        elif words[0] == "destroyed":
            destroyed.add((words[1], int(words[2])))
    return puts, destroyed, ready


def run_trial(rng: random.Random, trial: int, db: Path, key: bytes, folder: Path
              ) -> tuple[dict[tuple[str, int], str], set[tuple[str, int]]]:
    """Start the writers, kill each at its own random moment; their acknowledgements."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    outputs = [folder / f"trial{trial}-w{n}.out" for n in range(WRITERS)]
    writers = [context.Process(target=writer, args=(str(db), key, f"w{n}",
                                                    rng.randrange(2**32), str(outputs[n])),
                               daemon=True)
               for n in range(WRITERS)]
    # Most are killed a random moment after they started writing; one in ten at a random
    # moment of their start (perhaps while opening the store). None lives longer than LIFE:
    # one still waiting for the write lock then is killed waiting.
    early = {n for n in range(WRITERS) if rng.random() < 0.1}
    delays = {n: rng.uniform(0.0, 0.05) if n in early else rng.uniform(0.01, 0.3)
              for n in range(WRITERS)}
    started = time.monotonic()
    for process in writers:
        process.start()
    kill_at: dict[int, float] = {n: started + delays[n] for n in early}
    latest = started + LIFE
    deadline = started + 30
    alive = set(range(WRITERS))
    while alive:
        now = time.monotonic()
        assert now < deadline, "writers did not start"
        for n in sorted(alive):
            if n not in kill_at and outputs[n].exists() and \
                    outputs[n].read_bytes().startswith(b"ready\n"):
                kill_at[n] = now + delays[n]
            if now >= min(kill_at.get(n, latest), latest):
                writers[n].kill()  # SIGKILL
                writers[n].join()
                alive.discard(n)
            elif not writers[n].is_alive():
                raise AssertionError(f"writer {n} exited {writers[n].exitcode} by itself")
        time.sleep(0.002)
    puts: dict[tuple[str, int], str] = {}
    destroyed: set[tuple[str, int]] = set()
    for n, process in enumerate(writers):
        assert process.exitcode == -signal.SIGKILL, (n, process.exitcode)
        if not outputs[n].exists():
            continue  # killed before it opened its output
        mine, shredded, _ = read_acks(outputs[n])
        assert not set(mine) & set(puts), "two writers acknowledged the same version"
        puts.update(mine)
        destroyed |= shredded
    return puts, destroyed


def check_store(db: Path, key: bytes, puts: dict[tuple[str, int], str],
                destroyed: set[tuple[str, int]]) -> int:
    """Assert the store is whole and holds every acknowledged write; the versions checked."""
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        partial = raw.execute(
            "SELECT name, version FROM versions WHERE NOT ("
            "(destroyed IS NULL AND wrapped_key IS NOT NULL AND nonce IS NOT NULL "
            " AND ciphertext IS NOT NULL AND key_id IS NOT NULL) OR "
            "(destroyed IS NOT NULL AND wrapped_key IS NULL AND nonce IS NULL "
            " AND ciphertext IS NULL))").fetchall()
        assert partial == [], f"partial versions: {partial[:5]}"
        dangling = raw.execute(
            "SELECT l.name, l.label, l.version FROM labels l LEFT JOIN versions v "
            "ON v.name = l.name AND v.version = l.version WHERE v.version IS NULL").fetchall()
        assert dangling == [], f"labels pointing nowhere: {dangling[:5]}"
        reused = raw.execute(
            "SELECT s.name FROM secrets s JOIN versions v ON v.name = s.name "
            "GROUP BY s.name HAVING max(v.version) >= s.next_version").fetchall()
        assert reused == [], f"next_version behind the versions: {reused}"
        rows = raw.execute("SELECT name, version, destroyed FROM versions").fetchall()
    live = {(name, version) for name, version, gone in rows if gone is None}
    gone = {(name, version) for name, version, gone in rows if gone is not None}
    missing = set(puts) - live - destroyed
    assert not missing, f"acknowledged puts lost: {sorted(missing)[:5]}"
    assert destroyed <= gone, f"acknowledged destroys undone: {sorted(destroyed - gone)[:5]}"
    backend = LocalBackend.open(db, LocalMasterKey(key), max_versions=MAX_VERSIONS)
    try:
        for name, version in sorted(live):  # every live version decrypts: none is partial
            value = encode_value(backend.read_value(name, version))
            expected = puts.get((name, version))
            if expected is not None:
                assert hashlib.sha256(value).hexdigest() == expected, (name, version)
    finally:
        backend.close()
    return len(live)


@pytest.mark.slow
def test_kill_9_of_concurrent_writers_loses_no_acknowledged_write(tmp_path: Path) -> None:
    seed = int(os.environ.get("SECRETFS_CRASH_SEED") or secrets.randbits(32))
    rng = random.Random(seed)
    key = secrets.token_bytes(32)
    db = tmp_path / "store.db"
    LocalBackend.open(db, LocalMasterKey(key), create=True, max_versions=MAX_VERSIONS).close()
    puts: dict[tuple[str, int], str] = {}
    destroyed: set[tuple[str, int]] = set()
    trial = -1
    try:
        for trial in range(TRIALS):
            acked, shredded = run_trial(rng, trial, db, key, tmp_path)
            puts.update(acked)
            destroyed |= shredded
            check_store(db, key, puts, destroyed)
    except BaseException as error:
        raise AssertionError(f"crash-safety trial {trial} failed with seed {seed} "
                             f"(rerun with SECRETFS_CRASH_SEED={seed}): {error}") from error
    assert len(puts) > TRIALS * WRITERS, f"too few writes to prove anything: {len(puts)}"
    assert destroyed, "no destroy was acknowledged"
