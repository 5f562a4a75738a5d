"""What a user names on the command line, opened for reading.

An input is an index (.caibx blob or .caidx tree; a path or an http(s) URL)
read through a chunk engine, or a local .catar file; either way it becomes
a byte source plus the knowledge of whether it holds a tree.
"""

import logging
import os
import posixpath
import struct
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from . import catar
from .archive import Archive
from .diskcache import DiskCache, default_dir
from .engine import DEFAULT_MEMORY_BYTES, ChunkEngine
from .errors import CafuseError, FormatError
from .http import Client, check_url, shown
from .index import Index
from .seed import Seed
from .store import HTTPOptions, fetch_with_retries, is_url, open_store, other_url
from .stream import FileSource, IndexStream

log = logging.getLogger("cafuse")

DEFAULT_STORE = "default.castr"
DEFAULT_CACHE_BYTES = 2 << 30
# Feature bits that only a directory tree has: an index without any of them
# covers a blob (casync writes 0xb000000000000000 for .caibx, §6.4).
_TREE_BITS = 0x1FFFFFFFF


@dataclass
class Options:
    """Where chunks come from and how they are kept (the CLI's options)."""
    stores: list[str] = field(default_factory=list)
    http: HTTPOptions = HTTPOptions()
    cache_dir: str | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    no_cache: bool = False
    seeds: list[str] = field(default_factory=list)
    memory_bytes: int = DEFAULT_MEMORY_BYTES
    deadline: float = 60.0
    fill_cache: bool = False  # prefetch: a disk cache that cannot be written is an error


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

    async def aclose(self) -> None:
        await self.source.aclose()


def read_index_file(path: str) -> Index:
    """Load and validate a local index file; errors name the file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CafuseError(f"{path}: {e.strerror}") from None
    return _parse(path, data)


async def read_index(spec: str, http: HTTPOptions) -> Index:
    """An index from a path or an http(s) URL."""
    if other_url(spec):
        raise CafuseError(f"{shown(spec)}: unsupported URL (http, https or a local path)")
    if not is_url(spec):
        return read_index_file(spec)
    base, name = _split_url(spec)
    client = Client(base, 1, http.headers, http.tls)
    try:
        data, _ = await fetch_with_retries(client, name, http, missing_ok=False)
    finally:
        await client.aclose()
    return _parse(shown(spec), data)


def _split_url(url: str) -> tuple[str, str]:
    """(the URL of the directory, the name with its query) of a file's URL;
    a query may hold slashes of its own."""
    check_url(shown(url))
    parts = urlsplit(url)
    directory, _slash, name = parts.path.rpartition("/")
    query = "?" + parts.query if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{directory}", name + query


def _parse(name, data):
    try:
        return Index.parse(data)
    except FormatError as e:
        raise e.named(name) from None


def index_kind(path: str, index: Index) -> str:
    """"blob" or "tree": by the suffix, else by the feature flags."""
    suffix = _suffix(path)
    if suffix == ".caibx":
        return "blob"
    if suffix == ".caidx":
        return "tree"
    return "tree" if index.feature_flags & _TREE_BITS else "blob"


def _suffix(path: str) -> str:
    return posixpath.splitext(urlsplit(path).path if is_url(path) else path)[1]


def kind_doubt(path: str, index: Index) -> str | None:
    """Why the kind ``index_kind`` gives may be wrong, if it may: the name
    says one kind and the feature flags another.  (Flags with no archive
    bit do not prove a blob: casync make --without=all writes those too.)"""
    kind, tree_flags = index_kind(path, index), bool(index.feature_flags & _TREE_BITS)
    if kind == "blob" and tree_flags:
        return "its name says blob, but its feature flags are an archive's (a renamed .caidx?)"
    if kind == "tree" and not tree_flags and _suffix(path) == ".caidx":
        return ("its feature flags name no archive feature, as a blob's "
                "(a renamed .caibx, or an archive made --without=all)")
    return None


def is_catar(path: str) -> bool:
    """A local .catar file, by suffix or (for other names) by its first record."""
    if is_url(path) or path.endswith((".caibx", ".caidx")):
        return False
    if path.endswith(".catar"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return len(head) == 16 and struct.unpack("<2Q", head) == (catar.ENTRY_SIZE, catar.ENTRY)


def default_store(index_spec: str) -> str:
    """``$CASYNC_STORE``, else ``default.castr`` next to the index, as casync."""
    if os.environ.get("CASYNC_STORE"):
        return os.environ["CASYNC_STORE"]
    if is_url(index_spec):
        # A ';' in its directory is no parameter (a store URL is cut there).
        return _split_url(index_spec)[0].replace(";", "%3B") + "/" + DEFAULT_STORE
    return os.path.join(os.path.dirname(index_spec) or ".", DEFAULT_STORE)


def parse_seed(spec: str) -> Seed:
    """``INDEX[:FILE]``; FILE defaults to INDEX without its suffix."""
    if is_url(spec):
        raise CafuseError(f"--seed {shown(spec)}: a seed is a local index and the file it "
                          f"describes, not a URL")
    index, sep, file = spec.partition(":")
    return Seed(read_index_file(index), file if sep else os.path.splitext(index)[0])


def make_engine(index_spec: str, index: Index, options: Options) -> ChunkEngine:
    stores = [open_store(s, options.http, index.chunk_size_max)
              for s in options.stores or [default_store(index_spec)]]
    disk = None
    if not options.no_cache:
        disk = _disk_cache(options)
    return ChunkEngine(stores, index.digest, disk=disk,
                       seeds=[parse_seed(s) for s in options.seeds],
                       memory_bytes=options.memory_bytes, deadline=options.deadline)


def _disk_cache(options: Options) -> DiskCache | None:
    try:
        disk = DiskCache(options.cache_dir or default_dir(), options.cache_bytes)
    except CafuseError as e:
        if options.fill_cache:
            raise
        log.warning("%s; going on without the disk cache", e)
        return None
    if disk.read_only and options.fill_cache:  # otherwise its first put warns
        disk.close()
        raise CafuseError(f"cache directory {disk.path}: {disk.read_only}: "
                          f"it can only be read")
    return disk


async def open_input(path: str, options: Options | None = None) -> Input:
    """Open an index with its engine, or a local .catar."""
    options = options or Options()
    if is_catar(path):
        try:
            return Input(path, "catar", None, FileSource(path))
        except OSError as e:
            raise CafuseError(f"{path}: {e.strerror}") from None
    index = await read_index(path, options.http)
    engine = make_engine(path, index, options)
    return Input(shown(path), index_kind(path, index), index, IndexStream(index, engine))
