"""A persistent cache of verified, decompressed chunks, shared by processes.

Layout: ``<dir>/chunks/<first 4 hex>/<64 hex>``, each file the chunk's
BLAKE3 digest (32 bytes) followed by its bytes.  A reader recomputes the
BLAKE3 (several GB/s) and drops an entry that does not match, so a torn or
rotten file is fetched again, never served.  Entries are written under a
temporary name and renamed into place, so a crash leaves at worst a stray
``*.tmp``.  The file mtime is the LRU clock: a hit refreshes it (at most
once a minute per entry); ``prune`` deletes the oldest entries until the
cache fits its byte budget (to 90% of it, so that pruning is rare), under
an flock so concurrent pruners take turns.  Several processes may read, write and prune one cache at once:
renames are atomic and unlinking a file another process reads is safe.
"""

import errno
import fcntl
import os
import threading
import time
from dataclasses import dataclass

import blake3

from .errors import CafuseError

CHECK_SIZE = 32
_TOUCH_AFTER = 60          # seconds: refresh an entry's mtime at most this often
_STALE_TMP = 3600          # seconds: an older *.tmp belongs to a dead writer


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
    oldest: float | None
    newest: float | None
    stray_tmp: int


class DiskCache:
    """Blocking calls; the engine runs them in worker threads."""

    def __init__(self, path: str, max_bytes: int):
        self.path = path
        self.max_bytes = max_bytes
        self.chunks = os.path.join(path, "chunks")
        self._size: int | None = None  # our estimate; None until scanned
        self._lock = threading.Lock()   # puts come from several worker threads
        try:
            os.makedirs(self.chunks, exist_ok=True)
        except OSError as e:
            raise CafuseError(f"cache directory {path}: {e.strerror}") from None

    def _file(self, chunk_id: bytes) -> str:
        name = chunk_id.hex()
        return os.path.join(self.chunks, name[:4], name)

    def get(self, chunk_id: bytes) -> bytes | None:
        path = self._file(chunk_id)
        try:
            with open(path, "rb") as f:
                blob = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        data = blob[CHECK_SIZE:]
        if len(blob) < CHECK_SIZE or blake3.blake3(data).digest() != blob[:CHECK_SIZE]:
            _unlink(path)
            return None
        if time.time() - mtime > _TOUCH_AFTER:
            try:
                os.utime(path)
            except FileNotFoundError:
                pass
        return data

    def put(self, chunk_id: bytes, data: bytes) -> None:
        """Store a verified chunk; raises DiskFull when there is no room."""
        path = self._file(chunk_id)
        tmp = f"{path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(blake3.blake3(data).digest())
                f.write(data)
            os.rename(tmp, path)
        except OSError as e:
            _unlink(tmp)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"cache directory {self.path}: {e.strerror}") from None
            raise CafuseError(f"cache directory {self.path}: {e.strerror}") from None
        with self._lock:
            if self._size is None:
                self._size = self.usage().bytes
            else:
                self._size += CHECK_SIZE + len(data)
            if self._size > self.max_bytes:
                # Down to 90%, so that pruning (a scan of the whole cache) is rare.
                self.prune(self.max_bytes * 9 // 10)

    def usage(self) -> Usage:
        entries, total, stray, oldest, newest = 0, 0, 0, None, None
        for _path, st, is_tmp in self._scan():
            if is_tmp:
                stray += 1
                continue
            entries += 1
            total += st.st_size
            oldest = st.st_mtime if oldest is None else min(oldest, st.st_mtime)
            newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
        return Usage(entries, total, oldest, newest, stray)

    def prune(self, max_bytes: int) -> int:
        """Delete least recently used entries until the cache holds at most
        ``max_bytes``, and stale temporary files; returns bytes freed."""
        with open(os.path.join(self.path, "prune.lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another process is pruning right now
            entries, total, freed = [], 0, 0
            now = time.time()
            for path, st, is_tmp in self._scan():
                if is_tmp:
                    if now - st.st_mtime > _STALE_TMP:
                        _unlink(path)
                    continue
                entries.append((st.st_mtime, st.st_size, path))
                total += st.st_size
            entries.sort()
            for _mtime, size, path in entries:
                if total - freed <= max_bytes:
                    break
                _unlink(path)
                freed += size
            self._size = total - freed
            return freed

    def _scan(self):
        """(path, stat, is temporary) for every file in the cache."""
        try:
            subdirs = os.scandir(self.chunks)
        except FileNotFoundError:
            return
        with subdirs:
            for sub in subdirs:
                if not sub.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(sub.path) as files:
                    for entry in files:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        yield entry.path, st, entry.name.endswith(".tmp")


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
