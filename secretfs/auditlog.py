"""The audit log: one JSON object per line, hash-chained and MAC'd, never a value.

Each line carries the hash of the previous line and an HMAC (under a key derived from the master
key) of its own content with that hash, so `verify` names the first line that was altered,
removed, reordered or appended by hand. Records are buffered so a warm read never waits for the
disk; denials are written at once; a trio task flushes at least every second. docs/audit.md has
the details and the limits. audit.py holds the seam the manager calls; this is what sits behind it.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import functools
import hashlib
import hmac
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from secretfs.access import Decision
from secretfs.access.identity import describe as describe_caller
from secretfs.access.principal import Caller
from secretfs.errors import SecretfsError

if TYPE_CHECKING:
    from secretfs.crypto.keys import MasterKey

__all__ = [
    "AuditLog", "AuditUnavailable", "VerifyResult", "audit_key", "chain_head", "tail", "verify",
]


def _log() -> Any:
    """The audit logger, imported on first use: a one-shot command that writes one line and
    exits should not pay for the logging package (docs/audit.md, performance)."""
    import logging

    return logging.getLogger("secretfs.audit")


GENESIS = "0" * 64
FORBIDDEN_FIELDS = frozenset({"value", "secret", "password", "data"})
ROTATE_SIZE = 64 * 1024 * 1024
ROTATE_AGE = 86400.0
DESCRIBED_LIMIT = 10_000
_STAMP = "%Y%m%dT%H%M%S"
_STAMP_RE = re.compile(r"^\d{8}T\d{6}$")




class AuditUnavailable(SecretfsError):
    """The audit log cannot be written (and the configuration is fail-closed)."""

    exit_code = 1
    errno = _errno.EIO


def audit_key(master_key: MasterKey) -> bytes:
    """The 32-byte MAC key of the audit log: derived from the master key (HKDF-SHA256), so
    whoever cannot read the store cannot forge the log either."""
    return master_key.derive_key(b"audit log v1")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            default=str)


def canonical(obj: dict[str, Any]) -> str:
    """Canonical JSON: sorted keys, no spaces, UTF-8 as is."""
    return _ENCODER.encode(obj)


def line_hash(line: str) -> str:
    """SHA-256 of a line's full text (without its newline), hex."""
    return hashlib.sha256(line.encode()).hexdigest()


def _mac(key: bytes, prev: str, body: dict[str, Any]) -> str:
    return hmac.new(key, bytes.fromhex(prev) + canonical(body).encode(), hashlib.sha256).hexdigest()


def _chained_line(mac_key: Any, prev: str, body: dict[str, Any]) -> str:
    """``canonical({**body, "mac": _mac(key, prev, body)})`` (*body* holds ``prev``; *mac_key*
    is the key, or an HMAC object keyed with it, to copy). The record is encoded once, as the
    keys before ``mac`` and the keys after it (``prev`` is always one): the unsigned text and
    the final line are two joins of the same halves. A flush formats a second's records at
    once, on the daemon's CPU: this is most of the flusher's work, hence the care."""
    low = {k: v for k, v in body.items() if k < "mac"}
    high = _ENCODER.encode({k: v for k, v in body.items() if k > "mac"})
    head = _ENCODER.encode(low)[:-1] + "," if low else "{"
    if isinstance(mac_key, bytes):
        mac_key = hmac.new(mac_key, digestmod=hashlib.sha256)
    signer = mac_key.copy()
    signer.update(bytes.fromhex(prev) + (head + high[1:]).encode())
    return f'{head}"mac":"{signer.hexdigest()}",{high[1:]}'


@functools.lru_cache(maxsize=4)
def _second(whole: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))


def _iso(t: float) -> str:
    """``2026-11-29T06:30:00.123456Z`` (UTC); the seconds part formatted once per second."""
    whole = int(t)
    return f"{_second(whole)}.{int((t - whole) * 1_000_000):06d}Z"


def _last_lines(path: Path, n: int) -> list[str]:
    """The last *n* non-empty lines of *path*, reading backwards from the end in blocks."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        data, block = b"", 4096  # a line is a few hundred bytes: start small, then double
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            block = min(block * 2, 1 << 20)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = [x for x in data.split(b"\n") if x.strip()]
    if pos > 0:  # the first piece may be a partial line
        lines = lines[1:]
    return [x.decode("utf-8", "replace") for x in lines[-n:]] if n > 0 else []


def _first_line(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
    except OSError:
        return None
    return first.decode("utf-8", "replace").strip() or None


def _parse_time(s: str) -> float | None:
    try:
        return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except (TypeError, ValueError):
        return None


def rotated_files(path: Path) -> list[Path]:
    """Rotated predecessors of *path* still present, oldest first."""
    prefix = path.name + "."
    found = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for p in entries:
        if p.name.startswith(prefix) and _STAMP_RE.match(p.name[len(prefix):]):
            found.append(p)
    return sorted(found, key=lambda p: p.name)


class AuditLog:
    """The hash-chained, HMAC-authenticated audit log (an :class:`AuditSink`).

    ``record`` never touches the disk except for denials (or every record, with ``immediate``:
    one-shot commands); :meth:`run` (a trio task) flushes the buffer at least every ``interval``
    seconds and once more at shutdown.

    Several processes may write one log (the daemon, and each CLI command): a write holds an
    exclusive ``flock`` on ``<path>.lock`` while it reads the hash of the last line on disk and
    appends, and rotation holds it too, so the chain stays one chain.
    """

    def __init__(
        self,
        path: Path,
        key: bytes,
        *,
        log_level: str = "info",
        retention: float = 90 * 86400,
        fail_open: bool = False,
        immediate: bool = False,
        clock: Callable[[], float] = time.time,
        describe: Callable[[Caller], dict[str, Any]] = describe_caller,
    ) -> None:
        self.path = Path(path)
        self._key = bytes(key)
        self._signer = hmac.new(self._key, digestmod=hashlib.sha256)  # copied for each line
        self.debug = log_level == "debug"
        self.retention = retention
        self.fail_open = fail_open
        self.immediate = immediate
        self._clock = clock
        self._describe = describe
        self._described: dict[Caller, dict[str, Any]] = {}
        self._me: Caller | None = None
        self._buf: list[dict[str, Any]] = []  # records not yet chained and written
        self._buf_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._requests = itertools.count(1)
        self._healthy = True
        self._error_logged = False
        # The chain head we wrote last, and the file's (inode, size, mtime) right after: if the
        # file is still so, nobody else appended and the head need not be read back.
        self._prev = GENESIS
        self._written: tuple[int, int, int] | None = None
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            self._fail(e)

    # --- state -------------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """False after a failed write, until a write succeeds."""
        return self._healthy

    def _fail(self, e: OSError) -> None:
        self._healthy = False
        if not self._error_logged and not self.immediate:  # immediate: the caller is told
            self._error_logged = True
            _log().error("audit log %s cannot be written: %s", self.path, e.strerror or e)

    # --- recording ---------------------------------------------------------------------------

    def _who(self, caller: Caller | None) -> dict[str, Any]:
        """The caller as recorded: kernel facts, then names (user, unit, container) looked up
        once per process (the same dict for the same caller: treat it as frozen)."""
        if caller is None:
            if self._me is None:
                self._me = Caller.current()
            caller = self._me
        who = self._described.get(caller)
        if who is None:
            who = {"uid": caller.uid, "gid": caller.gid, "pid": caller.pid, "exe": caller.exe,
                   "pid_ns": caller.pid_ns, "start_time": caller.start_time,
                   **self._describe(caller)}
            if caller.start_time is not None:  # a bare pid may be reused: not cached
                if len(self._described) >= DESCRIBED_LIMIT:
                    self._described.clear()
                self._described[caller] = who
        return who

    def record(
        self, event: str, *, caller: Caller | None, resource: str, decision: Decision, **fields: Any
    ) -> None:
        if event.startswith("cache.") and not self.debug:
            return
        for name in list(fields):
            if name.lower() in FORBIDDEN_FIELDS:
                _log().warning("audit field %r dropped: values are never recorded", name)
                del fields[name]
        allowed, reason = decision.allowed, decision.reason
        # Fail closed: while the log cannot be written, an allowed operation is refused, and
        # recorded as refused (it reaches the disk with the retries once the disk is back).
        refuse = allowed and not self._healthy and not self.fail_open and not self.immediate
        if refuse:
            event, allowed = "denied", False
            reason = "refused: the audit log could not be written (audit.fail_open is false)"
        body: dict[str, Any] = dict(fields)
        body.update(
            time=self._clock(), event=event, request=next(self._requests),
            caller=self._who(caller), principal=decision.principal, resource=resource,
            decision="allow" if allowed else "deny", reason=reason,
        )
        # Only the facts are kept here: formatting and chaining (JSON, SHA-256, HMAC: tens of
        # µs) happen in flush(), off the request path, in the flusher's worker thread.
        with self._buf_lock:
            self._buf.append(body)
        if not (self.immediate or not allowed):
            return
        try:
            self.flush()
        except AuditUnavailable as error:
            if not self.fail_open:
                raise
            if self.immediate:
                _log().warning("%s (%s); going on: audit.fail_open is true", error.what,
                               error.fix)
        if refuse:  # the flush may have just worked: the decision stands all the same
            raise AuditUnavailable(
                f"audit log {self.path} could not be written",
                "operation refused: audit.fail_open is false; fix the disk or the path",
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """This process's writer lock, then every process's (flock on ``<path>.lock``)."""
        with self._write_lock:
            fd = os.open(self.path.with_name(self.path.name + ".lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _head(self) -> str:
        """The hash the next line must carry as ``prev`` (call with the lock held)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return chain_head(self.path)
        if self._written == (st.st_ino, st.st_size, st.st_mtime_ns):
            return self._prev
        return chain_head(self.path)

    def flush(self) -> None:
        """Write the buffered lines (one write, then fsync); AuditUnavailable on failure."""
        with self._buf_lock:
            pending, self._buf = self._buf, []
        if not pending:
            return
        try:
            with self._locked():
                prev = self._head()
                lines: list[str] = []
                for body in pending:
                    chained = {**body, "time": _iso(body["time"]), "prev": prev}
                    line = _chained_line(self._signer, prev, chained)
                    prev = line_hash(line)
                    lines.append(line)
                data = ("\n".join(lines) + "\n").encode()
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                fd = os.open(self.path, flags, 0o600)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                self._prev, self._written = prev, (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError as e:
            with self._buf_lock:
                self._buf[:0] = pending
            self._fail(e)
            raise AuditUnavailable(
                f"audit log {self.path} cannot be written", e.strerror or str(e)
            ) from None
        if not self._healthy:
            _log().warning("audit log %s writable again", self.path)
        self._healthy = True
        self._error_logged = False

    async def run(self, interval: float = 1.0, prune_every: float = 600.0) -> None:
        """Flush at least every *interval* seconds, apply retention every *prune_every*
        seconds (rotate, delete what is older than ``retention``); flush once more when
        cancelled."""
        import trio

        next_prune = trio.current_time()  # at start too: a daemon may have been down a while
        try:
            while True:
                await trio.sleep(interval)
                # a failure is logged once; healthy is False until a write succeeds
                with contextlib.suppress(AuditUnavailable):
                    await trio.to_thread.run_sync(self.flush)
                if trio.current_time() >= next_prune:
                    next_prune = trio.current_time() + prune_every
                    try:
                        await trio.to_thread.run_sync(self.prune)
                    except OSError as error:
                        _log().warning("audit retention failed: %s", error)
        finally:
            with contextlib.suppress(AuditUnavailable):
                self.flush()

    # --- retention ---------------------------------------------------------------------------

    def prune(self) -> None:
        """Rotate the current file if its first line is older than a day or it is over 64 MiB;
        delete rotated files older than ``retention``."""
        now = self._clock()
        with self._locked():
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and st.st_size > 0:
                started = _started(self.path) or st.st_mtime
                if st.st_size > ROTATE_SIZE or now - started > ROTATE_AGE:
                    stamp = datetime.fromtimestamp(now, UTC).strftime(_STAMP)
                    target = self.path.with_name(f"{self.path.name}.{stamp}")
                    n = 1
                    while target.exists():  # two rotations in one second
                        stamp = datetime.fromtimestamp(now + n, UTC).strftime(_STAMP)
                        target = self.path.with_name(f"{self.path.name}.{stamp}")
                        n += 1
                    os.rename(self.path, target)
            for p in rotated_files(self.path):
                stamp = p.name[len(self.path.name) + 1:]
                t = datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC).timestamp()
                if now - t > self.retention:
                    try:
                        last = _last_lines(p, 1)
                        if last:  # the anchor the next file's first line must link to
                            _write_anchor(self.path, line_hash(last[0]))
                        p.unlink()
                    except OSError as e:
                        _log().warning("cannot delete old audit file %s: %s", p, e)


def _started(path: Path) -> float | None:
    """The time of the first line of *path*."""
    try:
        return _parse_time(json.loads(_first_line(path) or "{}").get("time"))
    except (ValueError, AttributeError):
        return None


def chain_head(path: Path) -> str:
    """The hash of the last line of the log: the current file's, else the newest rotated
    file's, else the anchor left by pruning, else the genesis."""
    for candidate in [path, *reversed(rotated_files(path))]:
        try:
            last = _last_lines(candidate, 1)
        except FileNotFoundError:
            continue
        if last:
            return line_hash(last[0])
    try:
        return _anchor_path(path).read_text().strip() or GENESIS
    except FileNotFoundError:
        return GENESIS


def _anchor_path(path: Path) -> Path:
    return path.with_name(path.name + ".pruned")


def _write_anchor(path: Path, digest: str) -> None:
    tmp = path.with_name(path.name + ".pruned.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, digest.encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, _anchor_path(path))


# --- reading -------------------------------------------------------------------------------------


class VerifyResult(NamedTuple):
    ok: bool
    lines: int
    first_bad_line: int | None = None  # 1-based, within ``file``
    file: Path | None = None
    problem: str = ""


@dataclass
class _Walk:
    prev: str
    total: int = 0


def verify(path: Path, key: bytes) -> VerifyResult:
    """Check the chain of *path* and of its rotated predecessors still present, oldest first."""
    path = Path(path)
    files = rotated_files(path)
    if path.exists():
        files.append(path)
    try:
        head = _anchor_path(path).read_text().strip() or GENESIS
    except OSError:
        head = GENESIS
    walk = _Walk(prev=head)
    for f in files:
        bad = _verify_file(f, key, walk)
        if bad is not None:
            return bad
    return VerifyResult(True, walk.total)


def _verify_file(f: Path, key: bytes, walk: _Walk) -> VerifyResult | None:
    try:
        fh = open(f, "rb")  # noqa: SIM115 (closed below; the error case returns early)
    except OSError as e:
        return VerifyResult(False, walk.total, None, f, f"cannot read: {e.strerror}")
    with fh:
        for n, raw in enumerate(fh, start=1):
            def bad(problem: str, n: int = n) -> VerifyResult:
                return VerifyResult(False, walk.total, n, f, problem)

            if not raw.endswith(b"\n"):
                return bad("incomplete last line")
            try:
                line = raw[:-1].decode("utf-8")
                body = json.loads(line)
            except (UnicodeDecodeError, ValueError):
                return bad("not a JSON line")
            if not isinstance(body, dict) or not isinstance(body.get("mac"), str) \
                    or not isinstance(body.get("prev"), str):
                return bad("no prev/mac")
            if canonical(body) != line:
                return bad("not in canonical form (altered)")
            mac = body.pop("mac")
            prev = body["prev"]
            try:
                expected = _mac(key, prev, body)
            except ValueError:
                return bad("bad prev hash")
            if not hmac.compare_digest(mac, expected):
                return bad("MAC mismatch: line altered or forged")
            if prev != walk.prev:  # for the oldest line: the genesis, or the pruned anchor
                return bad("prev mismatch: a line before it was removed, or lines reordered")
            walk.prev = line_hash(line)
            walk.total += 1
    return None


def tail(path: Path, n: int = 20) -> list[dict[str, Any]]:
    """The last *n* records of *path*, parsed (unparsable lines are skipped)."""
    out = []
    for line in _last_lines(Path(path), n):
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
