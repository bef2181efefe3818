"""`secretfs run` and `secretfs inject`: references in, a child (or a file) with values out.

The order is what makes it safe: collect every variable (refs.py), refuse what must not be
overridden, resolve *every* reference (resolve.py) — and only then start the child
(supervise.py). Any failure stops before the command runs, with the exit code of the failure and
the variable that caused it, so a half-configured program never starts.

How the child runs: plain mode replaces this process with the command (exec), so there is
nothing between the program and its supervisor (systemd, a shell, a container runtime). Masking
and watching need a process in between: the supervisor. Masking is on by default when output is
not a terminal; with both stdout and stderr on a terminal there is nothing to mask in logs and
the child keeps its TTY, so plain mode is used.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from injector.refs import Binding, collect, references, render, render_template, template_refs
from injector.resolve import MountSource, StoreSource, open_source
from secretfs.errors import SecretfsError, UsageError
from secretfs.model import SecretRef

if TYPE_CHECKING:
    from injector.supervise import Launch

PROTECTED = frozenset({"PATH", "HOME", "SHELL", "USER", "PWD", "TERM"})
PROTECTED_PREFIXES = ("LD_", "PYTHON")


@dataclass
class RunOptions:
    """What `secretfs run` was asked to do (the CLI's flags)."""

    command: list[str]
    env: list[str] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)
    mount: str | None = None
    config: str | None = None
    masking: bool = True
    watch: bool = False
    reload_signal: int | None = None
    grace: float = 10.0
    as_files: bool = False
    allow_override: list[str] = field(default_factory=list)
    dry_run: bool = False


def protected(name: str) -> bool:
    return name in PROTECTED or name.startswith(PROTECTED_PREFIXES)


def plan(options: RunOptions, environ: Mapping[str, str]) -> dict[str, Binding]:
    """Every variable of the child, checked: no secret over a protected name unless allowed."""
    bindings = collect(options.env, options.env_files, environ)
    allowed = set(options.allow_override)
    for binding in bindings.values():
        target = f"{binding.name}_FILE" if options.as_files else binding.name
        if binding.is_secret and (protected(binding.name) or protected(target)) \
                and binding.name not in allowed:
            raise UsageError(
                f"{binding.name} ({binding.source}): will not put a secret into {binding.name}",
                f"PATH, HOME, SHELL, USER, PWD, TERM, LD_* and PYTHON* are protected; "
                f"pass --allow-override {binding.name} if you mean it",
            )
    return bindings


def _named(error: SecretfsError, binding: Binding) -> SecretfsError:
    """The same error (same exit code), saying which variable it is about."""
    return type(error)(f"{binding.name} ({binding.source}): {error.what}", error.fix)


def _text(data: bytes, binding: Binding) -> str:
    if b"\0" in data:
        raise UsageError(f"{binding.name} ({binding.source}): the value holds a NUL byte, "
                         "which an environment variable cannot carry",
                         "use --as-files, or read it from the mount")
    return data.decode("utf-8", "surrogateescape")


def launch(bindings: Mapping[str, Binding], source: MountSource | StoreSource,
           as_files: bool = False) -> tuple[dict[str, str], tuple[bytes, ...]]:
    """The child's environment and the values to conceal: every reference read now."""
    read: dict[SecretRef, bytes] = {}
    env: dict[str, str] = {}
    for binding in bindings.values():
        if not binding.is_secret:
            env[binding.name] = binding.text
            continue
        for ref in binding.refs:
            if ref not in read:
                try:
                    read[ref] = source.read(ref)
                except SecretfsError as error:
                    raise _named(error, binding) from None
        if as_files:
            if not binding.whole or not isinstance(source, MountSource):
                raise UsageError(f"{binding.name} ({binding.source}): a template cannot be "
                                 "given as a file", "with --as-files, use whole references")
            env[f"{binding.name}_FILE"] = str(source.path(binding.refs[0]))
        else:
            values = {ref: _text(read[ref], binding) for ref in binding.refs}
            env[binding.name] = render(binding, values)
    return env, tuple(read.values())


def _print_plan(bindings: Mapping[str, Binding], where: str, as_files: bool) -> None:
    secret = [b for b in bindings.values() if b.is_secret]
    print(f"# {len(secret)} variable(s) from secretfs ({where}); values are never shown")
    for binding in secret:
        name = f"{binding.name}_FILE" if as_files else binding.name
        refs = ", ".join(f"secretfs://{ref.path}" for ref in binding.refs)
        shown = refs if binding.whole else f"template of {refs}"
        print(f"{name}\t{shown}\t({binding.source})")


def run(options: RunOptions, environ: Mapping[str, str] | None = None) -> int:
    """`secretfs run`: returns the exit code (plain mode never returns: it execs)."""
    from injector.supervise import Launch, Supervisor, exec_child

    environ = dict(os.environ if environ is None else environ)
    if not options.command:
        raise UsageError("no command given", "secretfs run [options] -- CMD [ARG ...]")
    bindings = plan(options, environ)
    if not references(bindings.values()) and not options.dry_run:
        # nothing to read: just run it, with the --env and --env-file variables all the same
        exec_child(options.command, {b.name: b.text for b in bindings.values()})
    source = open_source(options.mount, environ, options.config,
                         require_mount="--as-files" if options.as_files else None)
    try:
        if options.dry_run:
            _print_plan(bindings, source.where, options.as_files)
            return 0
        env, secrets = launch(bindings, source, options.as_files)
        supervise = options.watch or (options.masking and not (
            os.isatty(sys.stdout.fileno()) and os.isatty(sys.stderr.fileno())))
        if not supervise:
            source.close()
            exec_child(options.command, env)
        changed = Watch(bindings, source, options.as_files, env, secrets) \
            if options.watch else None
        supervisor = Supervisor(options.command, Launch(env, secrets), mask=options.masking,
                                changed=changed, reload_signal=options.reload_signal,
                                grace=options.grace)
        return supervisor.run()
    finally:
        source.close()


class Watch:
    """`--watch`: polled by the supervisor; a new Launch only when a value really changed.

    Each poll compares cheap, unaudited fingerprints (the version each reference points at);
    only when one moved are the references read again, and only a different content counts —
    a put of an identical value, or a rotation back and forth, triggers nothing.
    """

    def __init__(self, bindings: Mapping[str, Binding], source: MountSource | StoreSource,
                 as_files: bool, env: dict[str, str], secrets: tuple[bytes, ...]) -> None:
        self.bindings, self.source, self.as_files = bindings, source, as_files
        self.refs = references(bindings.values())
        self.current = (env, secrets)
        self.fingerprints = self._fingerprints()

    def _fingerprints(self) -> dict[SecretRef, object]:
        return {ref: self.source.fingerprint(ref) for ref in self.refs}

    def __call__(self) -> Launch | None:
        from injector.supervise import Launch

        now = self._fingerprints()
        if now == self.fingerprints:
            return None
        fresh = launch(self.bindings, self.source, self.as_files)
        self.fingerprints = now
        if fresh == self.current:
            return None
        self.current = fresh
        return Launch(*fresh)


# -- secretfs inject ------------------------------------------------------------------------------


MAX_TEMPLATE_BYTES = 16 * 1024 * 1024  # a configuration file, not a disk image


def inject(template: str, output: str | None, *, force: bool = False, mount: str | None = None,
           config: str | None = None) -> int:
    """Render a template's ``{{ secretfs://… }}`` placeholders into *output* (created 0600),
    or to stdout when *output* is None or ``-``."""
    path = Path(template)
    try:
        if template == "-":
            raw = sys.stdin.buffer.read(MAX_TEMPLATE_BYTES + 1)
        else:
            with open(path, "rb") as file:
                raw = file.read(MAX_TEMPLATE_BYTES + 1)
        text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"-i {template}: cannot read it ({getattr(error, 'strerror', error)})"
                         ) from None
    if len(raw) > MAX_TEMPLATE_BYTES:
        raise UsageError(f"-i {template}: larger than {MAX_TEMPLATE_BYTES >> 20} MiB",
                         "is it the right file?")
    refs = template_refs(text, template)
    source = open_source(mount, os.environ, config)
    try:
        values: dict[SecretRef, str] = {}
        for ref in refs:
            try:
                values[ref] = source.read(ref).decode("utf-8", "surrogateescape")
            except SecretfsError as error:
                raise type(error)(f"{template}: {error.what}", error.fix) from None
    finally:
        source.close()
    rendered = render_template(text, values).encode("utf-8", "surrogateescape")
    if output in (None, "-"):
        sys.stdout.buffer.write(rendered)
        sys.stdout.flush()
        return 0
    _write_private(Path(output), rendered, force)
    return 0


def _write_private(target: Path, data: bytes, force: bool) -> None:
    """Write *data* to *target*, mode 0600 from the first byte; never over an existing file
    unless *force* (then atomically: a temp file beside it, renamed over)."""
    if not force:
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise UsageError(f"-o {target}: exists", "pass --force to replace it") from None
        except OSError as error:
            raise UsageError(f"-o {target}: {error.strerror}") from None
        _write_all(fd, data)
        return
    temp = target.with_name(f".{target.name}.secretfs-{os.getpid()}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        _write_all(fd, data)
        os.replace(temp, target)
    except OSError as error:
        temp.unlink(missing_ok=True)
        raise UsageError(f"-o {target}: {error.strerror}") from None


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["PROTECTED", "RunOptions", "Watch", "inject", "launch", "plan", "run"]

