"""The backend conformance suite: the semantics of secretfs.backends.base, as pytest tests.

Every backend — built in or a plugin registered under the ``secretfs.backends`` entry-point
group — must keep the promises the Backend protocol's docstring makes, because the manager, the
mount's caches and the rotation workflow rely on them without knowing which backend is behind.
This module turns those promises into tests, so a backend author runs the same checks as the
built-in backends instead of rediscovering the rules from bug reports.

How to use it (``pip install secretfs[test]`` brings pytest)::

    import pytest
    from secretfs.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend(self, tmp_path):
            backend = MyBackend(...)  # a fresh, empty store: every test starts from nothing
            yield backend
            backend.close()

The subclass needs a ``Test`` prefix for pytest to collect it; the mixin has none, so importing it
runs nothing by itself. Add backend-specific tests to the same class or next to it.

The tests read ``backend.capabilities`` (names from ``base.CAPABILITIES``). A test of a capability
the backend declares checks the capability; a test of one it lacks checks the behaviour the
capability's meaning promises instead (e.g. without ``versions`` a second write replaces the
value and ``versions`` lists one entry; without ``labels``, ``update_labels`` raises a
SecretfsError). So a backend cannot pass by declaring less than it does, nor by silently ignoring
what it cannot do.

Values are random (``secrets.token_hex``) and every expected error is checked not to contain a
value: no message may ever carry a secret (errors.py).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from secretfs.backends.base import CAPABILITIES, Backend, MetadataUpdate
from secretfs.errors import (
    ConflictError,
    InvalidName,
    NotFound,
    SecretfsError,
    SecretNotFound,
    VersionNotFound,
)
from secretfs.model import (
    GeneratorSpec,
    Label,
    RotationPolicy,
    RotationState,
    RotationStep,
    Value,
)

__all__ = ["BackendConformance", "no_value_in_error", "token"]

THREADS = 8
WRITES_PER_THREAD = 20


def token(size: int = 16) -> bytes:
    """A fresh random value: text-safe bytes, so a leak is searchable in any message."""
    return secrets.token_hex(size).encode()


@contextmanager
def no_value_in_error(expected: type[BaseException] | tuple[type[BaseException], ...],
                      *values: Value) -> Iterator[Any]:
    """``pytest.raises(expected)`` that also fails if any of *values* shows in the message.

    Checks ``str`` and ``repr`` of the error and of each of its SecretfsError parts (what, fix),
    for every key and item of map values too.
    """
    with pytest.raises(expected) as caught:
        yield caught
    texts = [str(caught.value), repr(caught.value)]
    texts += [str(getattr(caught.value, part, "")) for part in ("what", "fix")]
    needles: list[str] = []
    for value in values:
        if isinstance(value, bytes):
            needles.append(value.decode(errors="replace"))
        else:
            needles.extend(item for item in value.values() if len(item) >= 8)
    for needle in needles:
        if not needle:
            continue
        for text in texts:
            assert needle not in text, f"a secret value appears in {type(caught.value).__name__}"


class BackendConformance:
    """Mixin of protocol-level tests; subclass it and provide a ``backend`` fixture."""

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def has(backend: Backend, capability: str) -> bool:
        return capability in backend.capabilities

    @staticmethod
    def current(backend: Backend, name: str) -> int:
        version = backend.read_metadata(name).current_version
        assert version is not None, f"{name!r} has no current version"
        return version

    # -- declaration --------------------------------------------------------------------------

    def test_capabilities_are_known_names(self, backend: Backend) -> None:
        assert isinstance(backend.capabilities, frozenset)
        unknown = set(backend.capabilities) - set(CAPABILITIES)
        assert not unknown, f"capabilities not in base.CAPABILITIES: {sorted(unknown)}"
        assert isinstance(backend.kind, str) and backend.kind

    # -- values -------------------------------------------------------------------------------

    def test_bytes_round_trip(self, backend: Backend) -> None:
        value = secrets.token_bytes(48) + b"\x00\xff\n"  # not UTF-8, NUL and newline included
        version = backend.write_version("db", value)
        assert version == 1
        assert backend.read_value("db", version) == value
        assert isinstance(backend.read_value("db", version), bytes)

    def test_empty_and_large_bytes(self, backend: Backend) -> None:
        assert backend.read_value("empty", backend.write_version("empty", b"")) == b""
        large = secrets.token_bytes(64 * 1024)
        assert backend.read_value("large", backend.write_version("large", large)) == large
        info = backend.read_metadata("large").version_info(1)
        assert info is not None and info.size_of("value") in (None, 64 * 1024)

    def test_map_round_trip(self, backend: Backend) -> None:
        value = {
            "user": "app",
            "password": token().decode(),
            "empty": "",
            "unicode": "пароль ✓ 🔑 " + token(4).decode(),
            "big": secrets.token_hex(32 * 1024),  # 64 KiB of text
        }
        version = backend.write_version("db-creds", value)
        read = backend.read_value("db-creds", version)
        assert read == value
        assert isinstance(read, dict)
        info = backend.read_metadata("db-creds").version_info(version)
        assert info is not None and info.is_map
        assert set(info.keys) == set(value)

    def test_bytes_and_map_versions_keep_their_kind(self, backend: Backend) -> None:
        first = backend.write_version("db", token())
        second = backend.write_version("db", {"password": token().decode()})
        metadata = backend.read_metadata("db")
        assert metadata.version_info(second).is_map
        if self.has(backend, "versions"):
            assert not metadata.version_info(first).is_map
            assert isinstance(backend.read_value("db", first), bytes)
        assert isinstance(backend.read_value("db", second), dict)

    # -- versions -----------------------------------------------------------------------------

    def test_versions_are_numbered_from_one(self, backend: Backend) -> None:
        values = [token() for _ in range(3)]
        numbers = [backend.write_version("db", value) for value in values]
        assert numbers[0] == 1
        assert numbers == sorted(set(numbers)), "version numbers must go up"
        metadata = backend.read_metadata("db")
        assert metadata.current_version == numbers[-1]
        assert backend.read_value("db", numbers[-1]) == values[-1]
        if self.has(backend, "versions"):
            assert numbers == [1, 2, 3]
            assert [v.version for v in metadata.versions] == numbers
            for number, value in zip(numbers, values, strict=True):
                assert backend.read_value("db", number) == value
        else:  # only the newest is kept
            assert [v.version for v in metadata.versions] == [numbers[-1]]
            for number in numbers[:-1]:
                with no_value_in_error(VersionNotFound, *values):
                    backend.read_value("db", number)

    def test_version_numbers_are_never_reused(self, backend: Backend) -> None:
        if not self.has(backend, "destroy"):
            pytest.skip("no destroy: nothing frees a version number")
        backend.write_version("db", token())
        second = backend.write_version("db", token())
        backend.destroy("db", second)
        third = backend.write_version("db", token())
        assert third > second
        with no_value_in_error(VersionNotFound):
            backend.read_value("db", second)

    def test_a_version_that_never_was(self, backend: Backend) -> None:
        value = token()
        backend.write_version("db", value)
        with no_value_in_error(VersionNotFound, value):
            backend.read_value("db", 7)

    def test_concurrent_writers_get_distinct_versions(self, backend: Backend) -> None:
        backend.write_version("shared", token())  # exists before the race: no create conflict
        results: list[list[int]] = [[] for _ in range(THREADS)]
        errors: list[BaseException] = []
        start = threading.Barrier(THREADS)

        def writer(slot: int) -> None:
            try:
                start.wait()
                for _ in range(WRITES_PER_THREAD):
                    results[slot].append(backend.write_version("shared", token()))
            except BaseException as error:  # reported below, in the test's thread
                errors.append(error)

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        numbers = [n for result in results for n in result]
        assert len(set(numbers)) == THREADS * WRITES_PER_THREAD
        assert min(numbers) > 1
        for result in results:  # each writer sees its own versions in order
            assert result == sorted(result)
        assert self.current(backend, "shared") == max(numbers)

    # -- labels -------------------------------------------------------------------------------

    def test_current_and_previous_move_on_write(self, backend: Backend) -> None:
        first = backend.write_version("db", token())
        assert backend.read_metadata("db").labels == {Label.CURRENT: first}
        second = backend.write_version("db", token())
        third = backend.write_version("db", token())
        labels = backend.read_metadata("db").labels
        if self.has(backend, "labels"):
            assert labels == {Label.CURRENT: third, Label.PREVIOUS: second}
        else:
            assert labels == {Label.CURRENT: third}

    def test_pending_does_not_move_current(self, backend: Backend) -> None:
        current_value, pending_value = token(), token()
        first = backend.write_version("db", current_value)
        if not self.has(backend, "labels"):
            with no_value_in_error(SecretfsError, current_value, pending_value):
                backend.write_version("db", pending_value, label=Label.PENDING)
            assert backend.read_metadata("db").labels == {Label.CURRENT: first}
            assert backend.read_value("db", first) == current_value
            return
        pending = backend.write_version("db", pending_value, label=Label.PENDING)
        assert backend.read_metadata("db").labels == {Label.CURRENT: first, Label.PENDING: pending}
        assert backend.read_value("db", pending) == pending_value

    def test_one_pending_version_at_a_time(self, backend: Backend) -> None:
        if not self.has(backend, "labels"):
            pytest.skip("no labels: no pending versions (test_pending_does_not_move_current)")
        values = [token() for _ in range(3)]
        backend.write_version("db", values[0])
        pending = backend.write_version("db", values[1], label=Label.PENDING)
        with no_value_in_error(ConflictError, *values):
            backend.write_version("db", values[2], label=Label.PENDING)
        assert backend.read_metadata("db").labels[Label.PENDING] == pending
        newer = backend.write_version("db", token())  # current may still be written
        assert backend.read_metadata("db").labels[Label.PENDING] == pending
        assert self.current(backend, "db") == newer

    def test_update_labels(self, backend: Backend) -> None:
        value = token()
        first = backend.write_version("db", value)
        if not self.has(backend, "labels"):
            with no_value_in_error(SecretfsError, value):
                backend.update_labels("db", {Label.CURRENT: first})
            assert backend.read_metadata("db").labels == {Label.CURRENT: first}
            return
        pending = backend.write_version("db", token(), label=Label.PENDING)
        # promote: what the rotation workflow does
        backend.update_labels(
            "db", {Label.CURRENT: pending, Label.PREVIOUS: first, Label.PENDING: None},
            expect={Label.CURRENT: first, Label.PENDING: pending},
        )
        assert backend.read_metadata("db").labels == {
            Label.CURRENT: pending, Label.PREVIOUS: first}
        # a stale expectation changes nothing
        with no_value_in_error(ConflictError, value):
            backend.update_labels("db", {Label.CURRENT: first},
                                  expect={Label.CURRENT: first})
        with no_value_in_error(ConflictError, value):
            backend.update_labels("db", {Label.CURRENT: first}, expect={Label.PENDING: pending})
        assert backend.read_metadata("db").labels == {
            Label.CURRENT: pending, Label.PREVIOUS: first}
        # None expects the label absent; None in changes removes it
        backend.update_labels("db", {Label.PREVIOUS: None}, expect={Label.PENDING: None})
        assert backend.read_metadata("db").labels == {Label.CURRENT: pending}
        with no_value_in_error(VersionNotFound, value):
            backend.update_labels("db", {Label.PREVIOUS: 99})
        with no_value_in_error(SecretNotFound):
            backend.update_labels("absent", {Label.CURRENT: 1})

    # -- check-and-set ------------------------------------------------------------------------

    def test_check_and_set(self, backend: Backend) -> None:
        values = [token() for _ in range(5)]
        if not self.has(backend, "cas"):
            with no_value_in_error(SecretfsError, *values):
                backend.write_version("db", values[0], cas=0)
            with no_value_in_error(SecretNotFound):
                backend.read_metadata("db")
            return
        first = backend.write_version("db", values[0], cas=0)
        with no_value_in_error(ConflictError, *values):
            backend.write_version("db", values[1], cas=0)
        second = backend.write_version("db", values[2], cas=first)
        with no_value_in_error(ConflictError, *values):
            backend.write_version("db", values[3], cas=first)
        with no_value_in_error(ConflictError, *values):
            backend.write_version("new", values[4], cas=4)
        assert self.current(backend, "db") == second
        assert backend.read_value("db", second) == values[2]
        if self.has(backend, "versions"):
            assert [v.version for v in backend.read_metadata("db").versions] == [first, second]
        with no_value_in_error(SecretNotFound):
            backend.read_metadata("new")

    # -- metadata -----------------------------------------------------------------------------

    def test_metadata_fields(self, backend: Backend) -> None:
        value = {"user": "app", "password": token().decode()}
        version = backend.write_version("db", value)
        metadata = backend.read_metadata("db")
        assert metadata.name == "db"
        assert not metadata.deleted
        assert metadata.created is not None and metadata.updated is not None
        info = metadata.version_info(version)
        assert info is not None and info.readable and info.is_map
        assert info.keys == ("user", "password")
        assert info.sizes in ((), (3, len(value["password"])))
        assert info.created is not None

    def test_metadata_round_trip(self, backend: Backend) -> None:
        policy = RotationPolicy(
            interval=90 * 86400.0, overlap=3600.0, max_age=100 * 86400.0,
            generator=GeneratorSpec(length=40, charset="hex", require_each=True, exclude="0"),
            set_cmd="/usr/local/bin/set-password", validate_cmd="true", key="password",
        )
        update = MetadataUpdate("Database password ✓", {"env": "prod", "team": "db"}, policy)
        if not self.has(backend, "metadata"):
            backend.write_version("db", token())
            with no_value_in_error(SecretfsError):
                backend.update_metadata("db", update)
            metadata = backend.read_metadata("db")
            assert (metadata.description, dict(metadata.tags), metadata.rotation) == ("", {}, None)
            return
        backend.write_version("db", token(), metadata=update)
        backend.write_version("db", token())  # no metadata: unchanged
        metadata = backend.read_metadata("db")
        assert (metadata.description, dict(metadata.tags), metadata.rotation) == (
            "Database password ✓", {"env": "prod", "team": "db"}, policy)
        backend.update_metadata("db", MetadataUpdate(tags={"env": "staging"}))
        metadata = backend.read_metadata("db")
        assert metadata.description == "Database password ✓"
        assert dict(metadata.tags) == {"env": "staging"}
        assert metadata.rotation == policy
        backend.update_metadata("db", MetadataUpdate(clear_rotation=True, tags={}))
        metadata = backend.read_metadata("db")
        assert metadata.rotation is None and dict(metadata.tags) == {}
        assert metadata.description == "Database password ✓"
        with no_value_in_error(SecretNotFound):
            backend.update_metadata("absent", MetadataUpdate(description="x"))

    # -- listing ------------------------------------------------------------------------------

    def test_list_by_prefix(self, backend: Backend) -> None:
        names = ["db", "apix", "api/b", "api/a"] if self.has(backend, "folders") else [
            "db", "apix", "api-b", "api-a"]
        for name in names:
            backend.write_version(name, token())
        everything = sorted(names)
        assert backend.list_names() == everything
        assert [m.name for m in backend.list()] == everything
        under = [n for n in everything if n.startswith("api")]
        assert backend.list_names("api") == under
        assert [m.name for m in backend.list("api")] == under
        assert backend.list_names("nothing") == [] and backend.list("nothing") == []
        assert backend.list("db")[0].labels == {Label.CURRENT: 1}
        if self.has(backend, "folders"):
            assert backend.list_names("api/") == ["api/a", "api/b"]
            assert [m.name for m in backend.list("api/")] == ["api/a", "api/b"]

    def test_folders(self, backend: Backend) -> None:
        value = token()
        if not self.has(backend, "folders"):
            with no_value_in_error(InvalidName, value):
                backend.write_version("api/stripe", value)
            assert backend.list_names() == []
            return
        backend.write_version("api/stripe/live", value)
        assert backend.read_value("api/stripe/live", 1) == value
        with no_value_in_error(InvalidName, value):
            backend.write_version("api/stripe", token())  # a folder of an existing secret
        with no_value_in_error(InvalidName, value):
            backend.write_version("api/stripe/live/x", token())  # inside an existing secret
        backend.write_version("api/stripe2", token())
        backend.write_version("apiX", token())
        assert backend.list_names() == ["api/stripe/live", "api/stripe2", "apiX"]

    def test_absent_secrets(self, backend: Backend) -> None:
        backend.write_version("present", token())
        with no_value_in_error(SecretNotFound):
            backend.read_metadata("absent")
        with no_value_in_error(NotFound):
            backend.read_value("absent", 1)
        for method, capability in ((backend.delete, "soft_delete"),
                                   (backend.undelete, "soft_delete"),
                                   (backend.destroy, "destroy")):
            # without the capability, the refusal may come before the look-up
            expected = SecretNotFound if self.has(backend, capability) else SecretfsError
            with no_value_in_error(expected):
                method("absent")
        assert backend.rotation_state("absent") is None
        assert backend.list_names() == ["present"]

    # -- deleting -----------------------------------------------------------------------------

    def test_delete_hides_and_undelete_restores(self, backend: Backend) -> None:
        value, other = token(), token()
        version = backend.write_version("db", value)
        backend.write_version("other", other)
        if not self.has(backend, "soft_delete"):
            for method in (backend.delete, backend.undelete):
                with no_value_in_error(SecretfsError, value):
                    method("db")
            assert backend.read_value("db", version) == value
            assert backend.list_names() == ["db", "other"]
            return
        backend.delete("db")
        with no_value_in_error(SecretNotFound, value):
            backend.read_metadata("db")
        with no_value_in_error(NotFound, value):
            backend.read_value("db", version)
        assert backend.list_names() == ["other"]
        assert [m.name for m in backend.list()] == ["other"]
        with no_value_in_error(ConflictError, value):
            backend.write_version("db", token())
        backend.undelete("db")
        assert backend.read_value("db", version) == value
        assert backend.list_names() == ["db", "other"]

    def test_delete_one_version(self, backend: Backend) -> None:
        if not (self.has(backend, "soft_delete") and self.has(backend, "versions")):
            pytest.skip("needs soft_delete and versions")
        first_value = token()
        first = backend.write_version("db", first_value)
        second = backend.write_version("db", token())
        backend.delete("db", first)
        with no_value_in_error(VersionNotFound, first_value):
            backend.read_value("db", first)
        assert backend.read_metadata("db").version_info(first).deleted
        assert backend.read_value("db", second) is not None
        backend.undelete("db", first)
        assert backend.read_value("db", first) == first_value
        assert backend.read_metadata("db").version_info(first).readable

    def test_destroy_one_version(self, backend: Backend) -> None:
        value = token()
        first = backend.write_version("db", value)
        if not self.has(backend, "destroy"):
            with no_value_in_error(SecretfsError, value):
                backend.destroy("db", first)
            assert backend.read_value("db", first) == value
            return
        later = token()
        second = backend.write_version("db", later)
        backend.destroy("db", second)
        with no_value_in_error(VersionNotFound, value, later):
            backend.read_value("db", second)
        info = backend.read_metadata("db").version_info(second)
        assert info is None or info.destroyed
        if self.has(backend, "versions"):
            assert backend.read_value("db", first) == value

    def test_destroy_the_whole_secret(self, backend: Backend) -> None:
        if not self.has(backend, "destroy"):
            pytest.skip("no destroy (test_destroy_one_version checks the refusal)")
        value = token()
        version = backend.write_version("db", value)
        backend.write_version("other", token())
        backend.destroy("db")
        with no_value_in_error(SecretNotFound, value):
            backend.read_metadata("db")
        with no_value_in_error(NotFound, value):
            backend.read_value("db", version)
        assert backend.list_names() == ["other"]
        fresh = token()  # the name is free again
        assert backend.read_value("db", backend.write_version("db", fresh)) == fresh

    # -- rotation state -----------------------------------------------------------------------

    def test_rotation_state(self, backend: Backend) -> None:
        backend.write_version("db", token())
        assert backend.rotation_state("db") is None
        state = RotationState(2, RotationStep.CREATED, "host-a:123", 1_700_000_000.5,
                              1_700_000_001.25)
        if not self.has(backend, "rotation_state"):
            with no_value_in_error(SecretfsError):
                backend.set_rotation_state("db", state)
            assert backend.rotation_state("db") is None
            return
        backend.set_rotation_state("db", state)
        assert backend.rotation_state("db") == state
        moved = RotationState(2, RotationStep.APPLYING, "host-a:123", state.started,
                              1_700_000_060.0)
        backend.set_rotation_state("db", moved)
        assert backend.rotation_state("db") == moved
        backend.set_rotation_state("db", None)
        assert backend.rotation_state("db") is None

    # -- change feed --------------------------------------------------------------------------

    def test_changes_since(self, backend: Backend) -> None:
        cursor, names = backend.changes_since(None)
        assert names is None  # the first call: reload everything
        backend.write_version("a", token())
        backend.write_version("b", token())
        if not self.has(backend, "change_feed"):
            cursor, names = backend.changes_since(cursor)
            assert names == set()  # "nothing": the daemon polls metadata instead
            assert backend.changes_since(cursor)[1] == set()
            return
        cursor, names = backend.changes_since(cursor)
        assert names is not None and names >= {"a", "b"}
        if self.has(backend, "metadata"):
            backend.update_metadata("a", MetadataUpdate(description="changed"))
            cursor, names = backend.changes_since(cursor)
            assert names is not None and "a" in names
        if self.has(backend, "destroy"):
            backend.destroy("b")
            cursor, names = backend.changes_since(cursor)
            assert names is not None and "b" in names
        assert backend.changes_since(cursor) == (cursor, set())
