"""The parsed-config cache: used only when it is exactly right, never trusted when it is not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from secretfs import config_cache
from secretfs.config import _CLASSES, load_config, parse_config
from tests.test_config import CONTRACT_EXAMPLE as EXAMPLE

LOAD = ("import sys; from secretfs.config import load_config; "
        "c = load_config(sys.argv[1]); print(c.manager.cache.ttl, 'yaml' in sys.modules)")


def load_in_fresh_process(path: Path) -> str:
    return subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True,
                          text=True, check=True).stdout.split()


def test_a_cached_parse_equals_a_fresh_one(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE)
    fresh = parse_config(EXAMPLE, str(path))
    assert config_cache._thaw(config_cache._freeze(fresh), _CLASSES) == fresh
    assert load_config(path) == fresh  # parsed, then stored
    assert load_config(path) == fresh  # from the cache


def test_the_second_run_skips_yaml(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE)
    assert load_in_fresh_process(path) == ["300.0", "True"]
    assert load_in_fresh_process(path) == ["300.0", "False"]


def test_any_edit_is_seen_even_with_the_same_size_and_time(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE)
    load_config(path)
    before = path.stat()
    path.write_text(EXAMPLE.replace("ttl: 300s", "ttl: 420s"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    assert load_config(path).manager.cache.ttl == 420.0


def test_an_entry_others_could_write_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE)
    load_config(path)
    entry = config_cache._entry(path)
    key = config_cache.stamp(path, path.read_bytes())
    assert config_cache.load(path, key, _CLASSES) is not None
    entry.chmod(0o660)
    assert config_cache.load(path, key, _CLASSES) is None
    assert load_in_fresh_process(path) == ["300.0", "True"]  # parsed again, entry rewritten
    assert oct(entry.stat().st_mode & 0o777) == oct(0o600)


def test_a_damaged_entry_is_a_miss(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(EXAMPLE)
    load_config(path)
    config_cache._entry(path).write_bytes(b"\x00garbage")
    assert load_config(path).manager.cache.ttl == 300.0
