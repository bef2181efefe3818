"""The hash-chained audit log: chain, verify, buffering, fail-closed, rotation."""

from __future__ import annotations

import json
import os
import pwd
import stat
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secretfs.access import Decision
from secretfs.access.principal import Caller
from secretfs.audit import NO_AUDIT
from secretfs.auditlog import AuditLog, AuditUnavailable, audit_key, rotated_files, tail, verify
from secretfs.crypto.keys import LocalMasterKey

KEY = audit_key(LocalMasterKey(b"k" * 32))
ALLOW = Decision(True, "svc", "rule 1")
DENY = Decision(False, "svc", "no matching allow")
CALLER = Caller(uid=1001, gid=1001, pid=42, start_time=7, exe="/usr/bin/app", pid_ns=4026531836)


def fill(path: Path, n: int, **kw) -> AuditLog:
    a = AuditLog(path, KEY, **kw)
    for i in range(n):
        a.record("read", caller=CALLER, resource=f"db/{i}", decision=ALLOW, version=i)
    a.flush()
    return a


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_audit_key_and_noaudit():
    assert len(KEY) == 32 and audit_key(LocalMasterKey(b"j" * 32)) != KEY
    assert NO_AUDIT.record("read", caller=None, resource="x", decision=ALLOW) is None


def test_intact_chain_verifies(tmp_path):
    p = tmp_path / "a" / "audit.log"
    fill(p, 5)
    r = verify(p, KEY)
    assert r.ok and r.lines == 5 and r.first_bad_line is None
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
    rec = tail(p, 1)[0]
    assert rec["caller"]["uid"] == 1001 and rec["decision"] == "allow" and rec["version"] == 4


@pytest.mark.parametrize("k", [1, 3, 6])
def test_edit_detected(tmp_path, k):
    p = tmp_path / "audit.log"
    fill(p, 6)
    ls = lines(p)
    ls[k - 1] = ls[k - 1].replace("db/", "dc/", 1)
    p.write_text("".join(ls))
    r = verify(p, KEY)
    assert not r.ok and r.first_bad_line == k and r.file == p


@pytest.mark.parametrize("k", [1, 2, 4])
def test_delete_detected_at_successor(tmp_path, k):
    p = tmp_path / "audit.log"
    fill(p, 6)
    ls = lines(p)
    del ls[k - 1]
    p.write_text("".join(ls))
    r = verify(p, KEY)
    # the successor, now at position k of the file, no longer links to its predecessor
    assert not r.ok and r.first_bad_line == k and "prev" in r.problem


@pytest.mark.parametrize("k", [1, 3])
def test_swap_detected(tmp_path, k):
    p = tmp_path / "audit.log"
    fill(p, 6)
    ls = lines(p)
    ls[k - 1], ls[k] = ls[k], ls[k - 1]
    p.write_text("".join(ls))
    r = verify(p, KEY)
    assert not r.ok and r.first_bad_line == k


def test_forged_append_detected(tmp_path):
    p = tmp_path / "audit.log"
    fill(p, 3)
    last = json.loads(lines(p)[-1])
    forged = dict(last, resource="forged", mac="0" * 64)
    import hashlib

    forged["prev"] = hashlib.sha256(lines(p)[-1].rstrip("\n").encode()).hexdigest()
    with open(p, "a") as f:
        f.write(json.dumps(forged, sort_keys=True, separators=(",", ":")) + "\n")
    r = verify(p, KEY)
    assert not r.ok and r.first_bad_line == 4 and "MAC" in r.problem
    assert not verify(tmp_path / "audit.log", audit_key(LocalMasterKey(b"x" * 32))).ok


def test_restart_continues_chain(tmp_path):
    p = tmp_path / "audit.log"
    fill(p, 3)
    fill(p, 4)
    assert verify(p, KEY) == (True, 7, None, None, "")


def test_rotation_keeps_chain(tmp_path):
    p = tmp_path / "audit.log"
    now = [1_800_000_000.0]
    a = fill(p, 3, clock=lambda: now[0], retention=10 * 86400)
    now[0] += 2 * 86400
    a.prune()
    assert not p.exists()
    for i in range(2):
        a.record("read", caller=None, resource=f"r{i}", decision=ALLOW)
    a.flush()
    rotated = rotated_files(p)
    assert len(rotated) == 1
    assert verify(p, KEY).ok and verify(p, KEY).lines == 5
    # a restart after rotation continues too
    fill(p, 1)
    assert verify(p, KEY).lines == 6
    # tampering in the rotated file is reported there
    ls = lines(rotated[0])
    ls[1] = ls[1].replace("db/", "dx/", 1)
    rotated[0].write_text("".join(ls))
    r = verify(p, KEY)
    assert not r.ok and r.file == rotated[0] and r.first_bad_line == 2
    # retention deletes old rotated files
    now[0] += 20 * 86400
    rotated[0].write_text("".join(lines(rotated[0])).replace("dx/", "db/"))
    assert verify(p, KEY).ok
    a.prune()
    assert not rotated[0].exists() and (tmp_path / "audit.log.pruned").exists()
    r = verify(p, KEY)
    assert r.ok and r.lines == 3  # the current file still links to the pruned anchor


def test_denial_on_disk_at_once_and_buffering(tmp_path):
    p = tmp_path / "audit.log"
    a = AuditLog(p, KEY)
    a.record("read", caller=CALLER, resource="x", decision=ALLOW)
    assert not p.exists() or p.read_text() == ""
    a.record("read", caller=CALLER, resource="y", decision=DENY)
    recs = [json.loads(x) for x in lines(p)]
    assert [r["resource"] for r in recs] == ["x", "y"] and recs[1]["decision"] == "deny"
    a.record("write", caller=None, resource="z", decision=ALLOW)
    assert len(lines(p)) == 2
    a.flush()
    assert len(lines(p)) == 3
    me = tail(p, 1)[0]["caller"]  # caller None: this process, resolved and named
    exe = os.readlink("/proc/self/exe")
    assert (me["uid"], me["pid"], me["exe"]) == (os.geteuid(), os.getpid(), exe)
    assert me["user"] == pwd.getpwuid(os.geteuid()).pw_name


def test_caller_names_are_recorded_and_looked_up_once_per_process(tmp_path):
    p = tmp_path / "audit.log"
    asked = []

    def describe(caller: Caller) -> dict:
        asked.append(caller.identity)
        return {"user": "app", "unit": "app.service", "container": "c" * 64}

    a = AuditLog(p, KEY, describe=describe)
    for resource in ("x", "y"):
        a.record("read", caller=CALLER, resource=resource, decision=ALLOW)
    a.flush()
    who = tail(p, 1)[0]["caller"]
    assert who == {"uid": 1001, "gid": 1001, "pid": 42, "exe": "/usr/bin/app", "start_time": 7,
                   "pid_ns": 4026531836, "user": "app", "unit": "app.service",
                   "container": "c" * 64}
    assert asked == [CALLER.identity]


async def test_run_flushes_periodically_and_on_shutdown(tmp_path):
    p = tmp_path / "audit.log"
    a = AuditLog(p, KEY)
    async with trio.open_nursery() as n:
        n.start_soon(a.run, 0.05)
        a.record("read", caller=CALLER, resource="x", decision=ALLOW)
        with trio.fail_after(5):
            while not (p.exists() and p.read_text()):
                await trio.sleep(0.01)
        a.record("read", caller=CALLER, resource="y", decision=ALLOW)
        n.cancel_scope.cancel()
    assert [r["resource"] for r in tail(p, 5)] == ["x", "y"]
    assert verify(p, KEY).ok


def test_values_never_written(tmp_path, caplog):
    p = tmp_path / "audit.log"
    a = AuditLog(p, KEY)
    a.record("read", caller=CALLER, resource="x", decision=ALLOW, value="hunter2",
             Password="hunter2", version=3)
    a.flush()
    text = p.read_text()
    assert "hunter2" not in text and '"value"' not in text and json.loads(text)["version"] == 3
    assert "dropped" in caplog.text


def test_log_level_cache_events(tmp_path):
    p = tmp_path / "audit.log"
    a = AuditLog(p, KEY)
    a.record("cache.hit", caller=CALLER, resource="x", decision=ALLOW)
    b = AuditLog(tmp_path / "debug.log", KEY, log_level="debug")
    b.record("cache.hit", caller=CALLER, resource="x", decision=ALLOW)
    a.flush()
    b.flush()
    assert not p.exists()
    assert tail(tmp_path / "debug.log")[0]["event"] == "cache.hit"


def test_unwritable_fail_closed_and_open(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    p = blocker / "audit.log"  # parent is a file: cannot be created
    closed = AuditLog(p, KEY)
    assert not closed.healthy
    with pytest.raises(AuditUnavailable) as e:
        closed.record("read", caller=CALLER, resource="x", decision=ALLOW)
    assert e.value.exit_code == 1
    with pytest.raises(AuditUnavailable):
        closed.flush()
    opened = AuditLog(p, KEY, fail_open=True)
    opened.record("read", caller=CALLER, resource="x", decision=ALLOW)
    opened.record("read", caller=CALLER, resource="x", decision=DENY)
    assert not opened.healthy


def test_tail_last_n(tmp_path):
    p = tmp_path / "audit.log"
    fill(p, 30)
    got = tail(p, 5)
    assert [r["version"] for r in got] == [25, 26, 27, 28, 29]
    assert len(tail(p, 100)) == 30


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["read", "write", "list"]), st.text(max_size=20),
                          st.booleans()), min_size=1, max_size=12),
       st.data())
def test_random_logs_verify_and_byte_flips_detected(tmp_path_factory, recs, data):
    p = tmp_path_factory.mktemp("h") / "audit.log"
    a = AuditLog(p, KEY, fail_open=True)
    for ev, res, ok in recs:
        a.record(ev, caller=CALLER, resource=res, decision=ALLOW if ok else DENY)
    a.flush()
    assert verify(p, KEY) == (True, len(recs), None, None, "")
    raw = bytearray(p.read_bytes())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[i]))
    p.write_bytes(bytes(raw))
    assert not verify(p, KEY).ok


async def test_the_flusher_applies_retention_on_its_own(tmp_path):
    import trio

    p = tmp_path / "audit.log"
    now = [1_800_000_000.0]
    a = fill(p, 3, clock=lambda: now[0], retention=10 * 86400)
    now[0] += 2 * 86400  # the file is now two days old: due for rotation
    a.record("read", caller=None, resource="r", decision=ALLOW)
    with trio.move_on_after(0.5):
        await a.run(interval=0.01, prune_every=0.01)
    assert len(rotated_files(p)) == 1
    assert verify(p, KEY).ok and verify(p, KEY).lines == 4


WRITER = """
import sys
from pathlib import Path
from secretfs.access import Decision
from secretfs.access.principal import Caller
from secretfs.auditlog import AuditLog
path, key, name, n, immediate = sys.argv[1:]
log = AuditLog(Path(path), bytes.fromhex(key), immediate=immediate == "1",
               describe=lambda caller: {})
for i in range(int(n)):
    log.record("read", caller=Caller(uid=1, gid=1, pid=1, start_time=1), resource=f"{name}/{i}",
               decision=Decision(True, "svc", "rule"))
    if i % 7 == 0:
        log.flush()
log.flush()
"""


def test_several_processes_write_one_chain(tmp_path):
    """A daemon and CLI commands append to one log at once: one valid chain, nothing lost."""
    import subprocess
    import sys

    p = tmp_path / "audit.log"
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(p), KEY.hex(), f"w{k}", "60",
                          "1" if k % 2 else "0"])
        for k in range(4)
    ]
    here = AuditLog(p, KEY, describe=lambda caller: {})
    for i in range(60):  # this process writes meanwhile, with a chain head it must not trust
        here.record("read", caller=CALLER, resource=f"here/{i}", decision=ALLOW)
        if i % 5 == 0:
            here.flush()
    here.flush()
    assert [w.wait(timeout=60) for w in writers] == [0] * 4
    result = verify(p, KEY)
    assert result.ok, result
    assert result.lines == 5 * 60
    resources = {json.loads(line)["resource"] for line in lines(p)}
    assert resources == {f"{who}/{i}" for who in ("w0", "w1", "w2", "w3", "here")
                         for i in range(60)}


def test_a_writer_continues_the_chain_after_another_rotated_it(tmp_path):
    p = tmp_path / "audit.log"
    now = [1_800_000_000.0]
    first = fill(p, 2, clock=lambda: now[0], describe=lambda caller: {})
    second = AuditLog(p, KEY, clock=lambda: now[0], describe=lambda caller: {})
    now[0] += 2 * 86400
    second.prune()  # rotates the file the first writer last wrote
    assert not p.exists() and len(rotated_files(p)) == 1
    first.record("read", caller=CALLER, resource="after", decision=ALLOW)
    first.flush()
    assert verify(p, KEY) == (True, 3, None, None, "")


@given(st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in ("mac", "prev")),
                       st.one_of(st.text(), st.integers(), st.none(), st.booleans(),
                                 st.floats(allow_nan=False), st.lists(st.integers(), max_size=3),
                                 st.dictionaries(st.text(max_size=5),
                                                 st.one_of(st.text(max_size=5), st.integers(),
                                                           st.none()))),
                       max_size=8),
       st.binary(min_size=32, max_size=32))
def test_a_chained_line_is_the_canonical_record_with_its_mac(body, prev):
    from secretfs.auditlog import _chained_line, _mac, canonical

    record = {**body, "prev": prev.hex()}
    expected = canonical({**record, "mac": _mac(KEY, prev.hex(), record)})
    assert _chained_line(KEY, prev.hex(), record) == expected
    assert json.loads(expected) == {**record, "mac": json.loads(expected)["mac"]}
