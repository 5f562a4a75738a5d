"""A persistent cache of verified, decompressed chunks, shared by processes.

Why not a file per chunk: creating a file costs 150-600 µs of kernel time
on this kind of machine, more than fetching and decoding the chunk.  So
chunks are appended to pack files and found through an SQLite index:

    <dir>/index.sqlite          chunk(id, pack, offset, size); pack(id, bytes, used)
    <dir>/packs/<pack id>.pack  records of BLAKE3(chunk id + data) (32 bytes) + data

Each process appends only to packs it created, so appends never interleave.
A record becomes visible to other processes once its row is committed
(rows are committed in batches, after the bytes are written): a crash
leaves at worst unreferenced bytes at the end of a pack.
Every read recomputes the BLAKE3 (several GB/s) and drops a row whose bytes
do not match, so a torn or rotten record is fetched again, never served.

The cache is bounded in bytes.  Eviction is least-recently-used by pack: a
hit refreshes its pack's ``used`` time (at most once a minute), and pruning
deletes the least recently used packs until the cache fits (to 90% of its
budget when a write overflows it, so that pruning is rare).  A pack is at
most a sixteenth of the budget, so eviction stays fine-grained.  SQLite's
locking makes several readers, writers and pruners safe at once; a pack
that is deleted while another process reads it stays readable to that
process until it closes it.
"""

import errno
import os
import sqlite3
import threading
import time
from dataclasses import dataclass

import blake3

from .errors import CafuseError

CHECK_SIZE = 32
_PACK_LIMIT = 64 << 20
_TOUCH_AFTER = 60  # seconds
_BATCH = 256      # rows per commit
_FLUSH_AFTER = 0.25  # seconds
_SCHEMA = """
CREATE TABLE IF NOT EXISTS pack (id INTEGER PRIMARY KEY, bytes INTEGER NOT NULL,
                                 used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunk (id BLOB PRIMARY KEY, pack INTEGER NOT NULL,
                                  offset INTEGER NOT NULL, size INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS chunk_pack ON chunk (pack);
"""


def default_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/cafuse"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "cafuse")


class DiskFull(CafuseError):
    """The cache's file system has no room (or quota) left."""


@dataclass
class Usage:
    entries: int
    bytes: int
    packs: int
    oldest: float | None
    newest: float | None
    on_disk: int        # what the pack files hold, rows or not


class DiskCache:
    """Blocking calls, safe from several threads; the engine runs them in
    worker threads."""

    def __init__(self, path: str, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes
        self.packs = os.path.join(path, "packs")
        self._pack_limit = max(1, min(_PACK_LIMIT, max_bytes // 16))
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}      # pack id -> read fd
        self._writing: tuple[int, int, int] | None = None  # pack id, fd, size
        self._committed = 0
        self._touched: dict[int, float] = {}
        self._pending: dict[bytes, tuple[int, int, int]] = {}
        self._flushed = time.monotonic()
        self._closed = False
        try:
            os.makedirs(self.packs, exist_ok=True)
        except OSError as e:
            raise CafuseError(f"cache directory {path}: {self.packs}: {e.strerror} "
                              f"(not a cafuse cache?)") from None
        index = os.path.join(path, "index.sqlite")
        try:
            self._db = sqlite3.connect(index, timeout=30, check_same_thread=False,
                                       isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_NOTADB,
                                                        sqlite3.SQLITE_CORRUPT):
                raise CafuseError(f"cache directory {path}: {index}: {e}; it is only a "
                                  f"cache: remove the directory to start a new one") from None
            raise CafuseError(f"cache directory {path}: {_reason(e)}") from None
        except OSError as e:
            raise CafuseError(f"cache directory {path}: {_reason(e)}") from None

    def get(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            if self._closed:
                return None
            row = self._pending.get(chunk_id) or self._query(
                "SELECT pack, offset, size FROM chunk WHERE id = ?", (chunk_id,)).fetchone()
            if row is None:
                return None
            pack, offset, size = row
            fd = self._reader(pack)
            # Read under the lock: a prune in another thread closes the
            # fds of the packs it deletes, and the number may be reused.
            try:
                blob = os.pread(fd, CHECK_SIZE + size, offset) if fd is not None else b""
            except OSError as e:
                raise CafuseError(f"cache directory {self.path}: {e.strerror}") from None
        data = blob[CHECK_SIZE:]
        if len(data) != size or _check(chunk_id, data) != blob[:CHECK_SIZE]:
            with self._lock:
                self._query("DELETE FROM chunk WHERE id = ? AND pack = ?", (chunk_id, pack))
                self._forget(pack)  # the fd may be of a deleted pack whose id came back
            return None
        self._touch(pack)
        return data

    def present(self, chunk_ids: list[bytes]) -> set[bytes]:
        """Which of ``chunk_ids`` the cache lists: one query for a batch, so
        a cold cache costs one lookup per batch, not one per chunk."""
        found = {cid for cid in chunk_ids if cid in self._pending}
        with self._lock:
            if self._closed:
                return set()
            for k in range(0, len(chunk_ids), 500):  # SQLite's variable limit
                part = chunk_ids[k:k + 500]
                marks = ",".join("?" * len(part))
                found.update(row[0] for row in self._query(
                    f"SELECT id FROM chunk WHERE id IN ({marks})", part))
        return found

    def put(self, chunk_id: bytes, data: bytes) -> None:
        """Store a verified chunk; raises DiskFull when there is no room.

        Rows are committed in batches (a commit per chunk would cost more
        than the write); until then this process finds them in ``_pending``.
        After the close, a put (from a writer left to go on) is dropped.
        """
        record = _check(chunk_id, data) + data
        with self._lock:
            if self._closed:
                return
            pack, fd, offset = self._writer()
            try:
                written = os.pwrite(fd, record, offset)
            except OSError as e:
                _truncate(fd, offset)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(f"cache directory {self.path}: {e.strerror}") from None
                raise CafuseError(f"cache directory {self.path}: {e.strerror}") from None
            if written != len(record):  # the file system ran out of room midway
                _truncate(fd, offset)
                raise DiskFull(f"cache directory {self.path}: short write "
                               f"({written} of {len(record)} bytes)")
            self._writing = (pack, fd, offset + len(record))
            self._pending[chunk_id] = (pack, offset, len(data))
            if len(self._pending) >= _BATCH or self.flush_due():
                self._flush()

    def flush_due(self) -> bool:
        """Rows wait at most _FLUSH_AFTER seconds for their commit."""
        return bool(self._pending) and time.monotonic() - self._flushed > _FLUSH_AFTER

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._flush()

    def _flush(self):
        """Commit the pending rows, and prune if the cache outgrew its budget."""
        if not self._pending:
            return
        pack, _fd, end = self._writing
        rows = [(cid, *where) for cid, where in self._pending.items()]
        self._pending.clear()
        self._flushed = time.monotonic()
        self._query("BEGIN IMMEDIATE")
        try:
            alive = self._query("UPDATE pack SET bytes = ?, used = ? WHERE id = ?",
                                (end, time.time(), pack)).rowcount
            rows = [row for row in rows if alive or row[1] != pack]
            try:
                self._db.executemany("INSERT OR IGNORE INTO chunk VALUES (?, ?, ?, ?)", rows)
            except sqlite3.Error as e:
                raise self._index_error(e) from None
            total = self._query("SELECT COALESCE(SUM(bytes), 0) FROM pack").fetchone()[0]
            self._query("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._query("ROLLBACK")
            # The rows are lost (a full disk, say): so is the room their
            # records take, unless the pack goes back to what was committed.
            _truncate(self._writing[1], self._committed)
            self._writing = (pack, self._writing[1], self._committed)
            raise
        self._committed = end
        if not alive:  # another process pruned our pack: start a new one
            self._forget(pack)
        elif total > self.max_bytes:
            self._prune(self.max_bytes * 9 // 10)

    def usage(self) -> Usage:
        with self._lock:
            self._flush()
            entries = self._query("SELECT COUNT(*) FROM chunk").fetchone()[0]
            packs, total, oldest, newest = self._query(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(used), MAX(used) "
                "FROM pack").fetchone()
            on_disk = sum(self._file_size(pack) for pack in self._pack_files())
        return Usage(entries, total, packs, oldest, newest, on_disk)

    def prune(self, max_bytes: int) -> int:
        """Delete least recently used packs until the cache holds at most
        ``max_bytes``, counting what their files take on disk (records
        whose rows were never committed, after a crash, included), and
        pack files that no row lists; returns bytes freed."""
        with self._lock:
            self._flush()
            self._query("BEGIN IMMEDIATE")  # no new pack row meanwhile
            try:
                freed = self._remove_unlisted()
            finally:
                self._query("COMMIT")
            return freed + self._prune(max_bytes, on_disk=True)

    def close(self) -> None:
        """Commit the pending rows and release files and index, even when
        the commit fails (then those rows are lost, and raised about).  Later
        calls find nothing and keep nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._flush()
            finally:
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()
                if self._writing is not None:
                    os.close(self._writing[1])
                    self._writing = None
                self._db.close()

    def _remove_unlisted(self) -> int:
        """Delete pack files without a row (a prune that died between its
        commit and its unlinks), in a write transaction: a new pack's row
        is committed before its file is made, and ids are reused."""
        listed = {row[0] for row in self._query("SELECT id FROM pack")}
        freed = 0
        for pack in self._pack_files() - listed:
            freed += self._file_size(pack)
            try:
                os.unlink(self._pack_file(pack))
            except FileNotFoundError:
                pass
        return freed

    def _pack_files(self) -> set[int]:
        """The ids of the pack files in the directory."""
        files = set()
        for name in os.listdir(self.packs):
            stem, dot, suffix = name.partition(".")
            if stem.isdigit() and dot and suffix == "pack":
                files.add(int(stem))
        return files

    def _prune(self, max_bytes, on_disk=False):
        self._query("BEGIN IMMEDIATE")
        try:
            packs = self._query("SELECT id, bytes FROM pack ORDER BY used").fetchall()
            if on_disk:
                packs = [(pack, max(size, self._file_size(pack))) for pack, size in packs]
            total = sum(size for _id, size in packs)
            freed, doomed = 0, []
            for pack, size in packs:
                if total - freed <= max_bytes:
                    break
                doomed.append(pack)
                freed += size
            for pack in doomed:
                self._query("DELETE FROM chunk WHERE pack = ?", (pack,))
                self._query("DELETE FROM pack WHERE id = ?", (pack,))
            self._query("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._query("ROLLBACK")
            raise
        for pack in doomed:
            self._forget(pack)
            try:
                os.unlink(self._pack_file(pack))
            except FileNotFoundError:
                pass
        return freed

    def _writer(self):
        """This process's pack to append to: (pack id, fd, end offset)."""
        if self._writing is not None and self._writing[2] < self._pack_limit:
            return self._writing
        if self._writing is not None:  # full: record its rows, then seal it
            self._flush()
        if self._writing is not None:
            os.close(self._writing[1])
            self._writing = None  # a failure below must not leave the closed fd here
        pack = self._query("INSERT INTO pack (bytes, used) VALUES (0, ?)",
                           (time.time(),)).lastrowid
        try:
            try:
                fd = os.open(self._pack_file(pack), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644)
            except FileExistsError:  # left by a prune that died before its unlink
                os.unlink(self._pack_file(pack))
                fd = os.open(self._pack_file(pack), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644)
        except OSError as e:
            self._query("DELETE FROM pack WHERE id = ?", (pack,))
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"cache directory {self.path}: {e.strerror}") from None
            raise CafuseError(f"cache directory {self.path}: {e.strerror}") from None
        self._writing = (pack, fd, 0)
        self._committed = 0    # its end, as far as rows are committed
        return self._writing

    def _reader(self, pack):
        fd = self._fds.get(pack)
        if fd is None:
            try:
                fd = self._fds[pack] = os.open(self._pack_file(pack), os.O_RDONLY)
            except FileNotFoundError:
                return None
        return fd

    def _forget(self, pack):
        fd = self._fds.pop(pack, None)
        if fd is not None:
            os.close(fd)
        if self._writing is not None and self._writing[0] == pack:
            os.close(self._writing[1])
            self._writing = None
            # Its uncommitted rows point into a file that is gone.
            self._pending = {cid: where for cid, where in self._pending.items()
                             if where[0] != pack}

    def _touch(self, pack):
        now = time.time()
        if now - self._touched.get(pack, 0) > _TOUCH_AFTER:
            self._touched[pack] = now
            with self._lock:
                if not self._closed:
                    self._query("UPDATE pack SET used = ? WHERE id = ?", (now, pack))

    def _pack_file(self, pack):
        return os.path.join(self.packs, f"{pack}.pack")

    def _file_size(self, pack):
        try:
            return os.stat(self._pack_file(pack)).st_size
        except FileNotFoundError:
            return 0

    def _query(self, sql, args=()):
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as e:
            raise self._index_error(e) from None

    def _index_error(self, error: sqlite3.Error) -> CafuseError:
        if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return DiskFull(f"cache directory {self.path}: {error}")
        return CafuseError(f"cache index {self.path}: {error}")


def _check(chunk_id: bytes, data: bytes) -> bytes:
    """A record's check: BLAKE3 of the chunk id and the data, so that bytes
    read through a stale descriptor, or at the offset of another chunk, can
    never pass for this chunk."""
    h = blake3.blake3(chunk_id)
    h.update(data)
    return h.digest()


def _reason(error):
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _truncate(fd, size):
    """Give back the room past ``size`` (best effort: it is only room)."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass
