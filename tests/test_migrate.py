"""`secretfs migrate` and `secretfs secrets import`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from secretfs.config import load_config
from secretfs.errors import ConflictError
from secretfs.manager import SyncSecretsManager
from secretfs.migrate import migrate
from secretfs.model import Label, RotationPolicy, Secret
from tests.helpers import make_store, one_line_error


def fill(manager: SyncSecretsManager, count: int) -> None:
    """*count* secrets with 3 versions each (the last a map), tags and a rotation policy."""
    for i in range(count):
        name = f"team{i % 5}/s{i:03d}"
        for value in (os.urandom(8).hex(), os.urandom(8).hex(), {"k": os.urandom(8).hex()}):
            manager.store(Secret(name, value, description=f"d{i}", tags={"n": str(i)},
                                 rotation=RotationPolicy(interval=86400 * (i + 1))))


def assert_same(source: SyncSecretsManager, target: SyncSecretsManager) -> None:
    names = source.backend.list_names()
    assert target.backend.list_names() == names
    for name in names:
        mine, theirs = source.metadata(name), target.metadata(name)
        assert (theirs.description, dict(theirs.tags), theirs.rotation) == \
            (mine.description, dict(mine.tags), mine.rotation)
        values = [source.backend.read_value(name, v.version) for v in mine.versions]
        copied = [target.backend.read_value(name, v.version) for v in theirs.versions]
        assert copied == values
        by_value = {label: source.backend.read_value(name, v) for label, v in mine.labels.items()}
        assert {label: target.backend.read_value(name, v)
                for label, v in theirs.labels.items()} == by_value


def test_migrate_copies_everything_and_resumes_without_duplicates(tmp_path: Path) -> None:
    source_store, target_store = make_store(tmp_path / "a"), make_store(tmp_path / "b")
    source = SyncSecretsManager.from_config(load_config(source_store.config))
    target = SyncSecretsManager.from_config(load_config(target_store.config))
    fill(source, 300)
    source.backend.write_version("team0/s000", b"pending-one", label=Label.PENDING)

    class Interrupted(Exception):
        pass

    def stop_half_way(done: int, total: int) -> None:
        if done == total // 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        migrate(source, target, progress=stop_half_way)
    half = len(target.backend.list_names())
    assert 100 < half < 300
    report = migrate(source, target)
    assert (report.secrets, report.written + report.present) == (300, 901)
    assert report.present == half * 3 + 1  # the first half (team0/s000 has a 4th version)
    assert_same(source, target)
    again = migrate(source, target)
    assert again.written == 0  # idempotent: nothing twice
    assert_same(source, target)


def test_a_target_secret_with_other_versions_is_refused(tmp_path: Path) -> None:
    source_store, target_store = make_store(tmp_path / "a"), make_store(tmp_path / "b")
    source_store.put("db", "one")
    target_store.put("db", "something else")
    done = source_store.cli("migrate", "--from", str(source_store.config), "--to",
                            str(target_store.config))
    assert done.returncode == ConflictError.exit_code
    assert "'db' already exists in the target" in one_line_error(done)


def test_migrate_cli_reports_and_prefix(tmp_path: Path) -> None:
    source_store, target_store = make_store(tmp_path / "a"), make_store(tmp_path / "b")
    for name in ("app/a", "app/b", "other/c"):
        source_store.put(name, os.urandom(4).hex())
    done = source_store.cli("migrate", "--from", str(source_store.config), "--to",
                            str(target_store.config), "--prefix", "app/", check=True)
    assert done.stdout == b"migrated 2 secrets: 2 versions written, 0 already there\n"
    assert b"migrate: 2/2 secrets" in done.stderr  # progress lines when not on a terminal
    assert target_store.cli("secrets", "list").stdout == b"app/a\napp/b\n"


def test_import_dotenv_and_json(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s")
    dotenv = tmp_path / "app.env"
    dotenv.write_text("DB_PASSWORD='p w'\nexport API_KEY=k1 # a comment\n")
    done = store.cli("secrets", "import", str(dotenv), "--prefix", "app/", check=True)
    assert done.stdout == b"imported 2 secrets\n"
    assert store.get("app/DB_PASSWORD") == b"p w" and store.get("app/API_KEY") == b"k1"
    document = tmp_path / "s.json"
    document.write_text(json.dumps({"db": {"user": "app", "password": "x"}, "flag": True}))
    store.cli("secrets", "import", str(document), check=True)
    assert json.loads(store.get("db")) == {"user": "app", "password": "x"}
    assert store.get("flag") == b"true"


def test_import_of_a_file_over_one_mebibyte_takes_every_secret(tmp_path: Path) -> None:
    """An import file holds many secrets: it is not cut at one value's 1 MiB limit."""
    store = make_store(tmp_path / "s")
    document = tmp_path / "many.json"
    values = {f"k{i:04d}": os.urandom(300).hex() for i in range(2000)}  # ~1.2 MiB of JSON
    document.write_text(json.dumps(values))
    assert document.stat().st_size > 1024 * 1024
    done = store.cli("secrets", "import", str(document), check=True)
    assert done.stdout == b"imported 2000 secrets\n"
    assert store.get("k1999") == values["k1999"].encode()
