"""The shape of the mounted tree, without FUSE: inodes for paths, folders for names.

```
<mount>/api_keys/stripe/latest/secret
        └ folder └ secret └ version └ file (one key of that version)
<mount>/.secretfs/health, stats          operator files
```

Inode numbers are handed out on first sight and never reused while mounted, so the kernel's
caches stay coherent. A file's inode belongs to one *numbered* version (``db/3/value``); a label
folder (``db/latest``) lists the files of the version it points at, so ``db/latest/value`` and
``db/3/value`` are the same inode — like a hard link. Versions never change, so a file's bytes
never change under its inode: after a rotation only the *name* ``latest/value`` moves to another
inode, and a reader that opened the old one keeps reading the old bytes to the end.

Everything here is pure: metadata comes in as arguments; operations.py asks the manager for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum

from secretfs.errors import InvalidReference
from secretfs.model import Label, SecretMetadata, SecretRef, VersionInfo, parse_version

ROOT_INODE = 1  # pyfuse3.ROOT_INODE, without importing pyfuse3 here
STATUS_FOLDER = ".secretfs"
STATUS_FILES = ("health", "stats")
LABEL_FOLDERS = ("latest", "current", "previous", "pending")


class Kind(Enum):
    ROOT = "root"
    FOLDER = "folder"  # a prefix of secret names: api_keys/
    SECRET = "secret"  # a secret: its children are versions and labels
    VERSION = "version"  # db/3 or db/latest: its children are the version's keys
    FILE = "file"  # one key of one numbered version
    STATUS_FOLDER = "status-folder"
    STATUS_FILE = "status-file"

    @property
    def is_folder(self) -> bool:
        return self not in (Kind.FILE, Kind.STATUS_FILE)


@dataclass(slots=True, eq=False)
class Node:
    """One inode. ``name`` is the secret (or folder path, or status file); for a VERSION the
    path word (``latest``, ``3``) is in ``word``; a FILE has its version number and key."""

    inode: int
    kind: Kind
    name: str = ""
    word: str = ""
    version: int = 0
    key: str = ""
    ref: SecretRef | None = None  # a FILE's reference, parsed once rather than per open

    @property
    def identity(self) -> tuple[Kind, str, str, int, str]:
        return (self.kind, self.name, self.word, self.version, self.key)


def join(folder: str, segment: str) -> str:
    return f"{folder}/{segment}" if folder else segment


class NameIndex:
    """Which folders exist and what is in each, from the list of secret names."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self._children: dict[str, dict[str, bool]] = {"": {}}  # folder → {segment: is_secret}
        self._sorted: dict[str, list[str]] = {}
        self._count = 0
        for name in names:
            self.add(name)

    def __len__(self) -> int:
        return self._count

    def add(self, name: str) -> None:
        folder = ""
        segments = name.split("/")
        for segment in segments[:-1]:
            self._children[folder].setdefault(segment, False)
            self._sorted.pop(folder, None)
            folder = join(folder, segment)
            self._children.setdefault(folder, {})
        if not self._children[folder].get(segments[-1]):
            self._count += 1
        self._children[folder][segments[-1]] = True
        self._sorted.pop(folder, None)

    def remove(self, name: str) -> None:
        """Forget *name*, and every folder it leaves empty."""
        folder, _, segment = name.rpartition("/")
        entries = self._children.get(folder)
        if entries is None or not entries.get(segment):
            return
        del entries[segment]
        self._count -= 1
        self._sorted.pop(folder, None)
        while folder and not self._children[folder]:
            del self._children[folder]
            parent, _, segment = folder.rpartition("/")
            del self._children[parent][segment]
            self._sorted.pop(parent, None)
            folder = parent

    def kind_of(self, path: str) -> Kind | None:
        folder, _, segment = path.rpartition("/")
        is_secret = self._children.get(folder, {}).get(segment)
        if is_secret is None:
            return None
        return Kind.SECRET if is_secret else Kind.FOLDER

    def children(self, folder: str) -> list[str]:
        """The entries of *folder*, sorted (cached until the folder changes)."""
        listing = self._sorted.get(folder)
        if listing is None:
            listing = self._sorted[folder] = sorted(self._children.get(folder, {}))
        return listing

    def secrets_under(self, folder: str) -> Iterator[str]:
        """Every secret name below *folder*, depth first."""
        for segment in self.children(folder):
            path = join(folder, segment)
            if self._children[folder][segment]:
                yield path
            else:
                yield from self.secrets_under(path)

    def names(self) -> list[str]:
        return list(self.secrets_under(""))


def version_words(metadata: SecretMetadata) -> list[str]:
    """The folders of a secret: its labels (``latest`` too), then its readable versions."""
    words = [word for word in LABEL_FOLDERS if Label.parse(word) in metadata.labels]
    numbers = [str(info.version) for info in metadata.versions if info.readable]
    return words + numbers


def resolve_word(metadata: SecretMetadata, word: str) -> VersionInfo | None:
    """The readable version a folder word names in *metadata*, or None."""
    try:
        spec = parse_version(word)  # canonical words only: "01" is not version 1
    except InvalidReference:
        return None
    number = metadata.labels.get(spec) if isinstance(spec, Label) else spec
    info = metadata.version_info(number) if number else None
    return info if info is not None and info.readable else None


@dataclass
class Tree:
    """Inode numbers for the nodes of the tree, and the names handed to the kernel for each
    secret (so they can be invalidated when the secret changes)."""

    index: NameIndex = field(default_factory=NameIndex)
    _nodes: dict[int, Node] = field(default_factory=dict)
    _inodes: dict[tuple[Kind, str, str, int, str], int] = field(default_factory=dict)
    _entries: dict[str, set[tuple[int, str]]] = field(default_factory=dict)
    _inodes_by_secret: dict[str, set[int]] = field(default_factory=dict)
    _next_inode: int = ROOT_INODE + 1

    def __post_init__(self) -> None:
        self._nodes[ROOT_INODE] = Node(ROOT_INODE, Kind.ROOT)

    def __len__(self) -> int:
        return len(self._nodes)

    def node(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    def intern(self, kind: Kind, name: str = "", word: str = "", version: int = 0,
               key: str = "") -> Node:
        """The node with this identity, made (with a new inode) on first sight."""
        identity = (kind, name, word, version, key)
        inode = self._inodes.get(identity)
        if inode is None:
            inode = self._inodes[identity] = self._next_inode
            self._next_inode += 1
            ref = SecretRef(name, version, key) if kind is Kind.FILE else None
            self._nodes[inode] = Node(inode, kind, name, word, version, key, ref)
            if kind in (Kind.SECRET, Kind.VERSION, Kind.FILE):
                self._inodes_by_secret.setdefault(name, set()).add(inode)
        return self._nodes[inode]

    def handed_out(self, secret: str, parent: int, entry: str) -> None:
        """Remember that the kernel was told *parent*/*entry* (which belongs to *secret*)."""
        self._entries.setdefault(secret, set()).add((parent, entry))

    def entries_of(self, secret: str) -> set[tuple[int, str]]:
        """The (parent inode, name) pairs the kernel may have cached for *secret*; cleared."""
        return self._entries.pop(secret, set())

    def inodes_of(self, secret: str) -> list[int]:
        """Inodes of *secret*'s versions and files (for dropping the kernel's caches)."""
        return sorted(self._inodes_by_secret.get(secret, ()))

    def child(self, parent: Node, entry: str, metadata: SecretMetadata | None) -> Node | None:
        """The node *entry* names inside *parent*, or None (ENOENT).

        *metadata* is the secret's, needed when *parent* is a SECRET or VERSION node.
        """
        if parent.kind in (Kind.ROOT, Kind.FOLDER):
            if parent.kind is Kind.ROOT and entry == STATUS_FOLDER:
                return self.intern(Kind.STATUS_FOLDER)
            path = join(parent.name, entry)
            kind = self.index.kind_of(path)
            return self.intern(kind, path) if kind else None
        if parent.kind is Kind.STATUS_FOLDER:
            return self.intern(Kind.STATUS_FILE, entry) if entry in STATUS_FILES else None
        if metadata is None:
            return None
        if parent.kind is Kind.SECRET:
            if resolve_word(metadata, entry) is None:
                return None
            return self.intern(Kind.VERSION, parent.name, entry)
        if parent.kind is Kind.VERSION:
            info = resolve_word(metadata, parent.word)
            if info is None or entry not in info.keys:
                return None
            return self.intern(Kind.FILE, parent.name, version=info.version, key=entry)
        return None

    def listing(self, parent: Node, metadata: SecretMetadata | None) -> list[str]:
        """The entries of a folder node (unfiltered: the caller filters what may be listed)."""
        if parent.kind in (Kind.ROOT, Kind.FOLDER):
            return self.index.children(parent.name)
        if parent.kind is Kind.STATUS_FOLDER:
            return list(STATUS_FILES)
        if metadata is None:
            return []
        if parent.kind is Kind.SECRET:
            return version_words(metadata)
        if parent.kind is Kind.VERSION:
            info = resolve_word(metadata, parent.word)
            return list(info.keys) if info else []
        return []

