"""What a user names on the command line, opened for reading.

An input is an index (.caibx blob or .caidx tree) read through chunk
stores, or a local .catar file; either way it becomes a byte source plus
the knowledge of whether it holds a tree.
"""

import os
import struct
from dataclasses import dataclass

from . import catar
from .archive import Archive
from .errors import CafuseError, FormatError
from .index import Index
from .store import LocalStore
from .stream import FileSource, IndexStream

DEFAULT_STORE = "default.castr"
# Feature bits that only a directory tree has: an index without any of them
# covers a blob (casync writes 0xb000000000000000 for .caibx, §6.4).
_TREE_BITS = 0x1FFFFFFFF


@dataclass
class Input:
    path: str
    kind: str  # "blob", "tree" (an index over a catar) or "catar" (a file)
    index: Index | None
    source: IndexStream | FileSource

    @property
    def is_tree(self) -> bool:
        return self.kind != "blob"

    def archive(self) -> Archive:
        if not self.is_tree:
            raise CafuseError(f"{self.path}: a blob index (.caibx) holds no directory "
                              f"tree; use 'cafuse cat' to read the blob")
        return Archive(self.source)


def read_index(path: str) -> Index:
    """Load and validate an index file; errors name the file."""
    data = _read_file(path)
    try:
        return Index.parse(data)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None


def open_input(path: str, stores: list[str] | None = None) -> Input:
    """Open an index with its stores (``stores`` empty: ``$CASYNC_STORE`` or
    ``default.castr`` next to the index, as casync does), or a .catar."""
    if is_catar(path):
        try:
            return Input(path, "catar", None, FileSource(path))
        except OSError as e:
            raise CafuseError(f"{path}: {e.strerror}") from None
    index = read_index(path)
    kind = index_kind(path, index)
    if not stores:
        stores = [os.environ.get("CASYNC_STORE")
                  or os.path.join(os.path.dirname(path) or ".", DEFAULT_STORE)]
    return Input(path, kind, index, IndexStream(index, [LocalStore(s) for s in stores]))


def index_kind(path: str, index: Index) -> str:
    """"blob" or "tree": by the suffix, else by the feature flags."""
    if path.endswith(".caibx"):
        return "blob"
    if path.endswith(".caidx"):
        return "tree"
    return "tree" if index.feature_flags & _TREE_BITS else "blob"


def is_catar(path: str) -> bool:
    """A .catar file, by suffix or (for other names) by its first record."""
    if path.endswith(".catar"):
        return True
    if path.endswith((".caibx", ".caidx")):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return len(head) == 16 and struct.unpack("<2Q", head) == (catar.ENTRY_SIZE, catar.ENTRY)


def _read_file(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CafuseError(f"{path}: {e.strerror}") from None

