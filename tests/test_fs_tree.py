"""The tree's pure logic: folders from names, versions and labels as folders, stable inodes."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from secretfs.fs.tree import ROOT_INODE, Kind, NameIndex, Tree, resolve_word, version_words
from secretfs.model import Label, SecretMetadata, VersionInfo

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def metadata(name: str = "db") -> SecretMetadata:
    return SecretMetadata(
        name=name,
        labels={Label.CURRENT: 3, Label.PREVIOUS: 2},
        versions=(
            VersionInfo(1, NOW, ("value",), False, deleted=True),
            VersionInfo(2, NOW, ("value",), False, sizes=(5,)),
            VersionInfo(3, NOW, ("user", "password"), True, sizes=(3, 12)),
        ),
    )


def test_folders_come_from_names() -> None:
    index = NameIndex(["db", "api_keys/stripe", "api_keys/github", "a/b/c"])
    assert index.children("") == ["a", "api_keys", "db"]
    assert index.children("api_keys") == ["github", "stripe"]
    assert index.kind_of("api_keys") is Kind.FOLDER
    assert index.kind_of("api_keys/stripe") is Kind.SECRET
    assert index.kind_of("a/b") is Kind.FOLDER
    assert index.kind_of("nope") is None
    assert len(index) == 4
    index.remove("a/b/c")
    assert index.children("") == ["api_keys", "db"] and index.kind_of("a") is None
    assert list(index.secrets_under("api_keys")) == ["api_keys/github", "api_keys/stripe"]


@given(st.sets(st.lists(st.sampled_from("abcd"), min_size=1, max_size=3).map("/".join),
               max_size=20))
def test_the_index_lists_every_name_exactly_once(names: set[str]) -> None:
    # Names that are folders of other names cannot coexist (the store refuses them).
    names = {n for n in names if not any(o.startswith(n + "/") for o in names)}
    index = NameIndex(sorted(names))
    assert index.names() == sorted(names, key=lambda n: n.split("/"))
    assert len(index) == len(names)
    for name in names:
        index.remove(name)
    assert index.children("") == [] and len(index) == 0


def test_labels_and_readable_versions_are_the_folders_of_a_secret() -> None:
    meta = metadata()
    assert version_words(meta) == ["latest", "current", "previous", "2", "3"]
    assert resolve_word(meta, "latest").version == 3
    assert resolve_word(meta, "previous").version == 2
    assert resolve_word(meta, "pending") is None
    assert resolve_word(meta, "1") is None  # deleted
    assert resolve_word(meta, "7") is None
    assert resolve_word(meta, "value") is None
    assert resolve_word(meta, "02") is None


def test_label_files_share_the_inode_of_their_version() -> None:
    tree = Tree(NameIndex(["db"]))
    root = tree.node(ROOT_INODE)
    secret = tree.child(root, "db", None)
    assert secret.kind is Kind.SECRET
    latest = tree.child(secret, "latest", metadata())
    three = tree.child(secret, "3", metadata())
    assert latest.inode != three.inode
    via_label = tree.child(latest, "password", metadata())
    direct = tree.child(three, "password", metadata())
    assert via_label is direct and (direct.version, direct.key) == (3, "password")
    assert tree.child(latest, "value", metadata()) is None  # version 3 is a map
    assert tree.child(secret, "pending", metadata()) is None
    # Same identity, same inode, however often it is looked up.
    assert tree.child(root, "db", None).inode == secret.inode


def test_listings() -> None:
    tree = Tree(NameIndex(["db", "api/x"]))
    root = tree.node(ROOT_INODE)
    assert tree.listing(root, None) == ["api", "db"]
    secret = tree.child(root, "db", None)
    assert tree.listing(secret, metadata()) == ["latest", "current", "previous", "2", "3"]
    previous = tree.child(secret, "previous", metadata())
    assert tree.listing(previous, metadata()) == ["value"]
    status = tree.child(root, ".secretfs", None)
    assert tree.listing(status, None) == ["health", "stats"]


def test_entries_handed_out_are_remembered_for_invalidation() -> None:
    tree = Tree(NameIndex(["db"]))
    secret = tree.child(tree.node(ROOT_INODE), "db", None)
    tree.handed_out("db", ROOT_INODE, "db")
    tree.handed_out("db", secret.inode, "latest")
    tree.child(secret, "latest", metadata())
    assert tree.entries_of("db") == {(ROOT_INODE, "db"), (secret.inode, "latest")}
    assert tree.entries_of("db") == set()  # handed back once
    assert secret.inode in tree.inodes_of("db")
