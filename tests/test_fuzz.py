"""Hostile input, generated (docs/security.md, "Bounded inputs").

Every parser that takes text from outside is fed random and structured junk: secret names,
references and templates, config files (raw YAML-ish text and random documents, policies
included), dotenv files, paths looked up in the mounted tree (the pure Tree, and a real mount
with random byte names, as root and as another uid), and the CLI's whole argument list. Each may
accept or refuse, but only with its documented error — one line, the documented exit code —
never a traceback, an "internal error", a dead daemon or a message that grows with the input.
Oversized inputs (value > 1 MiB, > 256 keys, config > 1 MiB, a huge env file or line, very long
names and references, deep nesting, /dev/zero as a file) are refused quickly and in bounded
memory: each of those tests asserts a time and a memory bound.

Budget: the default run keeps each target to a few seconds. ``SECRETFS_FUZZ_EXAMPLES=N`` sets the
example count of the cheap (pure) targets — default 150 — and the expensive ones (a process or a
mount round trip per example) scale from it; ``make fuzz`` runs this file with N=5000.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from injector.refs import (
    MAX_ENV_FILE_BYTES,
    bind,
    collect,
    parse_dotenv,
    render,
    render_template,
    template_refs,
)
from secretfs.config import MAX_CONFIG_BYTES, Config, parse_config
from secretfs.errors import ConfigError, InvalidName, InvalidReference, SecretfsError, UsageError
from secretfs.fs.tree import ROOT_INODE, Kind, NameIndex, Tree
from secretfs.model import (
    LABEL_WORDS,
    MAX_MAP_KEYS,
    MAX_NAME_BYTES,
    MAX_SEGMENT_BYTES,
    MAX_VALUE_BYTES,
    MAX_VERSION,
    Label,
    SecretMetadata,
    SecretRef,
    VersionInfo,
    normalize_value,
    validate_name,
)
from tests.helpers import Store, make_store, one_line_error
from tests.mounting import Mount, mounted

EXAMPLES = int(os.environ.get("SECRETFS_FUZZ_EXAMPLES") or 150)
MESSAGE_LIMIT = 1200  # no error message grows with its input beyond this (chars)
needs_mount = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                 reason="real mounts need root and /dev/fuse")


def fuzz(cost: int = 1, **overrides: object) -> settings:
    """Hypothesis settings for a target whose example costs *cost* pure ones."""
    return settings(max_examples=max(5, EXAMPLES // cost), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture],
                    **overrides)  # type: ignore[arg-type]


def check_message(error: SecretfsError) -> str:
    """A user-facing message: one line, bounded."""
    text = str(error)
    assert "\n" not in text and "\r" not in text, text[:200]
    assert len(text) <= MESSAGE_LIMIT, text[:200]
    return text


@contextlib.contextmanager
def quickly(seconds: float) -> Iterator[None]:
    """Assert the block finishes within *seconds* (generous: the machine may be busy)."""
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    assert took < seconds, f"took {took:.1f}s (bound {seconds}s)"


# -- strategies -----------------------------------------------------------------------------------

# Text as it can arrive from argv, a file name or a FUSE lookup: any bytes, decoded the way Python
# decodes them (lone surrogates for what is not UTF-8), mixed with the grammar's own characters.
os_text = st.binary(max_size=40).map(os.fsdecode)
grammar = st.text(alphabet=string.ascii_letters + string.digits + "._-/:{} \t\n*?@%~" + "é\u2028",
                  max_size=40)
segment = st.one_of(
    st.from_regex(r"[A-Za-z0-9._-]{1,12}", fullmatch=True),
    st.sampled_from([*sorted(LABEL_WORDS), "0", "01", "1", "7", str(MAX_VERSION),
                     str(MAX_VERSION + 1), "9" * 25, "9" * 5000, ".", "..", "", ".secretfs",
                     "value", "x" * 129, "٣", "²"]),
    os_text,
)
paths = st.lists(segment, min_size=1, max_size=6).map("/".join)
any_text = st.one_of(os_text, grammar, paths, st.text(max_size=60))


# -- names ----------------------------------------------------------------------------------------


@fuzz()
@given(any_text)
@example("a" * (MAX_NAME_BYTES + 1))
@example("/".join(["a"] * 300))
@example("\udcff")
@example("9" * 5000)
def test_names_are_valid_or_refused_with_a_reason(name: str) -> None:
    try:
        assert validate_name(name) == name
    except InvalidName as error:
        assert error.exit_code == 2
        check_message(error)
        return
    # accepted: the grammar of DESIGN.md, exactly
    assert len(name.encode()) <= MAX_NAME_BYTES
    for part in name.split("/"):
        assert re.fullmatch(r"[A-Za-z0-9._-]+", part) and part not in (".", "..")
        assert len(part) <= MAX_SEGMENT_BYTES and not part.isdigit()
        assert part not in LABEL_WORDS
    assert name.split("/")[0] != ".secretfs"


# -- references and templates ---------------------------------------------------------------------


@fuzz()
@given(st.one_of(any_text, paths.map(lambda p: "secretfs://" + p)))
@example("secretfs://db/" + "9" * 5000)
@example("db/" + str(MAX_VERSION + 1))
@example("secretfs://" + "a/" * 100_000 + "b")
@example("x://" + "y" * 100_000)
def test_references_parse_or_are_refused_and_round_trip(text: str) -> None:
    try:
        ref = SecretRef.parse(text)
    except InvalidReference as error:
        assert error.exit_code == 2
        check_message(error)
        return
    assert SecretRef.parse(str(ref)) == ref  # secretfs://name/version[/key]
    assert SecretRef.parse(ref.path) == ref
    version = ref.version
    assert isinstance(version, Label) or 1 <= version <= MAX_VERSION


placeholder = paths.map(lambda p: f"{{{{ secretfs://{p} }}}}")
template_text = st.lists(st.one_of(grammar, placeholder, st.sampled_from(
    ["{{", "}}", "{{ secretfs://", "secretfs://db", "{{secretfs://db}}", "\n"])), max_size=12
).map("".join)


@fuzz()
@given(template_text)
def test_templates_and_env_values_bind_or_name_the_bad_reference(text: str) -> None:
    try:
        binding = bind("VAR", text, "--env")
        refs = template_refs(text, "app.tmpl")
    except UsageError as error:
        assert error.exit_code == 2
        message = check_message(error)
        assert "VAR (--env)" in message or "app.tmpl:" in message
        return
    values = {ref: f"<{ref.path}>" for ref in (*binding.refs, *refs)}
    rendered = render(binding, values)
    filled = render_template(text, values)
    assert all(values[ref] in filled for ref in refs)  # every placeholder was filled
    if binding.whole:
        assert rendered == values[binding.refs[0]]
    elif not binding.refs:
        assert rendered == text


def test_a_template_with_many_placeholders_is_linear() -> None:
    text = "{{ secretfs://db/latest/password }}\n" * 100_000
    with quickly(10):
        assert template_refs(text, "big.tmpl") == (SecretRef.parse("db/latest/password"),)


# -- dotenv ---------------------------------------------------------------------------------------

dotenv_lines = st.lists(st.one_of(
    st.builds(lambda export, name, value: f"{'export ' if export else ''}{name}={value}",
              st.booleans(), st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
              st.one_of(grammar, placeholder, st.text(max_size=20).map(repr))),
    st.sampled_from(["", "# comment", "  ", "export", "=x", "A B=c", 'Q="unclosed', "Q='x' y",
                     'M="a\nb"', "X=secretfs://", "X=secretfs://db//x"]),
    grammar,
), max_size=10).map("\n".join)


@fuzz()
@given(st.one_of(dotenv_lines, st.text(max_size=200)))
def test_env_files_parse_or_name_the_line(text: str) -> None:
    try:
        assignments = parse_dotenv(text, "app.env")
    except UsageError as error:
        message = check_message(error)
        assert message.startswith("app.env:"), message
        return
    for name, _value, line in assignments:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name)
        assert 1 <= line <= text.count("\n") + 1


@fuzz()
@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
                       st.text(alphabet=st.characters(exclude_characters="\0\r"), max_size=20),
                       max_size=6))
def test_quoted_dotenv_values_round_trip(values: dict[str, str]) -> None:
    escape = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "$": "\\$"}
    text = "".join(f'{name}="{"".join(escape.get(c, c) for c in value)}"\n'
                   for name, value in values.items())
    assert {name: value for name, value, _ in parse_dotenv(text, "x.env")} == values


# -- configs and policies -------------------------------------------------------------------------

yaml_ish = st.text(alphabet=string.ascii_lowercase[:6] + "0123456789 :-[]{},&*!|>'\"#\n\t%@`?<" +
                   "_", max_size=300)
config_words = ["secrets_manager", "principals", "policies", "backend", "type", "local",
                "openbao", "token", "path", "cache", "ttl", "allow", "deny", "conditions",
                "action", "resources", "read", "list", "*", "uid", "exe", "value", "ip_range",
                "time_window", "<<", "audit", "rotation", "schedule", "mount", "encryption",
                "provider"]
yaml_tokens = st.lists(st.one_of(st.sampled_from(config_words), st.sampled_from(
    [": ", "\n", "\n  ", "\n    ", "- ", "[", "]", "{", "}", ", ", "&a ", "*a", "!!str ",
     "!!binary ", "!!python/object ", "'", '"', "1s", "-1", "10.0.0.0/8", "0 0 * * *", "~",
     "null", "yes"]), st.text(max_size=4)), max_size=40).map("".join)


@fuzz()
@given(st.one_of(yaml_ish, yaml_tokens))
def test_config_text_parses_or_names_the_file(text: str) -> None:
    try:
        config = parse_config(text, "fuzz.yaml")
    except ConfigError as error:
        assert error.exit_code == 7
        assert check_message(error).startswith("fuzz.yaml"), str(error)
    else:
        assert isinstance(config, Config)


MARKER = "LEAKTOKEN-7f3a9c"  # stands for a token written in the config

rule = st.fixed_dictionaries({}, optional={
    "action": st.one_of(st.sampled_from(["read", "list", "write", "delete", "rotate", "*", "x"]),
                        st.lists(st.sampled_from(["read", "list", "*", "nope"]), max_size=3)),
    "resources": st.one_of(st.lists(st.one_of(paths, st.sampled_from(["*", "api/*", "?b"])),
                                    max_size=3), paths, st.integers()),
    "extra": st.just(1),
})
condition = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["ip_range", "time_window", "weather"]),
    "value": st.one_of(st.sampled_from(["10.0.0.0/8", "fd00::/8", "300.1.1.1/8", "09:00-17:00",
                                        "22:00-06:00 Mon-Fri", "25:00-26:00", "tz=Mars/Base"]),
                       grammar, st.lists(st.sampled_from(["10.0.0.0/8", "x"]), max_size=2)),
})
policy = st.fixed_dictionaries({}, optional={
    "allow": st.lists(rule, max_size=3), "deny": st.lists(rule, max_size=2),
    "conditions": st.lists(condition, max_size=2), "other": st.just([])})
principal = st.fixed_dictionaries({}, optional={
    "uid": st.one_of(st.integers(-5, 2**33), grammar), "gid": st.integers(-1, 2**32),
    "user": grammar, "exe": st.sampled_from(["/usr/bin/cat", "/usr/bin/*", "", "[", "**"]),
    "exe_sha256": st.one_of(st.just("a" * 64), grammar), "unit": grammar,
    "cmdline": grammar, "colour": st.just("red")})
policy_names = st.one_of(st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True), grammar)
manager = st.fixed_dictionaries({}, optional={
    "backend": st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["local", "openbao", "aws", "keyring", "plug", "Bad Type"]),
        "token": st.one_of(st.just(MARKER), st.just([MARKER]), st.just({"t": MARKER}),
                           st.just(f"{MARKER}\n")),
        "address": st.sampled_from(["http://127.0.0.1:8200", "nope", "ftp://x"]),
        "path": st.sampled_from(["store.db", "", "~/x"]),
        "max_versions": st.integers(-2, 20)}),
    "cache": st.fixed_dictionaries({}, optional={
        "ttl": st.sampled_from(["300s", "-1s", "1e400s", "5 minutes", "0"]),
        "max_size": st.integers(-1, 2**70)}),
    "rotation": st.fixed_dictionaries({}, optional={
        "schedule": st.sampled_from(["0 0 * * *", "61 * * * *", "@daily", "* * *", ""]),
        "default_policy": st.fixed_dictionaries({}, optional={
            "max_age": st.sampled_from(["90d", "0s", "x"]), "overlap": st.just("1h")})}),
})
documents = st.fixed_dictionaries({}, optional={
    "secrets_manager": manager,
    "principals": st.dictionaries(policy_names, principal, max_size=3),
    "policies": st.dictionaries(policy_names, policy, max_size=3),
})


@fuzz()
@given(documents)
def test_policies_and_configs_validate_or_name_line_and_key(document: dict) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        config = parse_config(text, "policy.yaml")
    except ConfigError as error:
        message = check_message(error)
        assert re.match(r"policy\.yaml:\d+: ", message), message
        assert MARKER not in message  # a token's text is never echoed
        return
    for name, spec in config.policies.items():
        for rule_ in (*spec.allow, *spec.deny):
            assert rule_.actions and rule_.resources, name


# -- the mounted tree, pure -----------------------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TREE_NAMES = ["db", "api_keys/stripe", "api_keys/github", "a/b/c"]


def tree_metadata(name: str) -> SecretMetadata:
    return SecretMetadata(
        name=name, labels={Label.CURRENT: 3, Label.PREVIOUS: 2},
        versions=(VersionInfo(1, NOW, ("value",), False, deleted=True),
                  VersionInfo(2, NOW, ("value",), False), VersionInfo(3, NOW, ("user", "pw"),
                                                                      True)))


tree_word = st.one_of(st.sampled_from(
    ["db", "api_keys", "stripe", "a", "b", "c", ".secretfs", "health", "stats", "latest",
     "current", "previous", "pending", "1", "2", "3", "03", "value", "user", "pw", "", ".", "..",
     str(MAX_VERSION), str(MAX_VERSION + 1), "9" * 300]),
    st.binary(max_size=255).map(lambda b: b.decode("utf-8", "replace")))


@fuzz()
@given(st.lists(tree_word, min_size=1, max_size=6))
def test_tree_lookups_of_any_path_find_a_node_or_nothing(words: list[str]) -> None:
    tree = Tree(NameIndex(TREE_NAMES))
    node = tree.node(ROOT_INODE)
    for word in words:
        assert node is not None
        if not node.kind.is_folder:
            break
        meta = tree_metadata(node.name) if node.kind in (Kind.SECRET, Kind.VERSION) else None
        assert isinstance(tree.listing(node, meta), list)
        child = tree.child(node, word, meta)
        if child is None:
            return
        if child.kind is Kind.FILE:
            info = tree_metadata(child.name).version_info(child.version)
            assert info is not None and info.readable and child.key in info.keys
            assert child.ref is not None and child.ref.key == child.key
        assert tree.node(child.inode) is child
        node = child


# -- a real mount ---------------------------------------------------------------------------------

BENIGN = {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
          errno.EROFS, errno.EISDIR, errno.EINVAL, errno.ENODATA, errno.ENOTSUP, errno.ERANGE,
          errno.E2BIG}
FUZZ_VALUE = b"fuzz-" + os.urandom(8).hex().encode()


@pytest.fixture(scope="module")
def live() -> Iterator[Mount]:
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("real mounts need root and /dev/fuse")
    folder = Path(tempfile.mkdtemp(prefix="secretfs-fuzz-"))
    folder.chmod(0o755)
    try:
        store = make_store(folder / "store")
        store.put("db", "--stdin", input=FUZZ_VALUE)
        store.put("api/keys", "--stdin", "--json-value", input=b'{"user": "u", "pw": "p"}')
        store.put("api/keys", "--stdin", input=b"second")
        with mounted(store, folder / "mnt") as mount:
            yield mount
    finally:
        shutil.rmtree(folder, ignore_errors=True)


mount_component = st.one_of(
    st.sampled_from([b"db", b"api", b"keys", b"latest", b"current", b"previous", b"pending",
                     b"1", b"2", b"3", b"01", b"value", b"user", b"pw", b".secretfs", b"health",
                     b"stats", b".", b"..", b"9" * 255, b"x" * 256, b"\xff", b"\xc3\x28"]),
    st.binary(min_size=1, max_size=260).filter(lambda b: b"/" not in b and b"\0" not in b),
)


def inside(components: list[bytes]) -> bool:
    """No prefix of the path climbs out of the mount with '..' (writes are probed too)."""
    depth = 0
    for component in components:
        depth += -1 if component == b".." else 0 if component == b"." else 1
        if depth < 0:
            return False
    return True


mount_paths = st.lists(mount_component, min_size=1, max_size=5).filter(inside).map(b"/".join)
XATTRS = st.one_of(st.sampled_from([b"user.secretfs.version", b"user.secretfs.description",
                                    b"user.x", b"security.selinux", b"trusted.x"]),
                   st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b))
OPERATIONS = ("stat", "open", "listdir", "getxattr", "listxattr", "write", "readlink")


def probe(path: bytes, operation: str, attribute: bytes) -> tuple[int, int]:
    """One operation on *path*: (0 or the errno it failed with, how much it returned)."""
    size = 0
    try:
        if operation == "stat":
            os.lstat(path)
        elif operation == "open":
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            try:
                size = len(os.read(fd, 4096)) + 1  # opened, even if empty
            finally:
                os.close(fd)
        elif operation == "listdir":
            size = len(os.listdir(path))
        elif operation == "getxattr":
            size = len(os.getxattr(path, attribute)) + 1
        elif operation == "listxattr":
            size = len(os.listxattr(path))
        elif operation == "write":
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        else:
            os.readlink(path)
    except OSError as error:
        return error.errno, 0
    return 0, size


def check_alive(mount: Mount) -> None:
    assert mount.process.poll() is None, "the daemon died"
    assert (mount.path / "db/latest/value").read_bytes() == FUZZ_VALUE
    log = mount.log_text()
    assert "Traceback" not in log and "internal error" not in log, log[-2000:]


@needs_mount
def test_random_paths_through_a_real_mount_fail_cleanly(live: Mount) -> None:
    root = bytes(live.path)

    @fuzz(cost=2)
    @given(mount_paths, st.sampled_from(OPERATIONS), XATTRS)
    def check(path: bytes, operation: str, attribute: bytes) -> None:
        code, _ = probe(root + b"/" + path, operation, attribute)
        assert code == 0 or code in BENIGN, (path, operation, errno.errorcode.get(code, code))
        if operation == "write":
            assert code != 0

    check()
    check_alive(live)


PROBE_AS_USER = """
import json, os, sys
sys.path.insert(0, {repo!r})
from tests.test_fuzz import probe
jobs = json.loads(sys.stdin.read())
print(json.dumps([probe(bytes.fromhex(p), op, bytes.fromhex(a)) for p, op, a in jobs]))
"""


@needs_mount
def test_random_paths_as_another_uid_are_denied_or_missing(live: Mount) -> None:
    """As uid 4242 (no principal: may list and read nothing) nothing is handed out: every open
    and getxattr fails (EACCES, ENOENT & co., never EIO), listings and xattr lists are empty —
    only a stat may succeed (a name the kernel cached for another caller: DESIGN.md) — and the
    daemon survives."""
    root = bytes(live.path)
    script = PROBE_AS_USER.format(repo=str(Path(__file__).parents[1]))

    @fuzz(cost=15)
    @given(st.lists(st.tuples(mount_paths, st.sampled_from(OPERATIONS), XATTRS), min_size=1,
                    max_size=25))
    def check(jobs: list[tuple[bytes, str, bytes]]) -> None:
        payload = json.dumps([((root + b"/" + p).hex(), op, a.hex()) for p, op, a in jobs])
        done = subprocess.run(["setpriv", "--reuid=4242", "--regid=4242", "--clear-groups",
                               sys.executable, "-c", script], input=payload.encode(),
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        for (path, operation, _), (code, size) in zip(jobs, json.loads(done.stdout),
                                                      strict=True):
            assert code == 0 or code in BENIGN, (path, operation, errno.errorcode.get(code))
            if code == 0:
                assert operation in ("stat", "listdir", "listxattr"), (path, operation)
                assert size == 0, (path, operation, size)

    check()
    check_alive(live)


# -- the CLI --------------------------------------------------------------------------------------

EXIT_CODES = set(range(9))
COMMANDS = [
    ["secrets", "put"], ["secrets", "get"], ["secrets", "list"], ["secrets", "info"],
    ["secrets", "versions"], ["secrets", "rm"], ["secrets", "undelete"],
    ["secrets", "check-access"], ["secrets", "import"], ["audit", "tail"], ["audit", "verify"],
    ["secrets"], ["audit"], [], ["frobnicate"], ["secrets", "nope"],
]
# Flags and what their values look like. No hook command is ever random (rotate is not fuzzed:
# it would run them); paths are prepared files, so no random read can block.
FLAG_VALUES: dict[str, st.SearchStrategy[str]] = {
    "--key": st.builds(lambda k, v: f"{k}={v}", segment, os_text),
    "--tag": st.builds(lambda k, v: f"{k}={v}", segment, os_text),
    "--description": os_text, "--length": st.sampled_from(["0", "1", "32", "4097", "99999999",
                                                           "-1", "x"]),
    "--charset": st.sampled_from(["alnum", "hex", "custom:ab", "custom:", "custom:\udcff",
                                  "nope"]),
    "--kind": st.sampled_from(["text", "bytes", "uuid", "x"]),
    "--exclude": os_text, "--cas": st.sampled_from(["0", "1", "2", str(MAX_VERSION), "x", ""]),
    "--rotate-every": st.sampled_from(["1s", "90d", "0", "x", "1e400s"]),
    "--rotate-schedule": st.sampled_from(["0 0 * * *", "61 * * * *", "@daily", "x"]),
    "--overlap": st.sampled_from(["1h", "-1", "x"]), "--max-age": st.sampled_from(["1d", "x"]),
    "--rotate-key": segment,
    "--set-cmd": st.sampled_from(["true", "false", "cat > /dev/null"]),
    "--validate-cmd": st.sampled_from(["true", "false"]),
    "--version": st.sampled_from(["1", "2", "0", "x", str(MAX_VERSION)]),
    "--prefix": st.one_of(segment, paths), "--principal": segment,
    "--uid": st.sampled_from(["0", "1001", "4242", "99999999999999999999", "x"]),
    "--pid": st.sampled_from(["1", str(os.getpid()), "0", "99999999", "x"]),
    "--action": st.sampled_from(["read", "list", "write", "delete", "rotate", "x"]),
    "--resource": st.one_of(segment, paths), "--address": st.sampled_from(
        ["10.1.2.3", "::1", "300.0.0.1", "x"]),
    "--at": st.sampled_from(["2026-01-05T10:00", "2026-13-01", "x"]),
    "--format": st.sampled_from(["dotenv", "json", "yaml"]),
    "-n": st.sampled_from(["0", "5", "99999999999999999999", "-1", "x"]),
}
SWITCHES = ["--stdin", "--json-value", "--generate", "--json", "--destroy", "--require-each",
            "--exclude-ambiguous", "--insecure-argv", "--help", "--", "-", "--nope", "-x"]


@dataclass
class CliWorld:
    store: Store
    files: dict[str, str]  # name → path of a prepared input file


@pytest.fixture(scope="module")
def cli_world() -> Iterator[CliWorld]:
    folder = Path(tempfile.mkdtemp(prefix="secretfs-fuzz-cli-"))
    try:
        store = make_store(folder / "store")
        store.put("db", "--stdin", input=b"v1")
        store.put("api/keys", "--stdin", "--json-value", input=b'{"user": "u", "pw": "p"}')
        inputs = folder / "inputs"
        inputs.mkdir()
        contents = {"empty": b"", "text": b"x", "binary": os.urandom(64), "json": b'{"a": "b"}',
                    "dotenv": b"A=1\nB='two'\n", "bad.json": b"{", "nul": b"\0" * 10,
                    "big": b"y" * (MAX_VALUE_BYTES + 1), "deep.json": b"[" * 100_000}
        files = {}
        for name, data in contents.items():
            (inputs / name).write_bytes(data)
            files[name] = str(inputs / name)
        files |= {"missing": str(inputs / "missing"), "folder": str(inputs), "null": os.devnull}
        yield CliWorld(store, files)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def argv_strategy(world: CliWorld) -> st.SearchStrategy[list[str]]:
    path_values = st.sampled_from(sorted(world.files.values()))
    flags = {**FLAG_VALUES, "--from-file": path_values, "--config": st.sampled_from(
        [str(world.store.config), world.files["empty"], world.files["missing"],
         world.files["json"], world.files["binary"]])}
    flag_pair = st.sampled_from(sorted(flags)).flatmap(
        lambda flag: flags[flag].map(lambda value: [flag, value]))
    token = st.one_of(segment, paths, os_text, path_values,
                      st.sampled_from(SWITCHES).map(lambda s: [s]), flag_pair)
    return st.builds(
        lambda command, tokens: command + [t for part in tokens
                                           for t in (part if isinstance(part, list) else [part])],
        st.sampled_from(COMMANDS), st.lists(token, max_size=7))


def run_main(argv: list[str], stdin: bytes) -> tuple[int, str, bytes]:
    """`secretfs ARGV` in this process: (exit code, stderr, stdout)."""
    from secretfs.cli import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape")
    err = io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = fake_stdin, out, err
    try:
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: --help, usage errors
            code = exit_.code if isinstance(exit_.code, int) else 1
        out.flush()
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return code, err.getvalue(), out.buffer.getvalue()  # type: ignore[attr-defined]


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_cli_result(argv: list[str], code: int, stderr: str) -> None:
    assert code in EXIT_CODES, (argv, code, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, (argv, stderr)
    if code != 0 and stderr:
        lines = stderr.splitlines()
        assert lines[-1].startswith("secretfs: "), (argv, stderr)
        assert len(lines) == 1, (argv, stderr)
        # argparse's own usage errors quote the bad word whole (argv bounds it: 128 KiB)
        if not stderr.rstrip().endswith("--help')"):
            assert len(stderr) <= MESSAGE_LIMIT + 200, (argv, stderr[:300])


def test_the_cli_answers_random_argv_with_its_exit_codes(cli_world: CliWorld,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    monkeypatch.setenv("SECRETFS_CONFIG", str(cli_world.store.config))
    monkeypatch.delenv("SECRETFS_DEBUG", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run, whatever a hook says
    monkeypatch.chdir(tmp_path)

    @fuzz(cost=3)
    @given(argv_strategy(cli_world), st.one_of(st.binary(max_size=64), st.sampled_from(
        [b'{"k": "v"}', b"[1]", b"A=1\n", b"x" * (MAX_VALUE_BYTES + 2)])))
    def check(argv: list[str], stdin: bytes) -> None:
        code, stderr, _ = run_main(argv, stdin)
        check_cli_result(argv, code, stderr)

    check()


@fuzz(cost=25)
@given(st.lists(st.one_of(st.sampled_from(["secrets", "get", "put", "db", "--stdin", "run",
                                           "--", "--env", "X=secretfs://db", "inject", "-i",
                                           "--dry-run", "true", "-"]),
                          st.binary(min_size=1, max_size=30).filter(lambda b: b"\0" not in b)
                          .map(os.fsdecode)), min_size=1, max_size=6))
def test_the_real_command_answers_random_bytes(argv: list[str]) -> None:
    """The same, through a real process and real argv bytes (not UTF-8 included), `run` and
    `inject` too (PATH holds no command, so nothing but `true`-less exec failures can run)."""
    with tempfile.TemporaryDirectory() as folder:
        store = make_store(Path(folder) / "store", init=False)
        env = store.env(PATH=folder)
        done = subprocess.run([sys.executable, "-m", "secretfs", *map(os.fsencode, argv)],
                              capture_output=True, env=env, timeout=60, input=b"x", cwd=folder)
    check_cli_result(argv, done.returncode if done.returncode < 126 else 0,
                     done.stderr.decode(errors="replace"))


def test_rm_with_a_huge_version_is_a_usage_error(cli_world: CliWorld,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRETFS_CONFIG", str(cli_world.store.config))
    code, stderr, _ = run_main(["secrets", "rm", "db", "--version", "9" * 25], b"")
    check_cli_result(["rm"], code, stderr)


def test_list_with_a_prefix_that_is_not_utf8_is_a_usage_error(cli_world: CliWorld,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECRETFS_CONFIG", str(cli_world.store.config))
    code, stderr, _ = run_main(["secrets", "list", "--prefix", "\udcff"], b"")
    check_cli_result(["list"], code, stderr)


# -- oversized inputs: refused quickly, in bounded memory -----------------------------------------


# Runs the command and reports its peak memory. A launcher of its own because a child's
# ru_maxrss also counts what it shared with its parent between fork and exec: forked straight
# from pytest (hundreds of MiB after a long fuzz run), every child would look that big.
PEAK_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "sys.stderr.buffer.write(b'\\0peak=%d\\n' % peak)\n"
    "sys.exit(code)\n"
)


def bounded(store: Store, *args: str, stdin: bytes | int | None = None,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes], int]:
    """Run `secretfs ARGS`: the result, and the process's peak memory in MiB."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK_LAUNCHER, sys.executable, "-m", "secretfs", *args],
        env=env or store.env(), input=stdin if isinstance(stdin, bytes) else None,
        stdin=stdin if isinstance(stdin, int) else None, capture_output=True, timeout=120)
    stderr, _, peak = done.stderr.rpartition(b"\0peak=")
    return subprocess.CompletedProcess(args, done.returncode, done.stdout, stderr), \
        int(peak) // 1024


MEMORY_MIB = 100  # a refused input never costs more than this (Python itself: ~15-30)


@pytest.mark.parametrize("case", ["stdin", "from-file", "dev-zero", "key", "json-keys",
                                  "json-deep", "json-value"])
def test_oversized_values_are_refused_fast_in_bounded_memory(store: Store, tmp_path: Path,
                                                              case: str) -> None:
    big = b"x" * (MAX_VALUE_BYTES + 1)
    (tmp_path / "big").write_bytes(big)
    keys = json.dumps({f"k{i}": "v" for i in range(MAX_MAP_KEYS + 1)}).encode()
    args, stdin, expect = {
        "stdin": (["--stdin"], big * 40, "over the 1048576-byte limit"),
        "from-file": (["--from-file", str(tmp_path / "big")], None, "over the 1048576-byte"),
        "dev-zero": (["--from-file", "/dev/zero"], None, "over the 1048576-byte limit"),
        # one argv string may hold 128 KiB: ten keys of 120 KiB make a map over 1 MiB
        "key": ([f"--key=k{i}={'x' * 120_000}" for i in range(10)], None, "map value is"),
        "json-keys": (["--stdin", "--json-value"], keys, "257 keys, over the limit of 256"),
        "json-deep": (["--stdin", "--json-value"], b"[" * 500_000, "nested too deeply"),
        "json-value": (["--stdin", "--json-value"], json.dumps({"k": "x" * MAX_VALUE_BYTES})
                       .encode(), "over the 1048576-byte limit"),
    }[case]
    with quickly(30):
        done, peak = bounded(store, "secrets", "put", "big", *args, stdin=stdin)
    assert done.returncode == 2, done.stderr
    assert expect in one_line_error(done)
    assert peak < MEMORY_MIB, f"{peak} MiB"
    assert store.cli("secrets", "get", "big").returncode == 3


def test_a_map_of_exactly_256_keys_and_a_value_of_exactly_1_mib_are_fine(store: Store) -> None:
    keys = json.dumps({f"k{i}": "v" for i in range(MAX_MAP_KEYS)}).encode()
    store.put("map", "--stdin", "--json-value", input=keys)
    store.put("one", "--stdin", input=b"z" * MAX_VALUE_BYTES + b"\n")
    assert len(store.get("one")) == MAX_VALUE_BYTES
    with pytest.raises(UsageError):
        normalize_value({f"k{i}": "v" for i in range(MAX_MAP_KEYS + 1)})


@pytest.mark.parametrize("case", ["name", "ref", "ref-digits", "key"])
def test_very_long_names_and_references_are_refused_with_a_short_message(
        store: Store, case: str) -> None:
    args = {
        "name": ["secrets", "put", "n" * 100_000, "--generate"],
        "ref": ["secrets", "get", "secretfs://" + "a/" * 50_000 + "b"],
        "ref-digits": ["secrets", "get", "db/" + "9" * 100_000],
        "key": ["secrets", "get", "db/latest/" + "k" * 100_000],
    }[case]
    with quickly(30):
        done, peak = bounded(store, *args)
    assert done.returncode == 2, done.stderr
    assert len(one_line_error(done)) < 600
    assert peak < MEMORY_MIB


def test_oversized_configs_are_refused_fast(store: Store, tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * MAX_CONFIG_BYTES + b"\n")
    with quickly(30):
        done, peak = bounded(store, "secrets", "list", env=store.env(SECRETFS_CONFIG=str(big)))
    assert done.returncode == 7 and "larger than 1 MiB" in one_line_error(done)
    assert peak < MEMORY_MIB
    with quickly(30):
        done, _ = bounded(store, "secrets", "list",
                          env=store.env(SECRETFS_CONFIG="/dev/zero"))
    assert done.returncode == 7, done.stderr
    with quickly(5), pytest.raises(ConfigError, match="larger than 1 MiB"):
        parse_config("#" * (MAX_CONFIG_BYTES + 1))
    with quickly(5), pytest.raises(ConfigError, match="larger than 1 MiB"):
        parse_config("#" + "é" * (MAX_CONFIG_BYTES // 2))  # counted in bytes, not characters


@pytest.mark.parametrize("text", [
    "[" * 100_000,
    "a: " + "{b: " * 10_000 + "}" * 10_000,
    "policies:\n  p:\n    allow:\n" + "      - {action: read, resources: [x]}\n" * 20_000,
    "principals:\n" + "".join(f"  p{i}: {{uid: {i}}}\n" for i in range(30_000)),
    "x: &a [" + ", ".join(["y"] * 50) + "]\n" + "".join(
        f"x{i}: &a{i} [{', '.join(['*a' if i == 0 else f'*a{i - 1}'] * 50)}]\n"
        for i in range(20)),
])
def test_hostile_config_shapes_end_quickly(text: str) -> None:
    assert len(text.encode()) <= MAX_CONFIG_BYTES
    with quickly(20):
        try:
            parse_config(text, "big.yaml")
        except ConfigError as error:
            check_message(error)


def test_huge_env_files_and_lines_are_refused_fast(store: Store, tmp_path: Path) -> None:
    store.put("db", "--stdin", input=b"pw")
    huge_line = tmp_path / "line.env"
    huge_line.write_text("X=" + "a" * (MAX_ENV_FILE_BYTES + 1) + "\n")
    for source in (str(huge_line), "/dev/zero"):
        with quickly(30):
            done, peak = bounded(store, "run", "--env-file", source, "--", "true")
        assert done.returncode == 2 and "larger than 1 MiB" in one_line_error(done)
        assert peak < MEMORY_MIB
    long_ref = tmp_path / "ref.env"
    long_ref.write_text("X=secretfs://" + "a/" * 200_000 + "b\n")
    with quickly(30):
        done, _ = bounded(store, "run", "--env-file", str(long_ref), "--", "true")
    assert done.returncode == 2 and len(one_line_error(done)) < 600
    unclosed = tmp_path / "quote.env"
    unclosed.write_text('X="' + "a" * 500_000)
    with quickly(30):
        done, _ = bounded(store, "run", "--env-file", str(unclosed), "--", "true")
    assert done.returncode == 2 and "never closed" in one_line_error(done)
    with quickly(10), pytest.raises(UsageError, match="larger than 1 MiB"):
        collect([], [huge_line], {})
