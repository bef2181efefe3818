"""The ``secretfs`` command (CONTRACT.md is its specification).

Start-up time is part of the interface: scripts call ``secretfs secrets get`` in loops. So this
module imports only argparse at the top; each command imports what it uses when it runs, and
nothing on the ``get``/``list`` paths imports trio, pyfuse3, keyring or croniter.

Every failure a user can cause ends as one line, ``secretfs: <what> (<fix>)``, and the exit code
of CONTRACT.md. A traceback means a bug, and is shown only with SECRETFS_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from secretfs.config import Config
    from secretfs.manager import SyncSecretsManager
    from secretfs.model import SecretMetadata

USAGE_EXIT = 2


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns - 2
    except (OSError, ValueError):
        return 78


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, told the terminal width: left to itself it imports shutil (and
    with it bz2 and lzma, ~2.5 ms) for every command, since add_argument builds a formatter."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_width())


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, like every other error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments"):
            # argparse would echo them, and one may be a value: never print it.
            message = ("unrecognized arguments (a value that starts with '-' goes after '--': "
                       "secretfs secrets put NAME -- VALUE)")
        self.exit(USAGE_EXIT, f"secretfs: {message} (see '{self.prog} --help')\n")


# -- helpers ----------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    from secretfs.config import load_config

    return load_config(args.config)


def _manager(args: argparse.Namespace) -> SyncSecretsManager:
    from secretfs.manager import SyncSecretsManager

    return SyncSecretsManager.from_config(_config(args))


def _pairs(items: Sequence[str] | None, flag: str) -> dict[str, str] | None:
    """``["k=v", …]`` from a repeated ``--flag K=V`` option, as a dict (None if not given)."""
    if not items:
        return None
    from secretfs.errors import UsageError

    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item.split('=')[0]!r}…")
        pairs[key] = value
    return pairs


def _print_json(document: Any) -> None:
    import json

    print(json.dumps(document, indent=2, sort_keys=True, default=str))


def _write_value(data: bytes) -> None:
    """Exactly the stored bytes; a newline only for a human at a terminal."""
    out = sys.stdout.buffer
    out.write(data)
    if sys.stdout.isatty() and not data.endswith(b"\n"):
        out.write(b"\n")
    out.flush()


def _when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z") if moment else "-"


# -- init -------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from secretfs.manager import SyncSecretsManager

    config = _config(args)
    settings = config.manager
    store_path = settings.backend.path
    existed = settings.backend.type == "local" and store_path.exists()
    with SyncSecretsManager.from_config(config, create=True) as manager:
        backend = manager.backend
        if settings.backend.type != "local":
            print(f"backend {backend.kind} reachable; nothing to create")
        elif existed:
            print(f"store already initialised at {store_path}")
        else:
            print(f"created store {store_path}")
            print(f"master key: {settings.encryption.key_file} "
                  f"({settings.encryption.provider} provider, id {backend.store_key_id})")
            print("back the master key up: without it the store cannot be read")
    return 0


# -- secrets put ------------------------------------------------------------------------------


def _value_from_args(args: argparse.Namespace) -> Any:
    """The value the flags describe, or None when only metadata is being changed."""
    from secretfs.errors import UsageError

    sources = [
        name for name, given in (
            ("VALUE", args.value is not None), ("--from-file", args.from_file is not None),
            ("--stdin", args.stdin), ("--key", bool(args.key)), ("--generate", args.generate),
        ) if given
    ]
    if len(sources) > 1:
        raise UsageError(f"give the value one way, not {' and '.join(sources)}")
    if args.json_value and (args.key or args.generate):
        raise UsageError("--json-value applies to VALUE, --from-file or --stdin")
    _refuse_argv_value(args)
    if args.generate:
        from secretfs.rotation.generate import generate

        return generate(_generator(args))
    if args.key:
        _check_text(("--key", item) for item in args.key)
        return _pairs(args.key, "--key")
    if args.value is not None:
        raw: bytes = os.fsencode(args.value)  # the bytes as given, even if not UTF-8
    elif args.from_file is not None:
        raw = _read_file(args.from_file)
    elif args.stdin and _stdin_is_terminal():
        raw = _read_hidden_line(args.name)
    elif args.stdin:
        from secretfs.model import MAX_VALUE_BYTES

        # Bounded: one byte over the limit (plus the newline dropped below) is enough to refuse.
        raw = sys.stdin.buffer.read(MAX_VALUE_BYTES + 2)
        if raw.endswith(b"\n"):  # `echo pw | …` must store pw; exact bytes: use --from-file
            raw = raw[:-1]
    else:
        return None
    _check_size(raw)
    if args.json_value:
        return _json_object(raw)
    return raw


def _check_size(raw: bytes) -> None:
    """Inputs are read only up to one byte over the limit: say so before parsing a cut JSON."""
    from secretfs.errors import ValueTooLarge
    from secretfs.model import MAX_VALUE_BYTES

    if len(raw) > MAX_VALUE_BYTES:
        raise ValueTooLarge(f"value is over the {MAX_VALUE_BYTES}-byte limit",
                            "store large files elsewhere and keep their key here")


def _stdin_is_terminal() -> bool:
    try:
        return os.isatty(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):  # closed, or not a real file
        return False


def _refuse_argv_value(args: argparse.Namespace) -> None:
    """A value typed on the command line shows in `ps` (to every user) and stays in the shell's
    history. At a terminal that is a person typing it: refuse, and say how to give it safely.
    Scripts (stdin not a terminal) may pass one — see docs/cli.md."""
    from secretfs.errors import UsageError

    if args.insecure_argv or not (args.value is not None or args.key) \
            or not _stdin_is_terminal():
        return
    if args.key:
        raise UsageError(
            "refusing --key values on the command line: they show in ps and your shell history",
            "type or pipe the map as JSON with --stdin --json-value, or use --from-file F "
            "--json-value; --insecure-argv allows it")
    raise UsageError(
        "refusing a value on the command line: it shows in ps and your shell history",
        "use --stdin to type or pipe it, --from-file F or --generate; "
        "--insecure-argv allows it")


def _read_hidden_line(name: str) -> bytes:
    """`--stdin` at a terminal: one line, typed without echo (like a password prompt)."""
    import termios

    from secretfs.errors import UsageError
    from secretfs.model import MAX_VALUE_BYTES

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    quiet = list(old)
    quiet[3] &= ~termios.ECHO
    try:
        termios.tcsetattr(fd, termios.TCSADRAIN, quiet)  # before the prompt, so nothing
        sys.stderr.write(f"value for {name} (not shown; Enter to store it): ")  # is echoed
        sys.stderr.flush()
        line = sys.stdin.buffer.readline(MAX_VALUE_BYTES + 2)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
        sys.stderr.write("\n")
        sys.stderr.flush()
    value = line[:-1] if line.endswith(b"\n") else line
    if not value:
        raise UsageError("no value typed: nothing stored",
                         "type the value and press Enter, or pipe it into --stdin")
    return value


def _check_text(items: Any) -> None:
    """Metadata and map keys are text: refuse arguments that are not UTF-8 (naming only the
    flag: the text may be a value)."""
    from secretfs.errors import UsageError

    for flag, text in items:
        if text is None:
            continue
        try:
            text.encode()
        except UnicodeEncodeError:
            raise UsageError(f"{flag}: not valid UTF-8 text") from None


def _read_file(path: str, limit: int | None = None) -> bytes:
    """At most *limit* + 1 bytes of *path* (default: one value's limit + 1): the caller tells
    "too large" from "exactly the limit" by the length."""
    from secretfs.errors import UsageError
    from secretfs.model import MAX_VALUE_BYTES

    shown = path if path.isprintable() and len(path) <= 200 else repr(path[:200])
    try:
        with open(path, "rb") as file:
            data = file.read((MAX_VALUE_BYTES if limit is None else limit) + 1)
    except OSError as error:
        raise UsageError(f"cannot read {shown}: {error.strerror}") from None
    except ValueError:  # a NUL in the path (only possible through main(argv))
        raise UsageError(f"cannot read {shown}: the path contains a NUL byte") from None
    return data


def _json_object(raw: bytes) -> dict[str, Any]:
    import json

    from secretfs.errors import UsageError

    try:
        document = json.loads(raw)
    except UnicodeDecodeError:
        raise UsageError("--json-value: not valid JSON (the text is not UTF-8)") from None
    except ValueError as error:
        raise UsageError(f"--json-value: not valid JSON ({error.msg} at line {error.lineno})"
                         ) from None
    except RecursionError:
        raise UsageError("--json-value: the JSON is nested too deeply",
                         "a map-valued secret is one flat object of keys to values") from None
    if not isinstance(document, dict):
        raise UsageError("--json-value: expected a JSON object of keys to values")
    return document


def _generator(args: argparse.Namespace) -> Any:
    from secretfs.model import GeneratorSpec
    from secretfs.rotation.generate import check_spec

    return check_spec(GeneratorSpec(
        length=args.length, charset=args.charset, kind=args.kind,
        require_each=args.require_each, exclude=args.exclude or "",
        exclude_ambiguous=args.exclude_ambiguous))


def _rotation_from_args(args: argparse.Namespace) -> Any:
    """A RotationPolicy when any rotation flag is given, else None (keep the stored one)."""
    from secretfs.errors import UsageError
    from secretfs.model import RotationPolicy, parse_duration

    flags = (args.rotate_every, args.rotate_schedule, args.overlap, args.set_cmd,
             args.validate_cmd, args.max_age, args.rotate_key)
    if all(flag is None for flag in flags):
        return None
    if args.rotate_every and args.rotate_schedule:
        raise UsageError("give --rotate-every or --rotate-schedule, not both")

    def duration(flag: str, text: str | None) -> float | None:
        if text is None:
            return None
        try:
            return parse_duration(text)
        except ValueError as error:
            raise UsageError(f"{flag}: {error}") from None

    schedule = args.rotate_schedule
    if schedule is not None:
        from secretfs.rotation.schedule import check_schedule

        check_schedule(schedule)
    return RotationPolicy(
        interval=duration("--rotate-every", args.rotate_every), schedule=schedule,
        overlap=duration("--overlap", args.overlap), generator=_generator(args),
        set_cmd=args.set_cmd, validate_cmd=args.validate_cmd,
        max_age=duration("--max-age", args.max_age), key=args.rotate_key,
    )


def cmd_put(args: argparse.Namespace) -> int:
    from secretfs.errors import UsageError
    from secretfs.model import Secret, validate_name

    name = validate_name(args.name)
    _check_text([("--description", args.description), ("--charset", args.charset),
                 ("--exclude", args.exclude), ("--rotate-key", args.rotate_key),
                 ("--set-cmd", args.set_cmd), ("--validate-cmd", args.validate_cmd),
                 *(("--tag", tag) for tag in args.tag or ())])
    value = _value_from_args(args)
    tags = _pairs(args.tag, "--tag")
    rotation = _rotation_from_args(args)
    with _manager(args) as manager:
        if value is None:
            if args.description is None and tags is None and rotation is None:
                raise UsageError(
                    "no value given", "pass VALUE, --from-file F, --stdin, --key K=V or --generate"
                )
            manager.update_metadata(name, description=args.description, tags=tags,
                                    rotation=rotation)
            result = {"name": name, "version": None}
            message = f"{name}: metadata updated (no new version)"
        else:
            version = manager.store(
                Secret(name, value, args.description, tags, rotation), cas=args.cas
            )
            result = {"name": name, "version": version}
            message = f"{name}: version {version}"
    if args.json:
        _print_json(result)
    else:
        print(message)
    return 0


# -- secrets get / list / info / versions ------------------------------------------------------


def cmd_get(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        _write_value(manager.read(args.ref))
    return 0


def _summary(metadata: SecretMetadata) -> dict[str, Any]:
    return {
        "name": metadata.name,
        "description": metadata.description,
        "tags": dict(metadata.tags),
        "current_version": metadata.current_version,
        "versions": len(metadata.versions),
        "updated": metadata.updated.isoformat() if metadata.updated else None,
    }


def cmd_list(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        found = manager.list(args.prefix or "")
    if args.json:
        _print_json([_summary(metadata) for metadata in found])
    else:
        sys.stdout.write("".join(f"{metadata.name}\n" for metadata in found))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from secretfs.model import format_duration

    with _manager(args) as manager:
        metadata = manager.info(args.name)
        backend = manager.backend.kind
        capabilities = getattr(manager.backend, "capabilities", None)
        if capabilities is not None and "versions" not in capabilities:
            backend += " (keeps only the newest version)"
        settings = manager.rotation
    document = metadata.to_json()
    current = metadata.version_info(metadata.current_version or 0)
    next_due = None
    if metadata.rotation and current:
        from secretfs.rotation.schedule import next_rotation

        next_due = next_rotation(metadata, settings)
    document["next_rotation"] = next_due.isoformat() if next_due else None
    document["backend"] = backend
    if args.json:
        _print_json(document)
        return 0
    labels = ", ".join(f"{label.value} → {version}"
                       for label, version in sorted(metadata.labels.items()))
    rows = [
        ("name", metadata.name),
        ("description", metadata.description or "-"),
        ("tags", ", ".join(f"{k}={v}" for k, v in sorted(metadata.tags.items())) or "-"),
        ("type", (f"{'map' if current.is_map else 'single value'} "
                  f"(keys: {', '.join(current.keys)})") if current else "-"),
        ("versions", ", ".join(str(v.version) for v in metadata.versions) or "-"),
        ("labels", labels or "-"),
        ("created", _when(metadata.created)),
        ("updated", _when(metadata.updated)),
        ("backend", backend),
    ]
    policy = metadata.rotation
    if policy is not None:
        every = (f"every {format_duration(policy.interval)}" if policy.interval
                 else f"schedule '{policy.schedule}'" if policy.schedule else "manual")
        extra = f", overlap {format_duration(policy.overlap)}" if policy.overlap else ""
        spec = policy.generator
        generator = (", uuid" if spec.kind == "uuid" else
                     f", {spec.length} random bytes" if spec.kind == "bytes" else
                     f", {spec.length} × {spec.charset}"
                     + (" (each class)" if spec.require_each else ""))
        if policy.key:
            generator += f", key {policy.key}"
        rows.append(("rotation", every + extra + generator
                     + ("" if policy.enabled else " (disabled)")))
        rows.append(("next rotation", _when(next_due)))
    else:
        rows.append(("rotation", "none"))
    width = max(len(key) for key, _ in rows) + 2
    for key, value in rows:
        print(f"{key + ':':<{width}}{value}")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        metadata = manager.info(args.name)
    if args.json:
        _print_json([info.to_json() for info in metadata.versions])
        return 0
    labels_of: dict[int, list[str]] = {}
    for label, version in sorted(metadata.labels.items()):
        labels_of.setdefault(version, []).append(label.value)
    print(f"{'VERSION':<8}  {'CREATED':<23}  {'STATE':<9}  {'KEYS':<20}  LABELS")
    for info in metadata.versions:
        state = "destroyed" if info.destroyed else "deleted" if info.deleted else "active"
        keys = ",".join(info.keys)
        print(f"{info.version:<8}  {_when(info.created):<23}  {state:<9}  {keys:<20}  "
              f"{','.join(labels_of.get(info.version, [])) or '-'}")
    return 0


# -- secrets rm / undelete --------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        manager.delete(args.name, version=args.version, destroy=args.destroy)
    what = f"version {args.version} of {args.name}" if args.version else args.name
    if args.destroy:
        print(f"{what}: destroyed")
    else:
        again = f" --version {args.version}" if args.version else ""
        print(f"{what}: deleted (undo with 'secretfs secrets undelete {args.name}{again}')")
    return 0


def cmd_undelete(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        manager.undelete(args.name, version=args.version)
    print(f"{f'version {args.version} of ' if args.version else ''}{args.name}: restored")
    return 0


# -- migrate / import ------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from secretfs.config import load_config
    from secretfs.manager import SyncSecretsManager
    from secretfs.migrate import Progress, migrate

    with SyncSecretsManager.from_config(load_config(args.source)) as source, \
            SyncSecretsManager.from_config(load_config(args.target), create=True) as target:
        report = migrate(source, target, args.prefix or "", progress=Progress())
    print(f"migrated {report.secrets} secrets: {report.written} versions written, "
          f"{report.present} already there")
    return 0


MAX_IMPORT_BYTES = 64 * 1024 * 1024  # a dotenv or JSON file of many secrets


def cmd_import(args: argparse.Namespace) -> int:
    from secretfs.errors import UsageError
    from secretfs.migrate import import_pairs, read_import

    kind = args.format or ("json" if args.file.endswith(".json") else "dotenv")
    # Many secrets per file: bounded far above one value's 1 MiB, but bounded.
    raw = (sys.stdin.buffer.read(MAX_IMPORT_BYTES + 1) if args.file == "-"
           else _read_file(args.file, MAX_IMPORT_BYTES))
    if len(raw) > MAX_IMPORT_BYTES:
        raise UsageError(f"{args.file}: larger than {MAX_IMPORT_BYTES >> 20} MiB",
                         "split it into several imports")
    pairs = read_import(raw.decode("utf-8", "replace"), args.file, kind)
    with _manager(args) as manager:
        count = import_pairs(manager, pairs, args.prefix or "")
    print(f"imported {count} secrets")
    return 0


# -- backup / restore (secretfs/backup.py) ----------------------------------------------------


def _protection(args: argparse.Namespace, *, confirm: bool) -> Callable[[], Any]:
    from secretfs.backup import protection_from

    return lambda: protection_from(args.passphrase_file, args.key_file, confirm=confirm)


def cmd_backup(args: argparse.Namespace) -> int:
    from pathlib import Path

    from secretfs.backup import backup
    from secretfs.manager import SyncSecretsManager

    config = _config(args)
    with SyncSecretsManager.from_config(config) as manager:
        report = backup(manager, Path(args.file), _protection(args, confirm=True),
                        force=args.force, config=config)
        kind = manager.backend.kind
    if report.created_key_file is not None:
        print(f"created key file {report.created_key_file}: keep it apart from the archive and "
              "from this host")
    print(f"backed up {report.secrets} secrets ({report.versions} versions) to {report.path}")
    if not report.complete:
        print(f"note: the {kind} backend does not show soft-deleted secrets or the values of "
              "deleted versions: they are not in the archive")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from datetime import datetime
    from pathlib import Path

    from secretfs.backup import policies_note, read_archive, restore

    out = Path(args.policies_out) if args.policies_out else None
    config = None
    if args.check:
        report = read_archive(Path(args.file), _protection(args, confirm=False),
                              policies_out=out)
        made = datetime.fromtimestamp(report.created).astimezone()
        print(f"backup archive {report.path} is intact: {report.secrets} secrets "
              f"({report.versions} versions) from the {report.backend} backend, made "
              f"{_when(made)} by secretfs {report.secretfs}")
    else:
        from secretfs.manager import SyncSecretsManager

        config = _config(args)
        local = config.manager.backend.type == "local"  # a new host: create the store
        with SyncSecretsManager.from_config(config, create=local) as manager:
            report = restore(manager, Path(args.file), _protection(args, confirm=False),
                             policies_out=out)
        print(f"restored {report.secrets} secrets ({report.versions} versions) from "
              f"{report.path}")
    if not report.complete:
        print(f"note: the archive was made through the {report.backend} backend: soft-deleted "
              "secrets and the values of deleted versions are not in it")
    print(policies_note(report, config))
    return 0


# -- rotation -------------------------------------------------------------------------------


def _rotation_line(result: Any) -> str:
    versions = f"{result.old_version} → {result.new_version}" if result.new_version else \
        f"current stays {result.old_version}"
    return f"{result.name}: {result.outcome} ({versions})"


def cmd_rotate(args: argparse.Namespace) -> int:
    from secretfs.model import validate_name

    with _manager(args) as manager:
        result = manager.rotate(validate_name(args.name))
    if args.json:
        _print_json(result.__dict__)
    else:
        print(_rotation_line(result))
    return 0


def cmd_run_due(args: argparse.Namespace) -> int:
    from secretfs.errors import RotationFailed

    with _manager(args) as manager:
        results = manager.rotator().run_due()
    if args.json:
        _print_json([result.__dict__ for result in results])
    else:
        for result in results:
            print(_rotation_line(result))
    return RotationFailed.exit_code if any(r.outcome == "failed" for r in results) else 0


# -- secrets check-access ---------------------------------------------------------------------


class _FixedClock:
    """`--at`: evaluate time windows at that moment."""

    def __init__(self, moment: Any) -> None:
        self.moment = moment

    def now(self) -> Any:
        return self.moment


def _process_caller(pid: int) -> Any:
    """The Caller a request from process *pid* would carry (its effective uid and gid)."""
    from secretfs.access.principal import ProcessGone, read_process
    from secretfs.errors import NotFound

    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            fields = dict(line.split(b":", 1) for line in status if b":" in line)
        uid, gid = int(fields[b"Uid"].split()[1]), int(fields[b"Gid"].split()[1])
        return read_process(pid, uid, gid)
    except (OSError, KeyError, ProcessGone):
        raise NotFound(f"no process {pid}", "give the pid of a running process") from None


def cmd_check_access(args: argparse.Namespace) -> int:
    from secretfs.access.policy import CallerFacts, access_control
    from secretfs.errors import UsageError

    given = [flag for flag, value in (("--principal", args.principal), ("--pid", args.pid),
                                      ("--uid", args.uid)) if value is not None]
    if len(given) != 1:
        raise UsageError("give exactly one of --principal, --pid or --uid")
    options: dict[str, Any] = {}
    if args.at is not None:
        from datetime import datetime

        try:
            moment = datetime.fromisoformat(args.at)
        except ValueError:
            raise UsageError(f"--at: {args.at!r} is not an ISO time",
                             "e.g. 2026-01-05T10:00 or 2026-01-05T10:00+01:00") from None
        options["clock"] = _FixedClock(moment if moment.tzinfo else moment.astimezone())
    facts = None
    if args.address is not None:
        import ipaddress

        try:
            facts = CallerFacts(addresses=(ipaddress.ip_address(args.address),))
        except ValueError:
            raise UsageError(f"--address: {args.address!r} is not an IP address") from None
        options["facts"] = lambda caller: facts
    engine = access_control(_config(args), os.geteuid(), **options)
    if args.principal is not None:
        decision = engine.check_access(args.principal, args.action, args.resource, facts)
    else:
        from secretfs.access.principal import Caller

        caller = (_process_caller(args.pid) if args.pid is not None
                  else Caller(uid=args.uid, gid=args.uid, pid=0))
        decision = engine.check(caller, args.action, args.resource)
    verdict = "allow" if decision.allowed else "deny"
    if args.json:
        _print_json({"decision": verdict, "principal": decision.principal,
                     "reason": decision.reason, "action": args.action,
                     "resource": args.resource})
    else:
        print(f"{verdict}: {decision.reason}")
        print(f"principal: {decision.principal}")
    return 0 if decision.allowed else 1


# -- audit ----------------------------------------------------------------------------------


def _audit_key(args: argparse.Namespace) -> tuple[Any, bytes]:
    from secretfs.auditlog import audit_key
    from secretfs.crypto.keys import configured_master_key

    config = _config(args)
    master = configured_master_key(config.manager.encryption, create=False)
    return config.manager.audit.path, audit_key(master)


def cmd_audit_tail(args: argparse.Namespace) -> int:
    from secretfs.auditlog import tail

    path = _config(args).manager.audit.path
    records = tail(path, args.lines) if path.exists() else []
    if args.json:
        _print_json(records)
        return 0
    for record in records:
        caller = record.get("caller") or {}
        print(f"{record.get('time')}  {record.get('event'):<8} {record.get('decision'):<5} "
              f"{record.get('resource')}  pid={caller.get('pid')} uid={caller.get('uid')} "
              f"principal={record.get('principal')}  {record.get('reason')}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from secretfs.auditlog import verify

    path, key = _audit_key(args)
    result = verify(path, key)
    if result.ok:
        print(f"audit log intact: {result.lines} lines ({path})")
        return 0
    print(f"secretfs: audit log tampered: {result.file}:{result.first_bad_line}: "
          f"{result.problem}", file=sys.stderr)
    return 1


# -- keys (secretfs/crypto/rotate.py) ---------------------------------------------------------


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from secretfs.crypto.rotate import rotate_master_key

    report = rotate_master_key(_config(args), batch_size=args.batch_size, pause=args.pause)
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.summary())
    return 0


def cmd_keys_status(args: argparse.Namespace) -> int:
    from secretfs.crypto.rotate import key_status

    status = key_status(_config(args))
    if args.json:
        _print_json(status)
        return 0
    print(f"provider: {status['provider']} (key_file {status['key_file']}, backend "
          f"{status['backend']})")
    print(f"{'KEY ID':<28}  {'STATE':<8}  {'VERSIONS':>8}  {'CREATED':<25}  WHERE")
    for key in status["keys"]:
        versions = "-" if key["versions"] is None else str(key["versions"])
        print(f"{key['key_id']:<28}  {key['state']:<8}  {versions:>8}  "
              f"{key['created'] or '-':<25}  {key['where'] or '-'}")
    if status["rotation_unfinished"]:
        print(f"rotation: unfinished, {status['versions_behind']} version(s) still wrapped by "
              "an old key (run 'secretfs keys rotate' to finish it)")
    else:
        print("rotation: none unfinished")
    return 0


# -- mount / umount ---------------------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    from pathlib import Path

    from secretfs.fs.daemon import mount

    return mount(Path(args.mountpoint), config_source=args.config, foreground=args.foreground,
                 log_file=Path(args.log_file) if args.log_file else None)


def cmd_umount(args: argparse.Namespace) -> int:
    from pathlib import Path

    from secretfs.fs.daemon import unmount

    unmount(Path(args.mountpoint))
    return 0


# -- doctor -----------------------------------------------------------------------------------


def cmd_doctor(args: argparse.Namespace) -> int:
    from secretfs.doctor import doctor

    return doctor(args.config, as_json=args.json)


# -- the parser -------------------------------------------------------------------------------


# -- run / inject ---------------------------------------------------------------------------


def _signal_number(text: str) -> int:
    import signal

    name = text.upper()
    if name.isdigit():
        return int(name)
    try:
        return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {text!r} (e.g. HUP, USR1)") from None


def _duration(text: str) -> float:
    from secretfs.model import parse_duration

    try:
        return parse_duration(text)
    except ValueError as error:  # what parse_duration raises
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from injector.run import RunOptions, run

    command = list(args.cmd)
    if command[:1] == ["--"]:
        command = command[1:]
    return run(RunOptions(
        command=command, env=args.env or [], env_files=args.env_file or [], mount=args.mount,
        config=args.config, masking=not args.no_masking, watch=args.watch,
        reload_signal=args.reload_signal, grace=args.grace, as_files=args.as_files,
        allow_override=args.allow_override or [], dry_run=args.dry_run,
    ))


def cmd_inject(args: argparse.Namespace) -> int:
    from injector.run import inject

    return inject(args.input, args.output, force=args.force, mount=args.mount,
                  config=args.config)


def _positive(text: str) -> int:
    from secretfs.model import MAX_VERSION

    # the length first: int() of a 5,000-digit string is refused by Python itself
    if not text.isdigit() or len(text) > 19 or not 1 <= int(text) <= MAX_VERSION:
        raise argparse.ArgumentTypeError(
            f"expected a version number from 1 to {MAX_VERSION}, got {text[:40]!r}")
    return int(text)


def _prefix(text: str) -> str:
    """A name prefix: text, since names are (a prefix that is not UTF-8 matches nothing)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("a prefix must be valid UTF-8 text") from None
    return text


def _positive_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1, got {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(text)


def _invoked(argv: Sequence[str]) -> tuple[str, ...]:
    """The command words in *argv* (``("secrets", "get", …)``): the words that are not options,
    skipping the value of the one top-level option that takes one (``--config``)."""
    words: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif arg == "--":
            break
        elif not arg.startswith("-"):
            words.append(arg)
    return tuple(words)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with *argv*, only the invoked command gets its arguments.

    Every command is registered (so help lists them and typos are caught), but adding the
    arguments of twenty commands costs several ms a one-shot command should not pay; each
    command's arguments are a function, called only for the command being run.
    """
    invoked = None if argv is None else _invoked(argv)
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="config file (default: $SECRETFS_CONFIG, then the standard places)")
    parser = _Parser(
        prog="secretfs", parents=[common],
        description="Secrets as files and environment variables: encrypted, versioned, audited.",
    )
    from secretfs import __version__

    parser.add_argument("--version", action="version", version=f"secretfs {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)

    def group(name: str, help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text)
        return sub.add_subparsers(dest="verb", required=True, metavar="VERB",
                                  parser_class=_Parser)

    def command(parent: Any, words: tuple[str, ...], handler: Callable[[argparse.Namespace], int],
                help_text: str,
                arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
        sub = parent.add_parser(words[-1], parents=[common], help=help_text,
                                description=help_text)
        sub.set_defaults(handler=handler)
        if arguments is not None and (invoked is None or invoked[:len(words)] == words):
            arguments(sub)

    command(commands, ("init",), cmd_init, "create the embedded store and master key (idempotent)")

    def mount_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("mountpoint", metavar="MOUNTPOINT")
        sub.add_argument("--foreground", action="store_true",
                         help="serve in this process (for systemd) instead of forking a daemon")
        sub.add_argument("--log-file", metavar="F",
                         help="daemon log (default: mount.log beside the audit log)")

    command(commands, ("mount",), cmd_mount,
            "serve the secrets as a read-only file tree (FUSE)", mount_arguments)

    def umount_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("mountpoint", metavar="MOUNTPOINT")

    command(commands, ("umount",), cmd_umount, "unmount a secretfs mount", umount_arguments)

    def doctor_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true",
                         help="print a JSON list of {check, status, detail, fix}")

    command(commands, ("doctor",), cmd_doctor,
            "check FUSE, permissions, config, policy, backend, keys, mounts, audit log, clock "
            "(exit 1 if a check fails)", doctor_arguments)

    def run_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--env", action="append", metavar="NAME=REF",
                         help="set NAME from a reference, or a text with {{ secretfs://… }} "
                              "placeholders (repeat; wins over --env-file and the environment)")
        sub.add_argument("--env-file", action="append", metavar="F",
                         help="dotenv file of NAME=REF lines (repeat; wins over the environment)")
        sub.add_argument("--mount", metavar="M",
                         help="read through this secretfs mount (default: $SECRETFS_MOUNT, then "
                              "the configured mount if live, else the store itself)")
        sub.add_argument("--no-masking", action="store_true",
                         help="do not conceal values in the command's output (masking is on "
                              "when output is not a terminal; on a terminal the command keeps "
                              "its TTY and nothing is masked)")
        sub.add_argument("--watch", action="store_true",
                         help="restart the command when a referenced value changes")
        sub.add_argument("--reload-signal", type=_signal_number, metavar="SIG",
                         help="with --watch: send SIG instead of restarting")
        sub.add_argument("--grace", type=_duration, default=10.0, metavar="DURATION",
                         help="with --watch: how long a restart waits after SIGTERM before "
                              "SIGKILL (default 10s)")
        sub.add_argument("--as-files", action="store_true",
                         help="give NAME_FILE=<path under the mount> instead of the value, so "
                              "no value sits in the environment (needs a mount)")
        sub.add_argument("--allow-override", action="append", metavar="NAME",
                         help="allow a secret into a protected variable (PATH, HOME, LD_*, …)")
        sub.add_argument("--dry-run", action="store_true",
                         help="list the variables that would be set, and from which "
                              "references, without reading a value")
        sub.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG ...]")

    command(commands, ("run",), cmd_run,
            "run a command with secrets in its environment", run_arguments)

    def inject_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-i", "--input", required=True, metavar="TEMPLATE",
                         help="a text with {{ secretfs://… }} placeholders (- for stdin)")
        sub.add_argument("-o", "--output", metavar="FILE",
                         help="where to write it, created 0600 (default: stdout)")
        sub.add_argument("--force", action="store_true", help="replace FILE if it exists")
        sub.add_argument("--mount", metavar="M", help="read through this secretfs mount")

    command(commands, ("inject",), cmd_inject,
            "render a template's secretfs references into a private file", inject_arguments)

    def migrate_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--from", dest="source", required=True, metavar="CONFIG",
                         help="the configuration of the backend to copy from")
        sub.add_argument("--to", dest="target", required=True, metavar="CONFIG",
                         help="the configuration of the backend to copy to")
        sub.add_argument("--prefix", metavar="P", type=_prefix,
                         help="only secrets whose name starts with P")

    command(commands, ("migrate",), cmd_migrate,
            "copy every secret, version, label and tag to another backend (resumable)",
            migrate_arguments)

    def archive_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("file", metavar="FILE", help="the archive")
        key = sub.add_mutually_exclusive_group()
        key.add_argument("--passphrase-file", metavar="F",
                         help="the passphrase: the first line of F (mode 0600); default: "
                              "$SECRETFS_PASSPHRASE, else asked on the terminal")
        key.add_argument("--key-file", metavar="K",
                         help="protect with a key file (32 random bytes, base64, mode 0600) "
                              "instead of a passphrase; backup creates it if missing")

    def backup_arguments(sub: argparse.ArgumentParser) -> None:
        archive_arguments(sub)
        sub.add_argument("--force", action="store_true", help="replace FILE if it exists")

    command(commands, ("backup",), cmd_backup,
            "write an encrypted archive of the whole store, policies included (docs/backup.md)",
            backup_arguments)

    def restore_arguments(sub: argparse.ArgumentParser) -> None:
        archive_arguments(sub)
        sub.add_argument("--check", action="store_true",
                         help="only decrypt and verify the archive and say what it holds")
        sub.add_argument("--policies-out", metavar="F",
                         help="write the archive's principals and policies to F (0600)")

    command(commands, ("restore",), cmd_restore,
            "fill an empty store from an archive, exactly (all or nothing; docs/backup.md)",
            restore_arguments)

    rotation_verbs = group("rotation", "scheduled rotation")

    def run_due_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true")

    command(rotation_verbs, ("rotation", "run-due"), cmd_run_due,
            "rotate every secret that is due, finish interrupted rotations (for a timer)",
            run_due_arguments)

    audit_verbs = group("audit", "read and verify the audit log")

    def tail_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-n", "--lines", type=_count, default=20, metavar="N")
        sub.add_argument("--json", action="store_true")

    command(audit_verbs, ("audit", "tail"), cmd_audit_tail,
            "the last records of the audit log", tail_arguments)
    command(audit_verbs, ("audit", "verify"), cmd_audit_verify,
            "check the hash chain (exit 1 and the first bad line on tampering)")

    key_verbs = group("keys", "rotate the master key, and see which keys the store uses")

    def keys_rotate_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--batch-size", type=_positive_count, default=500, metavar="N",
                         help="data keys re-wrapped per transaction (default 500)")
        sub.add_argument("--pause", type=_duration, default=0.0, metavar="DURATION",
                         help="sleep between batches, to leave room to other writers "
                              "(default 0)")
        sub.add_argument("--json", action="store_true")

    command(key_verbs, ("keys", "rotate"), cmd_keys_rotate,
            "new master key, every data key re-wrapped (no value re-encrypted); finishes an "
            "interrupted rotation", keys_rotate_arguments)

    def keys_status_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true")

    command(key_verbs, ("keys", "status"), cmd_keys_status,
            "master key ids: current, old (rotation unfinished), retired; versions each wraps",
            keys_status_arguments)

    verbs = group("secrets", "store, read, list and remove secrets")

    def put_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("value", metavar="VALUE", nargs="?",
                         help="the value (visible in `ps` and shell history: refused when stdin "
                              "is a terminal unless --insecure-argv; prefer --stdin)")
        sub.add_argument("--from-file", metavar="F", help="read the value from file F, byte-exact")
        sub.add_argument("--stdin", action="store_true",
                         help="read the value from standard input (one trailing newline "
                              "dropped; at a terminal: one line, not echoed)")
        sub.add_argument("--insecure-argv", action="store_true",
                         help="accept VALUE or --key K=V on the command line even at a terminal")
        sub.add_argument("--key", action="append", metavar="K=V",
                         help="a key of a map-valued secret (repeat for more keys)")
        sub.add_argument("--json-value", action="store_true",
                         help="the value is a JSON object: store it as a map-valued secret")
        sub.add_argument("--generate", action="store_true", help="generate a random value")
        sub.add_argument("--length", type=_count, default=32, metavar="N",
                         help="generated length (default 32)")
        sub.add_argument("--charset", default="alnum", metavar="SET",
                         help="generated characters: alnum (default), alpha, numeric, hex, "
                              "symbols, base64, or custom:CHARS")
        sub.add_argument("--kind", default="text", choices=["text", "bytes", "uuid"],
                         help="generate characters (default), N random bytes as base64, or a "
                              "UUID")
        sub.add_argument("--require-each", action="store_true",
                         help="at least one character of each class in the set (lower, upper, "
                              "digit, symbol)")
        sub.add_argument("--exclude", metavar="CHARS", help="characters never to generate")
        sub.add_argument("--exclude-ambiguous", action="store_true",
                         help="no look-alikes (I l 1 O 0 o | ` ' \")")
        sub.add_argument("--description", metavar="D")
        sub.add_argument("--tag", action="append", metavar="K=V", help="a tag (repeat for more)")
        sub.add_argument("--cas", type=_count, metavar="VERSION",
                         help="check-and-set: fail unless the current version is VERSION "
                              "(0: unless the secret is new)")
        sub.add_argument("--rotate-every", metavar="DURATION", help="rotation interval, e.g. 90d")
        sub.add_argument("--rotate-schedule", metavar="CRON",
                         help="rotation schedule, e.g. '0 0 * * *'")
        sub.add_argument("--overlap", metavar="DURATION",
                         help="how long the old value stays readable as 'previous' after a "
                              "rotation")
        sub.add_argument("--max-age", metavar="DURATION",
                         help="rotate at the latest this long after the last rotation "
                              "(default: the config's rotation.default_policy.max_age)")
        sub.add_argument("--rotate-key", metavar="K",
                         help="the key of a map-valued secret that rotates (default password)")
        sub.add_argument("--set-cmd", metavar="CMD",
                         help="rotation hook that applies the new value (gets it on stdin)")
        sub.add_argument("--validate-cmd", metavar="CMD",
                         help="rotation hook that checks the new value works (gets it on stdin)")
        sub.add_argument("--json", action="store_true", help="print the result as JSON")

    command(verbs, ("secrets", "put"), cmd_put,
            "store a new version of a secret", put_arguments)

    def get_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("ref", metavar="REF",
                         help="name[/version[/key]] or secretfs://name[/version[/key]]")

    command(verbs, ("secrets", "get"), cmd_get,
            "print a secret's value", get_arguments)

    def list_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--prefix", metavar="P", type=_prefix, help="only names starting with P")
        sub.add_argument("--json", action="store_true", help="print metadata as JSON")

    command(verbs, ("secrets", "list"), cmd_list,
            "list secret names", list_arguments)

    def info_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("--json", action="store_true")

    command(verbs, ("secrets", "info"), cmd_info,
            "show a secret's metadata (never its value)", info_arguments)

    def versions_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("--json", action="store_true")

    command(verbs, ("secrets", "versions"), cmd_versions,
            "list a secret's versions", versions_arguments)

    def rm_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("--version", type=_positive, metavar="V", help="only this version")
        sub.add_argument("--destroy", action="store_true",
                         help="erase the value(s) for good instead of a recoverable delete")

    command(verbs, ("secrets", "rm"), cmd_rm,
            "delete a secret or one version (recoverable), or destroy it for good", rm_arguments)

    def check_access_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--principal", metavar="P", help="a principal of the configuration")
        sub.add_argument("--pid", type=_count, metavar="PID",
                         help="a running process, identified as the filesystem would")
        sub.add_argument("--uid", type=_count, metavar="UID", help="a uid (no process facts)")
        sub.add_argument("--action", required=True,
                         choices=["read", "list", "write", "delete", "rotate"])
        sub.add_argument("--resource", required=True, metavar="R", help="a secret name")
        sub.add_argument("--address", metavar="IP",
                         help="evaluate ip_range conditions for this address")
        sub.add_argument("--at", metavar="TIME",
                         help="evaluate time_window conditions at this ISO time")
        sub.add_argument("--json", action="store_true")

    command(verbs, ("secrets", "check-access"), cmd_check_access,
            "would this caller be allowed? (exit 0: allow, 1: deny)", check_access_arguments)

    def import_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("file", metavar="FILE", help="a dotenv or JSON file (- for stdin)")
        sub.add_argument("--format", choices=["dotenv", "json"],
                         help="default: json for *.json, else dotenv")
        sub.add_argument("--prefix", metavar="P", type=_prefix,
                         help="put each secret under P (e.g. app/)")

    command(verbs, ("secrets", "import"), cmd_import,
            "store each key of a dotenv or JSON file as a secret", import_arguments)

    def rotate_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("--json", action="store_true")

    command(verbs, ("secrets", "rotate"), cmd_rotate,
            "rotate now: new value, set hook, validate hook, then current → new (exit 6 if not)",
            rotate_arguments)

    def undelete_arguments(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("--version", type=_positive, metavar="V", help="only this version")

    command(verbs, ("secrets", "undelete"), cmd_undelete,
            "restore what 'rm' deleted", undelete_arguments)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(argv).parse_args(argv)
    from secretfs.errors import SecretfsError

    try:
        return args.handler(args)
    except SecretfsError as error:
        print(f"secretfs: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `secretfs secrets list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        if os.environ.get("SECRETFS_DEBUG") == "1":
            raise
        print(f"secretfs: internal error: {type(error).__name__} "
              "(a bug: rerun with SECRETFS_DEBUG=1 for a traceback and report it)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
