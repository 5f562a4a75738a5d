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

import contextlib
import errno
import os
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass

import blake3

from .errors import CafuseError

CHECK_SIZE = 32
_PACK_LIMIT = 64 << 20
_TOUCH_AFTER = 60  # seconds
_BATCH = 256      # rows per commit
_FLUSH_AFTER = 0.25  # seconds
_BUSY_MS = 30_000  # how long to wait for another process's write
_RELEASE_AFTER = 5.0  # seconds between looks for read descriptors of deleted packs
# Pack ids are never reused (AUTOINCREMENT): a process that still holds a
# pruned pack, to read or to append to, must not take a new pack of the same
# number for its own.  Version 0 indexes lack it and are moved over.
_VERSION = 1
_PACK_TABLE = """CREATE TABLE {name} (id INTEGER PRIMARY KEY AUTOINCREMENT,
    bytes INTEGER NOT NULL, used REAL NOT NULL)"""
_CHUNK_TABLE = """CREATE TABLE IF NOT EXISTS chunk (id BLOB PRIMARY KEY,
    pack INTEGER NOT NULL, offset INTEGER NOT NULL, size INTEGER NOT NULL)"""
_CHUNK_INDEX = "CREATE INDEX IF NOT EXISTS chunk_pack ON chunk (pack)"


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

    def __init__(self, path: str, max_bytes: int, create: bool = True):
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
        self._flushed = self._released = time.monotonic()
        self._closed = False
        self._index = os.path.join(path, "index.sqlite")
        # Why the index can only be read (a full disk or a read-only
        # directory, where SQLite cannot make the files WAL needs), or None.
        self.read_only: str | None = None
        # Opened immutable: pages another process rewrites meanwhile may
        # read as damaged, which is then a miss, not an error.
        self._immutable = False
        try:
            self._db = self._open(create)
        except sqlite3.Error as e:
            if getattr(e, "sqlite_errorcode", None) in (sqlite3.SQLITE_NOTADB,
                                                        sqlite3.SQLITE_CORRUPT):
                raise CafuseError(f"cache directory {path}: {self._index}: {e}; it is only "
                                  f"a cache: remove the directory to start a new one") from None
            self._db = self._open_to_read(e)
        try:
            os.makedirs(self.packs, exist_ok=True)
        except OSError as e:
            self._db.close()
            raise CafuseError(f"cache directory {path}: {self.packs}: {e.strerror} "
                              f"(not a cafuse cache?)") from None

    def _open(self, create: bool) -> sqlite3.Connection:
        try:
            if create:
                os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise CafuseError(f"cache directory {self.path}: {_reason(e)}") from None
        db = sqlite3.connect(self._index, timeout=_BUSY_MS / 1000, check_same_thread=False,
                             isolation_level=None)
        try:
            tables = _tables(db)
            if not create and tables and not {"pack", "chunk"} <= tables:
                raise CafuseError(f"{self.path}: no cafuse disk cache there "
                                  f"({self._index} is another database)")
            if tables and not _writable(db, self._index):
                # SQLite opened it read-only without a word (its WAL files
                # are there: another process has it open), and reads it so.
                self.read_only = f"{self._index} cannot be written"
                return db
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if _version(db) < _VERSION:
                db.execute("BEGIN IMMEDIATE")
                if _version(db) < _VERSION:  # not done by another process meanwhile
                    _set_up(db)
                db.execute("COMMIT")
        except BaseException:
            db.close()
            raise
        return db

    def _open_to_read(self, error: sqlite3.Error) -> sqlite3.Connection:
        """The index as it is on disk, read only, when it cannot be opened
        to write: its chunks are still served.  (``immutable``: SQLite
        makes no file and takes no lock; a row another process changes
        meanwhile only reads as a miss, as the records are checked.)"""
        uri = f"file:{urllib.parse.quote(os.path.abspath(self._index))}?mode=ro&immutable=1"
        try:
            db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            if not {"pack", "chunk"} <= _tables(db):
                db.close()
                raise sqlite3.OperationalError("no cache index")
        except sqlite3.Error:
            raise CafuseError(f"cache directory {self.path}: {_reason(error)}") from None
        self.read_only = _reason(error)
        self._immutable = True
        return db

    def get(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            if self._closed:
                return None
            # (CAST: a damaged row reads as numbers, which the record's
            # bounds and check then refuse.)
            rows = [self._pending[chunk_id]] if chunk_id in self._pending else self._rows(
                "SELECT CAST(pack AS INTEGER), CAST(offset AS INTEGER), "
                "CAST(size AS INTEGER) FROM chunk WHERE id = ?", (chunk_id,))
            if not rows:
                return None
            pack, offset, size = rows[0]
            # Read under the lock: a prune in another thread closes the
            # fds of the packs it deletes.
            blob = self._record(self._reader(pack), offset, size)
        data = blob[CHECK_SIZE:]
        if len(data) != size or _check(chunk_id, data) != blob[:CHECK_SIZE]:
            with self._lock:
                if not self.read_only and not self._closed:
                    self._query("DELETE FROM chunk WHERE id = ? "
                                "AND CAST(pack AS INTEGER) = ?", (chunk_id, pack))
                self._forget(pack)
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
                found.update(row[0] for row in self._rows(
                    f"SELECT id FROM chunk WHERE id IN ({marks})", part))
        return found

    def put(self, chunk_id: bytes, data: bytes) -> None:
        """Store a verified chunk; raises DiskFull when there is no room.

        Rows are committed in batches (a commit per chunk would cost more
        than the write); until then this process finds them in ``_pending``.
        After the close, a put (from a writer left to go on) is dropped.
        """
        if self.read_only:
            raise DiskFull(f"cache directory {self.path}: {self.read_only}; it is only read")
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
        """Whether ``flush`` has work: rows wait at most _FLUSH_AFTER
        seconds for their commit, and read descriptors _RELEASE_AFTER for
        a look at whether their packs were deleted."""
        now = time.monotonic()
        return (bool(self._pending) and now - self._flushed > _FLUSH_AFTER) \
            or ((bool(self._fds) or self._writing is not None)
                and now - self._released > _RELEASE_AFTER)

    def flush(self) -> None:
        with self._lock:
            if not self._closed:
                self._flush()
                self._release_deleted()

    def _release_deleted(self) -> None:
        """Close the descriptors of packs that another process deleted (a
        prune), to read or to append to: held open, their room would stay
        taken while this process lives."""
        self._released = time.monotonic()
        held = list(self._fds.items())
        if self._writing is not None:
            held.append(self._writing[:2])
        for pack, fd in held:
            try:
                deleted = os.fstat(fd).st_nlink == 0
            except OSError:
                deleted = True
            if deleted:
                self._forget(pack)  # also the pack being written, and its rows

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
            total = self._query("SELECT TOTAL(CAST(bytes AS INTEGER)) FROM pack").fetchone()[0]
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
                "SELECT COUNT(*), CAST(TOTAL(CAST(bytes AS INTEGER)) AS INTEGER), "
                "MIN(CAST(used AS REAL)), MAX(CAST(used AS REAL)) FROM pack").fetchone()
            on_disk = sum(self._file_size(pack) for pack in self._pack_files())
        return Usage(entries, total, packs, oldest, newest, on_disk)

    def prune(self, max_bytes: int) -> int:
        """Delete least recently used packs until the cache holds at most
        ``max_bytes``, counting what their files take on disk (records
        whose rows were never committed, after a crash, included), and
        pack files that no row lists; returns bytes freed."""
        with self._lock:
            freed = self._make_room(max_bytes) if self.read_only else 0
            self._flush()
            self._query("BEGIN IMMEDIATE")  # no new pack row meanwhile
            try:
                freed += self._remove_unlisted()
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
        is committed before its file is made."""
        listed = {row[0] for row in self._query("SELECT id FROM pack")}
        return self._unlink(self._pack_files() - listed)

    def _pack_files(self) -> set[int]:
        """The ids of the pack files in the directory."""
        files = set()
        for name in os.listdir(self.packs):
            stem, dot, suffix = name.partition(".")
            if stem.isascii() and stem.isdigit() and stem == str(int(stem)) \
                    and dot and suffix == "pack":
                files.add(int(stem))
        return files

    def _prune(self, max_bytes, on_disk=False):
        try:
            return self._unlink(self._drop_lru(max_bytes, on_disk))
        except DiskFull:
            # Recording the deletion takes room the disk has not: the
            # files go first (their rows read as misses until the second
            # try takes them out).
            freed = self._unlink(self._lru_beyond(max_bytes, on_disk))
            return freed + self._unlink(self._drop_lru(max_bytes, on_disk))

    def _make_room(self, max_bytes) -> int:
        """Prune an index that could only be opened to read: where SQLite
        could not make its WAL files (no room, or no quota, left), delete
        the files of the packs to go first; then open it to write."""
        freed = 0
        if self._immutable:
            freed = self._unlink(self._lru_beyond(max_bytes, on_disk=True))
        self._db.close()
        self.read_only, self._immutable = None, False
        try:
            self._db = self._open(create=False)
        except (sqlite3.Error, OSError) as e:
            raise CafuseError(f"cache directory {self.path}: {_reason(e)}") from None
        if self.read_only:
            raise CafuseError(f"cache directory {self.path}: {self.read_only}")
        return freed

    def _drop_lru(self, max_bytes, on_disk) -> list[int]:
        """Take the least recently used packs beyond ``max_bytes`` out of
        the index; their ids."""
        self._query("BEGIN IMMEDIATE")
        try:
            doomed = self._lru_beyond(max_bytes, on_disk)
            for pack in doomed:
                self._query("DELETE FROM chunk WHERE pack = ?", (pack,))
                self._query("DELETE FROM pack WHERE id = ?", (pack,))
            self._query("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._query("ROLLBACK")
            raise
        return doomed

    def _lru_beyond(self, max_bytes, on_disk) -> list[int]:
        packs = self._query("SELECT id, CAST(bytes AS INTEGER) FROM pack "
                            "ORDER BY used").fetchall()
        if on_disk:
            packs = [(pack, max(size, self._file_size(pack))) for pack, size in packs]
        left, doomed = sum(size for _id, size in packs), []
        for pack, size in packs:
            if left <= max_bytes:
                break
            doomed.append(pack)
            left -= size
        return doomed

    def _unlink(self, packs) -> int:
        """Delete the files of ``packs``; the bytes they held."""
        freed = 0
        for pack in packs:
            self._forget(pack)
            size = self._file_size(pack)
            try:
                os.unlink(self._pack_file(pack))
                freed += size
            except FileNotFoundError:
                pass
        return freed

    def _writer(self):
        """This process's pack to append to: (pack id, fd, end offset)."""
        if self._writing is not None and os.fstat(self._writing[1]).st_nlink == 0:
            self._forget(self._writing[0])  # pruned by another process
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

    def _record(self, fd, offset, size) -> bytes:
        """The record at ``offset`` of the pack open as ``fd``, or b"" if
        the pack holds no record that large there."""
        try:
            if fd is None or offset < 0 or size < 0 \
                    or offset + CHECK_SIZE + size > os.fstat(fd).st_size:
                return b""
            return os.pread(fd, CHECK_SIZE + size, offset)
        except OSError as e:
            raise CafuseError(f"cache directory {self.path}: {e.strerror}") from None

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
        if now - self._touched.get(pack, 0) > _TOUCH_AFTER and not self.read_only:
            self._touched[pack] = now
            with self._lock, contextlib.suppress(CafuseError):  # only an LRU order
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

    def _rows(self, sql, args) -> list:
        """The rows a lookup finds; none where an index opened immutable
        reads pages that another process was rewriting."""
        try:
            return self._query(sql, args).fetchall()
        except (CafuseError, sqlite3.Error) as e:
            if self._immutable:
                return []
            raise self._index_error(e) if isinstance(e, sqlite3.Error) else e from None

    def _index_error(self, error: sqlite3.Error) -> CafuseError:
        code = getattr(error, "sqlite_errorcode", 0)
        if code == sqlite3.SQLITE_FULL:
            return DiskFull(f"cache directory {self.path}: {error}")
        if code & 0xFF == sqlite3.SQLITE_READONLY:  # it became so (or SQLite says so late)
            self.read_only = f"{self._index} cannot be written"
            return DiskFull(f"cache directory {self.path}: {error}; it is only read")
        return CafuseError(f"cache index {self.path}: {error}")


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _writable(db: sqlite3.Connection, index: str) -> bool:
    """Whether SQLite can write the index: a page written and rolled back
    (in WAL mode BEGIN IMMEDIATE passes even where that fails).  Without
    waiting for another process's write: access(2) answers then."""
    db.execute("PRAGMA busy_timeout = 0")
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(f"PRAGMA user_version = {_version(db)}")
        finally:
            db.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_READONLY:
            return False
        if code == sqlite3.SQLITE_BUSY:
            return os.access(index, os.W_OK)
        raise
    finally:
        db.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
    return True


def _version(db: sqlite3.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


def _set_up(db: sqlite3.Connection) -> None:
    """Make the tables, or bring a version 0 index to this one (in the
    caller's write transaction, so two processes cannot both do it)."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'pack'").fetchone():
        db.execute(_PACK_TABLE.format(name="pack_v1"))
        db.execute("INSERT INTO pack_v1 SELECT id, bytes, used FROM pack")
        db.execute("DROP TABLE pack")
        db.execute("ALTER TABLE pack_v1 RENAME TO pack")
    else:
        db.execute(_PACK_TABLE.format(name="pack"))
    db.execute(_CHUNK_TABLE)
    db.execute(_CHUNK_INDEX)
    db.execute(f"PRAGMA user_version = {_VERSION}")


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
