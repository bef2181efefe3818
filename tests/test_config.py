"""The config file: defaults, the CONTRACT example, every error kind with its line and key,
path resolution, the lookup order, and fuzzing that only ConfigError ever escapes."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from secretfs import config as config_module
from secretfs.config import (
    Condition,
    Config,
    PolicySpec,
    PrincipalSpec,
    Rule,
    config_path_from_env,
    data_dir,
    default_config,
    load_config,
    parse_config,
)
from secretfs.errors import ConfigError
from secretfs.model import parse_duration

SRC = "/etc/secretfs/config.yaml"
DAY = 86400.0

# The example of CONTRACT.md, "Configuration (YAML)", verbatim.
CONTRACT_EXAMPLE = """\
secrets_manager:
  backend:
    type: local               # local | openbao | aws | keyring | <plugin name>
    path: ~/.local/share/secretfs/store.db   # root: /var/lib/secretfs/store.db (likewise below)
    # openbao: address (one URL, or a list for a cluster), mount (secret),
    #          token / token_file / approle {role_id, secret_id_file}, ca_file, namespace
    # aws: region, endpoint_url (optional), prefix
  encryption:
    provider: file            # file | keyring | passphrase | openbao_transit | aws_kms
    key_file: ~/.local/share/secretfs/master.key
    # openbao_transit: key_name; aws_kms: key_id (e.g. alias/secrets-key)
  cache:
    enabled: true
    ttl: 300s
    max_size: 1000
    max_stale: 1h             # serve a stale value this long while the backend is down
    poll_interval: 30s        # how often a remote backend's metadata is checked for changes
  rotation:
    enabled: true
    schedule: "0 0 * * *"
    default_policy: { max_age: 90d, overlap: 1h }
  audit:
    enabled: true
    path: ~/.local/share/secretfs/audit.log
    log_level: info           # info: every decision; debug: also cache events
    retention: 90d
  mount:
    path: /run/secretfs/mnt   # a child of /run/secretfs, which containers bind with rslave
    allow_other: true         # when mounted by root
principals:                   # who a caller is; first match wins
  service-a: { uid: 1001 }    # also: user, gid, group, exe (glob), unit, container, cmdline (glob)
policies:
  service-a:
    allow:
      - { action: read, resources: [db_password, "api_keys/*"] }
    deny:
      - { action: delete, resources: ["*"] }
    conditions:
      - { type: ip_range, value: 10.0.0.0/8 }
      - { type: time_window, value: "09:00-17:00" }
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A non-root user with a fresh home and no secretfs/XDG variables set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("SECRETFS_CONFIG", "XDG_CONFIG_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    return home


def error_of(text: str, source: str = SRC) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source)
    assert caught.value.exit_code == 7
    return str(caught.value)


# -- defaults and data_dir --------------------------------------------------------------------


def test_default_config_for_a_user(home: Path) -> None:
    config = default_config()
    share = home / ".local/share/secretfs"
    manager = config.manager
    assert config.source is None
    assert (manager.backend.type, manager.backend.path) == ("local", share / "store.db")
    assert (manager.backend.max_versions, dict(manager.backend.options)) == (10, {})
    assert manager.encryption.provider == "file"
    assert manager.encryption.key_file == share / "master.key"
    assert (manager.encryption.key_name, manager.encryption.key_id) == (None, None)
    assert dataclasses.astuple(manager.cache) == (True, 300.0, 1000, 3600.0, 30.0, True)
    assert dataclasses.astuple(manager.rotation) == (True, "0 0 * * *", 90 * DAY, 3600.0)
    assert dataclasses.astuple(manager.audit) == (
        True, share / "audit.log", "info", 90 * DAY, False)
    assert dataclasses.astuple(manager.mount) == (Path("/run/secretfs/mnt"), True)
    assert dict(config.principals) == {} and dict(config.policies) == {}


def test_data_dir_for_root_and_users(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data_dir() == home / ".local/share/secretfs"
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/data")
    assert data_dir() == Path("/srv/data/secretfs")
    monkeypatch.setenv("XDG_DATA_HOME", "relative/data")  # ignored, as the XDG spec says
    assert data_dir() == home / ".local/share/secretfs"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_DATA_HOME", "/srv/data")
    assert data_dir() == Path("/var/lib/secretfs")
    assert default_config().manager.backend.path == Path("/var/lib/secretfs/store.db")


def test_empty_documents_are_the_default(home: Path) -> None:
    for text in ("", "# only a comment\n", "---\n", "\n\n"):
        config = parse_config(text, SRC)
        assert config == dataclasses.replace(default_config(), source=SRC)


def test_null_sections_take_defaults(home: Path) -> None:
    config = parse_config("secrets_manager:\n  cache:\n  audit:\nprincipals:\npolicies:\n")
    assert config.manager == default_config().manager


# -- the full example -------------------------------------------------------------------------


def test_contract_example(home: Path) -> None:
    config = parse_config(CONTRACT_EXAMPLE, SRC)
    share = home / ".local/share/secretfs"
    assert config.source == SRC
    assert config.manager == default_config().manager  # the example spells out the defaults
    assert config.manager.backend.path == share / "store.db"
    assert config.principals == {"service-a": PrincipalSpec(name="service-a", uid=1001)}
    assert config.policies == {
        "service-a": PolicySpec(
            name="service-a",
            allow=(Rule(actions=("read",), resources=("db_password", "api_keys/*")),),
            deny=(Rule(actions=("delete",), resources=("*",)),),
            conditions=(
                Condition(type="ip_range", value="10.0.0.0/8"),
                Condition(type="time_window", value="09:00-17:00"),
            ),
        )
    }


def test_every_setting(home: Path, tmp_path: Path) -> None:
    text = """\
secrets_manager:
  backend:
    type: openbao
    address: [https://bao-1:8200, https://bao-2:8200]
    mount: kv
    approle: { role_id: my-role, secret_id_file: secret-id }
    ca_file: /etc/ssl/bao.pem
    namespace: team-a
    timeout: 1500ms
    max_versions: 5
  encryption: { provider: openbao_transit, key_name: secretfs, key_file: keys/master.key }
  cache: { enabled: false, ttl: 0, max_size: 10, max_stale: 0s, poll_interval: 1m30s,
           read_ahead: off }
  rotation:
    enabled: no
    schedule: "*/15 2-4 1,15 JAN-jun mon-FRI"
    default_policy: { max_age: 2w, overlap: 90 }
  audit: { enabled: true, path: audit.log, log_level: debug, retention: 365d, fail_open: true }
  mount: { path: mnt, allow_other: false }
principals:
  web:
    uid: 33
    user: www-data
    gid: 33
    group: www-data
    exe: /usr/sbin/nginx*
    exe_sha256: ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789
    unit: nginx.service
    container: web-1
    cmdline: "nginx: worker*"
policies:
  web:
    allow:
      - { action: [read, list], resources: "web/*" }
      - { action: "*", resources: [web/tmp/?] }
    conditions:
      - { type: ip_range, value: [10.1.2.3/8, "192.168.0.0/16, fd00::1/8"] }
      - { type: time_window, value: "22:00-06:00  Mon-Wed,Fri tz=Europe/Berlin" }
  api-only: {}
"""
    path = tmp_path / "etc" / "config.yaml"
    path.parent.mkdir()
    path.write_text(text)
    config = load_config(path)
    manager = config.manager
    base = tmp_path / "etc"
    assert manager.backend.type == "openbao" and manager.backend.max_versions == 5
    assert manager.backend.options == {
        "address": ("https://bao-1:8200", "https://bao-2:8200"),
        "mount": "kv",
        "approle": {"role_id": "my-role", "secret_id_file": base / "secret-id"},
        "ca_file": Path("/etc/ssl/bao.pem"),
        "namespace": "team-a",
        "timeout": 1.5,
    }
    assert manager.encryption.provider == "openbao_transit"
    assert manager.encryption.key_name == "secretfs"
    assert manager.encryption.key_file == base / "keys/master.key"
    assert dataclasses.astuple(manager.cache) == (False, 0.0, 10, 0.0, 90.0, False)
    assert dataclasses.astuple(manager.rotation) == (
        False, "*/15 2-4 1,15 JAN-jun mon-FRI", 14 * DAY, 90.0)
    assert dataclasses.astuple(manager.audit) == (
        True, base / "audit.log", "debug", 365 * DAY, True)
    assert dataclasses.astuple(manager.mount) == (base / "mnt", False)
    web = config.principals["web"]
    assert web.exe_sha256 == "abcdef0123456789" * 4
    assert (web.uid, web.user, web.gid, web.group, web.unit, web.container, web.cmdline) == (
        33, "www-data", 33, "www-data", "nginx.service", "web-1", "nginx: worker*")
    policy = config.policies["web"]
    assert policy.allow == (
        Rule(actions=("read", "list"), resources=("web/*",)),
        Rule(actions=("*",), resources=("web/tmp/?",)),
    )
    ip_range, window = policy.conditions
    assert ip_range.value == "10.0.0.0/8,192.168.0.0/16,fd00::/8"
    assert ip_range.values == ("10.0.0.0/8", "192.168.0.0/16", "fd00::/8")
    assert window.value == "22:00-06:00 Mon-Wed,Fri tz=Europe/Berlin"
    assert window.values == (window.value,)
    # a policy whose name matches no principal is fine (it may be applied through the API)
    assert config.policies["api-only"] == PolicySpec(name="api-only")


@pytest.mark.parametrize(
    ("backend", "options"),
    [
        ("{type: openbao, address: 'http://127.0.0.1:8200', token: s.abc}",
         {"address": "http://127.0.0.1:8200", "token": "s.abc", "mount": "secret"}),
        ("{type: openbao, token_file: ~/bao-token}",
         {"token_file": "HOME/bao-token", "mount": "secret"}),
        ("{type: aws, region: eu-west-1, endpoint_url: 'http://127.0.0.1:5000', prefix: sfs/, "
         "timeout: 5s}",
         {"region": "eu-west-1", "endpoint_url": "http://127.0.0.1:5000", "prefix": "sfs/",
          "timeout": 5.0}),
        ("{type: keyring, service: secretfs-test}", {"service": "secretfs-test"}),
        ("{type: my_plugin, path: rel/x, max_versions: 0, nested: {a: [1, yes, ~]}}",
         {"path": "rel/x", "max_versions": 0, "nested": {"a": (1, True, None)}}),
    ],
)
def test_backend_options(home: Path, backend: str, options: dict[str, object]) -> None:
    expected = {k: Path(str(v).replace("HOME", str(home))) if k.endswith("_file") else v
                for k, v in options.items()}
    config = parse_config(f"secrets_manager:\n  backend: {backend}\n")
    assert config.manager.backend.options == expected
    assert config.manager.backend.path == default_config().manager.backend.path  # plugins: raw


def test_aws_kms_needs_key_id(home: Path) -> None:
    config = parse_config("secrets_manager:\n  encryption: {provider: aws_kms, key_id: alias/k}\n")
    assert (config.manager.encryption.provider, config.manager.encryption.key_id) == (
        "aws_kms", "alias/k")


def test_settings_are_frozen(home: Path) -> None:
    config = parse_config("secrets_manager:\n  backend: {type: keyring, service: s}\n")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.manager.cache.ttl = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.manager.backend.options["service"] = "other"  # type: ignore[index]
    with pytest.raises(TypeError):
        config.principals["x"] = PrincipalSpec(name="x", uid=1)  # type: ignore[index]


def test_principals_keep_file_order_and_merge_keys(home: Path) -> None:
    text = """\
principals:
  zeta: &base { uid: 1001, exe: /usr/bin/app }
  alpha: { <<: *base, uid: 1002 }
  mid: { user: bob }
"""
    principals = parse_config(text).principals
    assert list(principals) == ["zeta", "alpha", "mid"]
    assert principals["alpha"] == PrincipalSpec(name="alpha", uid=1002, exe="/usr/bin/app")


def test_string_fields_take_the_text_as_written(home: Path) -> None:
    # YAML 1.1 reads `no` as false and 0755 as a number; a user name or token is still text
    config = parse_config("principals:\n  p: { user: no, group: 0755 }\n")
    assert (config.principals["p"].user, config.principals["p"].group) == ("no", "0755")


# -- paths and the lookup order ---------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder(home: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    text = "secrets_manager:\n  backend: {path: data/store.db}\n  audit: {path: ~/audit.log}\n"
    path = tmp_path / "conf" / "config.yaml"
    path.parent.mkdir()
    path.write_text(text)
    monkeypatch.chdir(home)
    config = load_config(path)
    assert config.manager.backend.path == tmp_path / "conf/data/store.db"
    assert config.manager.audit.path == home / "audit.log"
    assert parse_config(text, str(path)) == config  # a SIGHUP reload sees the same
    assert parse_config(text).manager.backend.path == home / "data/store.db"  # <config>: cwd


def test_lookup_order(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config_path_from_env() is None
    assert load_config() == default_config()

    user_file = home / ".config/secretfs/config.yaml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("secrets_manager: {cache: {ttl: 1s}}\n")
    assert config_path_from_env() == user_file
    assert load_config().manager.cache.ttl == 1.0
    assert load_config().source == str(user_file)

    xdg_file = tmp_path / "xdg/secretfs/config.yaml"
    xdg_file.parent.mkdir(parents=True)
    xdg_file.write_text("secrets_manager: {cache: {ttl: 2s}}\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_path_from_env() == xdg_file

    env_file = tmp_path / "env.yaml"
    env_file.write_text("secrets_manager: {cache: {ttl: 3s}}\n")
    monkeypatch.setenv("SECRETFS_CONFIG", str(env_file))
    assert config_path_from_env() == env_file
    assert load_config().manager.cache.ttl == 3.0

    explicit = tmp_path / "explicit.yaml"
    explicit.write_text("secrets_manager: {cache: {ttl: 4s}}\n")
    assert config_path_from_env(explicit) == explicit
    assert load_config(str(explicit)).manager.cache.ttl == 4.0

    monkeypatch.setenv("SECRETFS_CONFIG", "")  # empty counts as unset
    assert config_path_from_env() == xdg_file


def test_root_reads_the_system_file(home: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    system_file = tmp_path / "etc-secretfs.yaml"
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system_file)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    user_file = home / ".config/secretfs/config.yaml"
    user_file.parent.mkdir(parents=True)
    user_file.write_text("{}\n")
    assert config_path_from_env() is None  # root never reads a per-user file
    system_file.write_text("{}\n")
    assert config_path_from_env() == system_file
    assert load_config().source == str(system_file)


def test_system_path_is_the_documented_one() -> None:
    assert Path("/etc/secretfs/config.yaml") == config_module.SYSTEM_CONFIG


def test_a_named_file_must_exist(home: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file {missing} not found.*--config"):
        load_config(missing)
    monkeypatch.setenv("SECRETFS_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=f"config file {missing} not found.*SECRETFS_CONFIG"):
        config_path_from_env()


def test_unreadable_oversized_and_non_utf8_files(home: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match=r"big.yaml is larger than 1 MiB"):
        load_config(big)
    with pytest.raises(ConfigError, match=r"<config> is larger than 1 MiB"):
        parse_config("#" * (1024 * 1024 + 1))
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"# ok\nprincipals:\n  caf\xe9: {uid: 1}\n")
    with pytest.raises(ConfigError, match=r"latin.yaml:3: the file is not UTF-8 text"):
        load_config(latin)
    with pytest.raises(ConfigError, match=r"cannot read config file .*: Is a directory"):
        load_config(tmp_path)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfsecrets_manager: {cache: {ttl: 7s}}\n")
    assert load_config(bom).manager.cache.ttl == 7.0


# -- errors: file, line, dotted key -----------------------------------------------------------

ERRORS = [
    # (document, line, dotted key, what the message says)
    ("# c\nsecrets_manager:\n  cache:\n    enabled: true\n    ttl: 5 minutes\n", 5,
     "secrets_manager.cache.ttl", "'5 minutes' is not a duration (use e.g. 300s, 15m, 1h, 90d)"),
    ("secrets_manager:\n  cache:\n    tll: 5m\n", 3, "secrets_manager.cache.tll",
     "unknown key (did you mean 'ttl'?"),
    ("secrets_manager:\n  cache:\n    ttl: 5m\n\n    ttl: 6m\n", 5, "secrets_manager.cache.ttl",
     "duplicate key (first at line 3)"),
    ("secrets_manager:\n  cache:\n    max_size: -3\n", 3, "secrets_manager.cache.max_size",
     "-3 is out of range"),
    ("secrets_manager:\n  backend:\n    max_versions: 0\n", 3,
     "secrets_manager.backend.max_versions", "0 is out of range"),
    ("secrets_manager:\n  cache:\n    max_size: lots\n", 3, "secrets_manager.cache.max_size",
     "expected a whole number, got text"),
    ("secrets_manager:\n  cache:\n    enabled: 1\n", 3, "secrets_manager.cache.enabled",
     "expected true or false, got a number"),
    ("secrets_manager:\n  cache:\n    ttl: [1s]\n", 3, "secrets_manager.cache.ttl",
     "expected a duration, got a list"),
    ("secrets_manager:\n  cache:\n    ttl: .inf\n", 3, "secrets_manager.cache.ttl",
     "'.inf' is not a duration"),
    ("secrets_manager:\n  cache:\n    ttl: -5\n", 3, "secrets_manager.cache.ttl",
     "'-5' is not a duration"),
    ("secrets_manager:\n  cache:\n    poll_interval: 0s\n", 3,
     "secrets_manager.cache.poll_interval", "must be longer than 0s"),
    ("secrets_manager:\n  cache: [a]\n", 2, "secrets_manager.cache",
     "expected a mapping, got a list"),
    ("secrets_manager:\n  rotation:\n    schedule: '0 25 * * *'\n", 3,
     "secrets_manager.rotation.schedule", "'0 25 * * *' is not a cron expression: hour 25"),
    ("secrets_manager:\n  rotation:\n    default_policy:\n      overlap: soon\n", 4,
     "secrets_manager.rotation.default_policy.overlap", "'soon' is not a duration"),
    ("secrets_manager:\n  audit:\n    log_level: trace\n", 3, "secrets_manager.audit.log_level",
     "'trace' is not one of info, debug"),
    ("secrets_manager:\n  audit:\n    path: ''\n", 3, "secrets_manager.audit.path", "is empty"),
    ("secrets_manager:\n  backend:\n    type: local\n    address: http://x\n", 4,
     "secrets_manager.backend.address", "unknown key (known keys here: type, path, max_versions)"),
    ("secrets_manager:\n  backend:\n    type: Vault\n", 3, "secrets_manager.backend.type",
     "'Vault' is not a backend type"),
    ("secrets_manager:\n  backend:\n    type: openbao\n    address: bao:8200\n", 4,
     "secrets_manager.backend.address", "'bao:8200' is not an http:// or https:// URL"),
    ("secrets_manager:\n  backend:\n    type: openbao\n    token: a\n    approle: {role_id: r}\n",
     5, "secrets_manager.backend.approle", "conflicts with token"),
    ("secrets_manager:\n  backend:\n    type: openbao\n    approle: {secret_id_file: f}\n", 4,
     "secrets_manager.backend.approle.role_id", "is required"),
    ("secrets_manager:\n  backend:\n    type: aws\n    timeout: 0\n", 4,
     "secrets_manager.backend.timeout", "must be longer than 0s"),
    ("secrets_manager:\n  encryption:\n    provider: aws_kms\n", 3,
     "secrets_manager.encryption.key_id", "is required when provider is aws_kms"),
    ("secrets_manager:\n  encryption:\n    provider: openbao_transit\n", 3,
     "secrets_manager.encryption.key_name", "is required when provider is openbao_transit"),
    ("secrets_manager:\n  encryption:\n    provider: file\n    key_id: alias/x\n", 4,
     "secrets_manager.encryption.key_id", "only applies to provider aws_kms"),
    ("secrets_manager:\n  encryption:\n    provider: vault\n", 3,
     "secrets_manager.encryption.provider", "'vault' is not one of file, keyring"),
    ("principals:\n  a: { uid: 1 }\n  b: {}\n", 3, "principals.b", "needs at least one matcher"),
    ("principals:\n  a: { uid: -1 }\n", 2, "principals.a.uid", "-1 is out of range"),
    ("principals:\n  a: { exe_sha256: abc }\n", 2, "principals.a.exe_sha256",
     "'abc' is not a sha256 digest"),
    ("principals:\n  a: { pid: 1 }\n", 2, "principals.a.pid", "unknown key"),
    ("principals:\n  'bad name': { uid: 1 }\n", 2, "principals.bad name",
     "'bad name' is not a valid name"),
    ("policies:\n  p:\n    allow:\n      - {action: read, resources: [x]}\n"
     "      - {action: reed, resources: [x]}\n", 5, "policies.p.allow[1].action",
     "'reed' is not one of read, list, write, delete, rotate, *"),
    ("policies:\n  p:\n    allow:\n      - {action: [read, fly], resources: [x]}\n", 4,
     "policies.p.allow[0].action[1]", "'fly' is not one of"),
    ("policies:\n  p:\n    deny:\n      - {action: read}\n", 4, "policies.p.deny[0].resources",
     "is required"),
    ("policies:\n  p:\n    deny:\n      - {action: read, resources: []}\n", 4,
     "policies.p.deny[0].resources", "is an empty list"),
    ("policies:\n  p:\n    deny:\n      - {action: read, resources: ['a b']}\n", 4,
     "policies.p.deny[0].resources[0]", "'a b' is not a resource pattern"),
    ("policies:\n  p:\n    allow: {action: read, resources: [x]}\n", 3, "policies.p.allow",
     "expected a list, got a mapping"),
    ("policies:\n  p:\n    conditions:\n      - type: ip_range\n        value:\n"
     "          - 10.0.0.0/8\n          - 10.0.0.300/8\n", 7, "policies.p.conditions[0].value",
     "'10.0.0.300/8' is not an IP network"),
    ("policies:\n  p:\n    conditions:\n      - {type: ip_range, value: '10.0.0.0/8,'}\n", 4,
     "policies.p.conditions[0].value", "'' is not an IP network"),
    ("policies:\n  p:\n    conditions:\n      - {type: time_window, value: '9-17'}\n", 4,
     "policies.p.conditions[0].value", "'9-17' is not a time window"),
    ("policies:\n  p:\n    conditions:\n      - {type: time_window, value: '09:00-25:00'}\n", 4,
     "policies.p.conditions[0].value", "hours run 00-23"),
    ("policies:\n  p:\n    conditions:\n      - {type: time_window, value: '09:00-09:00'}\n", 4,
     "policies.p.conditions[0].value", "starts and ends at the same time"),
    ("policies:\n  p:\n    conditions:\n      - {type: time_window, value: '09:00-17:00 Mo-Fr'}\n",
     4, "policies.p.conditions[0].value", "'Mo-Fr' is not a day or a range of days"),
    ("policies:\n  p:\n    conditions:\n"
     "      - {type: time_window, value: '09:00-17:00 tz=Mars/Base'}\n", 4,
     "policies.p.conditions[0].value", "unknown time zone 'Mars/Base'"),
    ("policies:\n  p:\n    conditions:\n      - {type: geo, value: x}\n", 4,
     "policies.p.conditions[0].type", "'geo' is not one of ip_range, time_window"),
    ("policies:\n  p:\n    conditions:\n      - {value: x}\n", 4, "policies.p.conditions[0].type",
     "is required"),
    ("secrets_manager: {}\nsecret_manager: {}\n", 2, "secret_manager",
     "unknown key (did you mean 'secrets_manager'?"),
    ("principals:\n  a: {uid: !!str 5}\n", 2, "principals.a.uid",
     "expected a whole number, got text"),
    ("principals:\n  a: {user: !vault x}\n", 2, "principals.a.user", "unsupported YAML tag !vault"),
    ("principals:\n  [a]: {uid: 1}\n", 2, "principals", "a key must be text, not a list"),
    ("principals:\n  a: &a {<<: *a}\n", 2, "principals.a",
     "an alias refers to the mapping or list that contains it"),
    ("secrets_manager:\n  backend: {type: plug, x: &a [1, *a]}\n", 2,
     "secrets_manager.backend.x[1]", "an alias refers to the mapping or list that contains it"),
    ("secrets_manager:\n  backend:\n    type: plug\n    x: " + "[" * 40 + "]" * 40 + "\n", 4,
     "secrets_manager.backend.x" + "[0]" * 33, "nested more than 32 levels deep"),
    ("secrets_manager:\n  backend: {type: plug, x: !custom 1}\n", 2, "secrets_manager.backend.x",
     "cannot read this value"),
    ("secrets_manager:\n  backend: {type: plug, x: 2021-02-30}\n", 2, "secrets_manager.backend.x",
     "cannot read this value: day is out of range"),
]


@pytest.mark.parametrize(("text", "line", "key", "what"), ERRORS)
def test_errors_name_file_line_and_key(home: Path, text: str, line: int, key: str,
                                       what: str) -> None:
    message = error_of(text)
    assert message.startswith(f"{SRC}:{line}: {key}: "), message
    assert what in message


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("a: b: c\n", 1, "YAML syntax error: mapping values are not allowed"),
        ("secrets_manager:\n  rotation:\n    schedule: * * * * *\n", 3,
         "YAML syntax error: while scanning an alias"),
        ("principals:\n  a: [\n", 3, "YAML syntax error"),
        ("principals:\n  a: {uid: 1}\n\tb: 2\n", 3, "YAML syntax error"),
        ("a: 1\n---\nb: 2\n", 2, "YAML syntax error: expected a single document"),
        ("x: *nothing\n", 1, "YAML syntax error: found undefined alias"),
        ("ok: 1\nbad: \x01\n", 2, "YAML syntax error: control characters are not allowed"),
        ("- a\n- b\n", 1, "the top level must be a mapping, not a list"),
        ("just text\n", 1, "the top level must be a mapping, not text"),
    ],
)
def test_document_errors_name_the_line(home: Path, text: str, line: int, what: str) -> None:
    message = error_of(text)
    assert message.startswith(f"{SRC}:{line}: {what}"), message


def test_errors_never_show_a_token(home: Path) -> None:
    token = "s.Sup3rS3cretT0ken"
    for text in (
        f"secrets_manager:\n  backend: {{type: openbao, token: [{token}]}}\n",
        f"secrets_manager:\n  backend: {{type: openbao, token: {token}, token_file: f}}\n",
        f"secrets_manager:\n  backend:\n    type: openbao\n    token: '{token}\n",
        f"secrets_manager:\n  backend:\n    type: openbao\n    token: {token}\n    tokn: x: y\n",
        f"secrets_manager:\n  backend:\n    type: local\n    token: {token}\n",
    ):
        assert token not in error_of(text)


def test_error_source_is_the_loaded_file(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("secrets_manager:\n  mount:\n    allow_other: maybe\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.what == (
        f"{path}:3: secrets_manager.mount.allow_other: expected true or false, got text")


# -- cron -------------------------------------------------------------------------------------

GOOD_CRON = ["0 0 * * *", "*/5 * * * *", "0 3 * * 1-5", "5/15 0 1,15 * SUN", "0 0 1 jan-mar *",
             "59 23 31 12 7", "0 0 * * SAT-SUN", "@daily", "@hourly", "@weekly", "@monthly",
             "@yearly", "@annually", "@midnight", "  0 0 * * *  "]
BAD_CRON = [
    ("0 0 * *", "it has 4 fields, not 5"), ("0 0 0 * * *", "it has 6 fields"),
    ("60 * * * *", "minute 60 is outside 0-59"), ("* 24 * * *", "hour 24 is outside 0-23"),
    ("* * 0 * *", "day of month 0 is outside 1-31"), ("* * * 13 *", "month 13 is outside 1-12"),
    ("* * * * 8", "day of week 8 is outside 0-7"), ("*/0 * * * *", "has a step of 0"),
    ("* * * * MON-XYZ", "day of week 'XYZ' is not a number or a name"),
    ("* * MON * *", "day of month 'MON' is not a number"), ("1,,2 * * * *", "minute ''"),
    ("@reboot", "unknown alias @reboot"), ("L * * * *", "minute 'L' is not a number"),
]


@pytest.mark.parametrize("expression", GOOD_CRON)
def test_good_cron(home: Path, expression: str) -> None:
    text = f"secrets_manager:\n  rotation:\n    schedule: {json.dumps(expression)}\n"
    assert parse_config(text).manager.rotation.schedule == expression.strip()


@pytest.mark.parametrize(("expression", "why"), BAD_CRON)
def test_bad_cron(home: Path, expression: str, why: str) -> None:
    text = f"secrets_manager:\n  rotation:\n    schedule: {json.dumps(expression)}\n"
    message = error_of(text)
    assert message.startswith(f"{SRC}:3: secrets_manager.rotation.schedule: {expression.strip()!r}"
                              " is not a cron expression: ")
    assert why in message


_cron_field = st.builds(
    lambda start, length, step, star: ("*" if star else f"{start}-{start + length}")
    + (f"/{step}" if step else ""),
    st.integers(0, 5), st.integers(0, 5), st.integers(0, 9), st.booleans(),
)


@given(st.lists(st.lists(_cron_field, min_size=1, max_size=3).map(",".join), min_size=5,
                max_size=5))
def test_what_the_config_accepts_croniter_accepts(fields: list[str]) -> None:
    """The structural check never lets through what the scheduler (croniter) would reject."""
    from croniter import croniter

    fields[2] = fields[2].replace("0-", "1-")  # day of month starts at 1
    fields[3] = fields[3].replace("0-", "1-")
    expression = " ".join(fields)
    if config_module._cron_problem(expression) is None:
        assert croniter.is_valid(expression), expression


# -- durations (hypothesis) -------------------------------------------------------------------

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@given(st.integers(0, 10**6), st.sampled_from(sorted(UNITS)))
def test_durations_with_units(number: int, unit: str) -> None:
    text = f"secrets_manager:\n  cache:\n    max_stale: {number}{unit}\n"
    assert parse_config(text).manager.cache.max_stale == pytest.approx(number * UNITS[unit])


@given(st.text(max_size=20))
def test_any_duration_text_parses_or_names_line_and_key(text: str) -> None:
    document = yaml.safe_dump({"secrets_manager": {"audit": {"retention": text}}})
    line = document.splitlines().index("  audit:") + 2
    try:
        expected = parse_duration(text)
    except ValueError:
        expected = None
    if expected is not None and 0 < expected < float("inf"):
        assert parse_config(document, SRC).manager.audit.retention == expected
    else:
        message = error_of(document)
        assert message.startswith(f"{SRC}:{line}: secrets_manager.audit.retention: "), message


# -- fuzz: nothing but ConfigError escapes ----------------------------------------------------

_KEYS = sorted({
    "secrets_manager", "principals", "policies", "backend", "encryption", "cache", "rotation",
    "audit", "mount", "type", "path", "max_versions", "address", "token", "token_file",
    "approle", "role_id", "secret_id_file", "ca_file", "namespace", "timeout", "region",
    "endpoint_url", "prefix", "service", "provider", "key_file", "key_name", "key_id", "enabled",
    "ttl", "max_size", "max_stale", "poll_interval", "read_ahead", "schedule", "default_policy",
    "max_age",
    "overlap", "log_level", "retention", "fail_open", "allow_other", "uid", "user", "gid",
    "group", "exe", "exe_sha256", "unit", "container", "cmdline", "allow", "deny", "conditions",
    "action", "resources", "value", "ip_range", "time_window", "openbao", "aws", "keyring",
    "local", "plug", "read", "*",
})
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True),
    st.text(max_size=12), st.sampled_from(_KEYS),
    st.sampled_from(["300s", "1h", "-1", "0", "09:00-17:00", "10.0.0.0/8", "0 0 * * *", "@daily",
                     "openbao_transit", "aws_kms", "http://x", "a" * 64, "~/x", "rel/x"]),
)
_documents = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=6)), children,
                        max_size=5),
    ),
    max_leaves=25,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["secrets_manager", "principals", "policies"]),
                       _documents, max_size=3))
def test_fuzz_structured_documents(document: dict[str, object]) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        config = parse_config(text, SRC)
    except ConfigError as error:
        assert str(error).startswith(f"{SRC}"), str(error)
    else:
        assert isinstance(config, Config)


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_fuzz_raw_text(text: str) -> None:
    try:
        parse_config(text, SRC)
    except ConfigError as error:
        assert str(error).startswith(SRC)


def test_alias_bombs_are_cheap() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = "secrets_manager:\n  backend:\n    type: plug\n" + "".join(
        f"    {line}\n" for line in lines)
    options = parse_config(text).manager.backend.options
    assert options["a8"][0][0] is options["a6"]  # shared, not 10**8 copies


def test_pure_python_loader_gives_the_same_answers(home: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Without libyaml, PyYAML's Python loader serves, with the same lines in errors."""
    expected = parse_config(CONTRACT_EXAMPLE, SRC)
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    assert parse_config(CONTRACT_EXAMPLE, SRC) == expected
    assert error_of("secrets_manager:\n  cache:\n    ttl: 5 minutes\n").startswith(
        f"{SRC}:3: secrets_manager.cache.ttl: ")
    assert error_of("[" * 5000 + "]" * 5000) == f"{SRC}: the document is nested too deeply"


def test_examples_in_the_docs_are_valid(home: Path) -> None:
    doc = (Path(__file__).parents[1] / "docs" / "config.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert len(blocks) >= 5
    for block in blocks:
        parse_config(block if not block.startswith(" ") else "secrets_manager:\n" + block)
    assert parse_config(blocks[-1]).manager == default_config().manager


# -- import cost ------------------------------------------------------------------------------


def test_import_and_default_config_load_no_yaml_or_croniter() -> None:
    code = (
        "import sys, secretfs.config as c\n"
        "c.default_config(); c.data_dir()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'croniter'))\n"
        "assert not heavy, heavy\n"
        "c.parse_config('secrets_manager: {rotation: {schedule: \"0 0 * * *\"}}')\n"
        "assert 'yaml' in sys.modules and 'croniter' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
