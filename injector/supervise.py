"""Running the command of `secretfs run`: exec it, or supervise it.

Plain mode *execs*: nothing stays between the program and whoever started secretfs (systemd, a
shell, a container runtime), so its pid, exit code and signals are its own with no forwarding
to get wrong. That path is benchmarked against ``python -c pass``, which is why this module
imports only what ``exec_child`` needs; the supervisor's modules are imported when it runs.

Masking and ``--watch`` need a process in between: the supervisor. Its design choices:

- **One thread, one loop.** Signal handlers only record the signal; ``signal.set_wakeup_fd``
  turns every signal, SIGCHLD included, into a byte on a pipe that the same ``selectors`` loop
  waits on together with the child's output. No threads means no locks, and no race between
  "the child exited" and "its last output is still in the pipe": the loop reaps with WNOHANG and
  keeps draining. It also means ``run()`` must be called from the main thread.
- **The child leads its own process group**, and signals go to the group: a shell script's
  own children get them too. On a terminal, the child's group is made the foreground, so keys
  like Ctrl-C reach it directly (once, not again through us) and it may read the terminal.
- **No orphan.** The child asks the kernel for SIGKILL when its parent dies
  (``PR_SET_PDEATHSIG``): a program holding secrets must not outlive the supervisor unnoticed,
  even if the supervisor is killed with SIGKILL and no cleanup code runs.
- **Leftovers are left alone.** When the child exits, we signal nothing (a daemonised grandchild
  may be wanted), but we drain its pipes for at most a second: such a grandchild can keep a pipe
  open forever, and secretfs must still exit with the child's code.
- **Masking streams.** Output is passed on as soon as it cannot be the start of a secret, so a
  log line is not delayed; only a tail that might continue into a secret is held back.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import IO, TYPE_CHECKING, NamedTuple, NoReturn

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Iterable, Mapping, Sequence

CONCEALED = b"<concealed by secretfs>"
# A value shorter than this is not masked: masking every "1" or "yes" would wreck the output,
# and a value that short conceals nothing anyway.
MIN_VALUE = 4
# A multi-line value (a PEM key) may be printed line by line; lines this long are masked alone.
MIN_LINE = 8
DRAIN_SECONDS = 1.0  # how long output is still read after the child exited
CHUNK = 65536
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGWINCH")
STOPPING = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")  # from outside: cancel a pending restart


def exec_child(argv: Sequence[str], env: Mapping[str, str]) -> NoReturn:
    """Plain mode: replace this process with the command, found on *env*'s PATH.

    A command that is not found exits 127, one that cannot be executed 126 (as a shell does).
    """
    if not argv:
        from secretfs.errors import UsageError

        raise UsageError("no command given", "secretfs run [options] -- CMD [ARG ...]")
    # Python ignores SIGPIPE and SIGXFSZ for itself, and an ignored signal stays ignored across
    # exec: `secretfs run -- yes | head` would leave `yes` failing on EPIPE instead of ending.
    # _signal is the C module under `signal`, loaded at startup: this costs no import.
    import _signal

    ignored = {sig: _signal.signal(sig, _signal.SIG_DFL)
               for sig in (_signal.SIGPIPE, _signal.SIGXFSZ)}
    sys.stdout.flush()  # exec drops whatever Python still buffers
    sys.stderr.flush()
    try:
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as error:
        for sig, handler in ignored.items():
            _signal.signal(sig, handler)
        sys.exit(_cannot_run(argv[0], error))


def _cannot_run(name: str, error: OSError) -> int:
    """Report a command that did not start, and the exit code a shell would give."""
    if isinstance(error, FileNotFoundError | NotADirectoryError):
        message, code = f"secretfs: command not found: {name}", 127
    else:
        message, code = f"secretfs: cannot run {name}: {error.strerror or error}", 126
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    return code


# -- masking --------------------------------------------------------------------------------------


def _patterns(value: bytes) -> set[bytes]:
    """What to conceal for one value: itself, and each long enough line of a multi-line one."""
    found = {value} if len(value) >= MIN_VALUE else set()
    if b"\n" in value or b"\r" in value:
        found.update(line for line in value.splitlines() if len(line) >= MIN_LINE)
    return found


class Masker:
    """Streaming replacement of secret values in an output stream with CONCEALED.

    Every byte inside an occurrence of a value is concealed; occurrences that overlap (two
    values sharing bytes) become one CONCEALED, so neither leaks a part. The result does not
    depend on how the stream is chunked: a tail that might continue into a value is held back,
    and when a held-back tail is the end of an occurrence already concealed, ``_covered`` says
    how many of its bytes must not be written again.
    """

    def __init__(self, values: Iterable[bytes]) -> None:
        self._patterns: list[bytes] = []
        self._pending = b""
        self._covered = 0
        self.update(values)

    def update(self, values: Iterable[bytes]) -> None:
        """Add values (after a rotation); the old ones stay masked: they may still be printed."""
        found = set(self._patterns)
        for value in values:
            found.update(_patterns(bytes(value)))
        self._patterns = sorted(found, key=len, reverse=True)  # longest first where they overlap

    def feed(self, data: bytes) -> bytes:
        """Take more output; return what may be written now."""
        buffer = self._pending + data
        return self._release(buffer, len(buffer) - self._held(buffer))

    def flush(self) -> bytes:
        """At EOF: return whatever was held back (it was not a secret after all)."""
        return self._release(self._pending, len(self._pending))

    def _held(self, buffer: bytes) -> int:
        """The length of the longest tail of *buffer* that is a proper prefix of some value."""
        size = start = len(buffer)
        for pattern in self._patterns:
            at = max(0, size - len(pattern) + 1)
            while (at := buffer.find(pattern[:1], at, start)) >= 0:
                if pattern.startswith(buffer[at:]):
                    start = at
                    break
                at += 1
        return size - start

    def _spans(self, buffer: bytes) -> list[list[int]]:
        """Merged [start, end, already-concealed] spans of every occurrence in *buffer*."""
        hits = [(0, self._covered)] if self._covered else []
        for pattern in self._patterns:
            at = buffer.find(pattern)
            while at >= 0:
                hits.append((at, at + len(pattern)))
                at = buffer.find(pattern, at + 1)
        spans: list[list[int]] = []
        for start, end in sorted(hits):
            if spans and start < spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], end)
            else:
                spans.append([start, end, start < self._covered])
        return spans

    def _release(self, buffer: bytes, cut: int) -> bytes:
        """Write out buffer[:cut], concealed; keep the rest pending."""
        out: list[bytes] = []
        done = 0
        for start, end, known in self._spans(buffer):
            if start >= cut:
                break  # it begins in the held-back tail: decided on the next feed
            out.append(buffer[done:start])
            if not known:
                out.append(CONCEALED)
            done = end
        out.append(buffer[done:cut])
        self._pending = buffer[cut:]
        # Still concealed at the start of what is kept: this round's span that crossed the cut,
        # or the previous one, if the cut moved back into it.
        self._covered = max(0, done - cut, self._covered - cut)
        return b"".join(out)


# -- the supervisor -------------------------------------------------------------------------------


class Launch(NamedTuple):
    """One start of the command: its full environment, and the values to conceal."""

    env: dict[str, str]
    secrets: tuple[bytes, ...]


class _Stream:
    """One output pipe of a child, masked on its way to our own stdout or stderr."""

    def __init__(self, pipe: IO[bytes], target: int, masker: Masker) -> None:
        self.pipe, self.target, self.masker = pipe, target, masker
        self.fd = pipe.fileno()
        self.deadline: float | None = None  # set when its child has exited


def _child_setup(foreground: bool) -> Callable[[], None]:
    """The preexec_fn: runs in the child after fork, after its setpgid, before exec."""
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded here: no dlopen in the child
    parent = os.getpid()

    def setup() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # the parent died before prctl: no death signal would come
            os.kill(os.getpid(), signal.SIGKILL)
        if foreground:  # done here, not in the parent: the child may read before we get to it
            _set_foreground(os.getpgrp())

    return setup


def _owns_terminal() -> bool:
    """Whether stdin is our terminal and we are its foreground (not `secretfs run … &`)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _set_foreground(group: int) -> None:
    # A background process asking for the terminal gets SIGTTOU (and stops) unless it ignores it.
    import signal

    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(0, group)
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, previous)


class Supervisor:
    """Runs the command as a child: forwards signals, masks output, restarts or reloads it."""

    def __init__(self, argv: Sequence[str], launch: Launch, *, mask: bool = True,
                 changed: Callable[[], Launch | None] | None = None,
                 reload_signal: int | None = None, grace: float = 10.0,
                 poll_interval: float = 0.5) -> None:
        if not argv:
            from secretfs.errors import UsageError

            raise UsageError("no command given", "secretfs run [options] -- CMD [ARG ...]")
        self.argv, self.launch, self.mask = list(argv), launch, mask
        self.changed, self.reload_signal = changed, reload_signal
        self.grace, self.poll_interval = grace, poll_interval
        self._secrets: list[bytes] = list(launch.secrets)
        self._child: subprocess.Popen[bytes] | None = None  # until reaped
        self._code: int | None = None  # what run() returns, once known
        self._restart: Launch | None = None  # pending: start this once the child is gone
        self._kill_at: float | None = None  # grace ends: SIGKILL
        self._streams: dict[int, _Stream] = {}
        self._received: list[int] = []
        self._broken: set[int] = set()  # our own fds that nobody reads any more
        self._foreground = False
        self._watch_error: bytes | None = None

    def run(self) -> int:
        """Start the command and supervise it; return the exit code secretfs should exit with."""
        import selectors
        import signal

        self._selector = selectors.DefaultSelector()
        self._wake, wake_w = os.pipe()
        os.set_blocking(self._wake, False)
        os.set_blocking(wake_w, False)
        self._selector.register(self._wake, selectors.EVENT_READ)
        handled = [getattr(signal, name) for name in FORWARDED] + [signal.SIGCHLD]
        # Installed before the child starts: a signal in between is forwarded once it exists.
        previous = {sig: signal.signal(sig, self._record) for sig in handled}
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            self._foreground = _owns_terminal()
            if self._spawn(self.launch):
                self._loop()
            assert self._code is not None
            return self._code
        finally:
            self._abandon()
            if self._foreground:
                _set_foreground(os.getpgrp())
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                if handler is not None:  # None: installed outside Python, cannot be restored
                    signal.signal(sig, handler)
            self._selector.close()
            os.close(self._wake)
            os.close(wake_w)

    def _record(self, signum: int, frame: object) -> None:
        self._received.append(signum)

    def _spawn(self, launch: Launch) -> bool:
        """Start the command; False (with the exit code set) if it could not be started."""
        import selectors
        import subprocess

        # A terminal is inherited: colours and prompts work, and there is no log to protect.
        piped = [self.mask and not os.isatty(fd) for fd in (1, 2)]
        try:
            child = subprocess.Popen(
                self.argv, env=launch.env, process_group=0, close_fds=True,
                stdout=subprocess.PIPE if piped[0] else None,
                stderr=subprocess.PIPE if piped[1] else None,
                preexec_fn=_child_setup(self._foreground))
        except OSError as error:
            self._code = _cannot_run(self.argv[0], error)
            return False
        self._child, self.launch = child, launch
        for target, pipe in ((1, child.stdout), (2, child.stderr)):
            if pipe is not None:
                stream = _Stream(pipe, target, Masker(self._secrets))
                self._streams[stream.fd] = stream
                self._selector.register(stream.fd, selectors.EVENT_READ)
        return True

    def _loop(self) -> None:
        import signal
        import time

        next_poll = time.monotonic() + self.poll_interval if self.changed else None
        while self._code is None or self._streams:
            for key, _ in self._selector.select(self._timeout(next_poll, time.monotonic())):
                if key.fd == self._wake:  # its bytes do not matter: the handlers recorded
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake, 4096):
                            pass
                else:
                    self._pump(self._streams[key.fd])
            self._forward()
            self._reap(time.monotonic())
            now = time.monotonic()
            if self._kill_at is not None and now >= self._kill_at:
                self._signal(signal.SIGKILL)  # the grace period is over
                self._kill_at = None
            if next_poll is not None and now >= next_poll:
                if self._child is not None and self._restart is None:
                    self._poll(now)
                next_poll = now + self.poll_interval
            for stream in list(self._streams.values()):
                if stream.deadline is not None and now >= stream.deadline:
                    self._close(stream)

    def _timeout(self, next_poll: float | None, now: float) -> float | None:
        deadlines = [next_poll, self._kill_at, *(s.deadline for s in self._streams.values())]
        soonest = min((d for d in deadlines if d is not None), default=None)
        return None if soonest is None else max(0.0, soonest - now)

    def _forward(self) -> None:
        import signal

        stopping = {getattr(signal, name) for name in STOPPING}
        while self._received:
            sig = self._received.pop(0)
            if sig == signal.SIGCHLD:
                continue  # only here to wake the loop
            if sig in stopping:
                self._restart = None  # asked to stop: the exiting child is not restarted
            self._signal(sig)

    def _signal(self, sig: int) -> None:
        # Only while unreaped: until then its pid, and so its group id, cannot be reused.
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._child.pid, sig)

    def _reap(self, now: float) -> None:
        if self._child is None:
            return
        pid, status = os.waitpid(self._child.pid, os.WNOHANG)
        if pid == 0:
            return
        code = self._child.returncode = os.waitstatus_to_exitcode(status)
        self._child = None
        for stream in self._streams.values():  # a grandchild may hold them open: do not wait
            if stream.deadline is None:
                stream.deadline = now + DRAIN_SECONDS
        if self._restart is not None:  # it was stopped by us: a restart, not an exit
            launch, self._restart, self._kill_at = self._restart, None, None
            self._spawn(launch)
        else:
            self._code = code if code >= 0 else 128 - code  # killed by N: 128+N, as a shell says

    def _poll(self, now: float) -> None:
        """--watch: ask whether a value changed; reload or restart the child if so."""
        from secretfs.errors import SecretfsError

        assert self.changed is not None
        try:
            launch = self.changed()
        except SecretfsError as error:
            # Keep the running child: it has working values. Say so once, not every poll.
            message = f"secretfs: watch: {error}\n".encode(errors="replace")
            if message != self._watch_error:
                masker = Masker(self._secrets)  # errors never hold a value; this makes sure
                self._write(2, masker.feed(message) + masker.flush())
            self._watch_error = message
            return
        self._watch_error = None
        if launch is None:
            return
        self._secrets.extend(launch.secrets)
        for stream in self._streams.values():
            stream.masker.update(launch.secrets)
        if self.reload_signal is not None:
            self.launch = launch
            self._signal(self.reload_signal)
        else:
            import signal

            self._restart, self._kill_at = launch, now + self.grace
            self._signal(signal.SIGTERM)

    def _pump(self, stream: _Stream) -> None:
        data = os.read(stream.fd, CHUNK)
        if data:
            self._write(stream.target, stream.masker.feed(data))
        else:
            self._close(stream)

    def _close(self, stream: _Stream) -> None:
        """At EOF or at its drain deadline: write what was held back, stop reading."""
        self._write(stream.target, stream.masker.flush())
        self._selector.unregister(stream.fd)
        stream.pipe.close()
        del self._streams[stream.fd]

    def _write(self, fd: int, data: bytes) -> None:
        """Write all of *data*; if nobody reads *fd* any more, discard, but keep supervising."""
        view = memoryview(data)
        while view and fd not in self._broken:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:  # our fd was made non-blocking by someone sharing it
                import select

                select.select([], [fd], [])
            except OSError:  # EPIPE, or a closed fd
                self._broken.add(fd)

    def _abandon(self) -> None:
        """Leaving early (an exception): kill and reap the child, close its pipes."""
        if self._child is not None:
            import signal

            self._signal(signal.SIGKILL)
            self._child.wait()
            self._child = None
        for stream in list(self._streams.values()):
            self._selector.unregister(stream.fd)
            stream.pipe.close()
        self._streams.clear()


__all__ = ["CONCEALED", "Launch", "Masker", "Supervisor", "exec_child"]
