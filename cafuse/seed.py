"""Seeds: chunks read from a local file that an index describes.

``--seed v1.caibx:v1.img`` lets a read of v2 take every chunk v1 shares with
it from ``v1.img`` instead of the network.  Each chunk is verified against
its id, so a seed file that changed since it was indexed only costs misses.
"""

import os
import stat

from . import chunk
from .errors import CafuseError, ChunkError
from .index import Index


class Seed:
    """Blocking calls; the engine runs them in worker threads."""

    def __init__(self, index: Index, path: str):
        self.path = path
        self.digest = index.digest
        self._where = {}
        for i in range(len(index)):
            self._where.setdefault(index.chunk_id(i), (index.start(i), index.chunk_size(i)))
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CafuseError(f"seed {self.path}: {e.strerror}") from None
        mode = os.fstat(self._fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self._fd)
            raise CafuseError(f"seed {self.path}: not a regular file or block device "
                              f"(the blob the seed index describes)")

    def __str__(self) -> str:
        return f"seed {self.path}"

    def load(self, chunk_id: bytes, size: int, digest: str) -> bytes | None:
        where = self._where.get(chunk_id)
        if where is None or where[1] != size or digest != self.digest:
            return None
        try:
            data = os.pread(self._fd, size, where[0])
            return chunk.decode(data, False, chunk_id, size, digest)
        except (OSError, ChunkError):  # a seed is only a hint: the stores have it
            return None

    def close(self) -> None:
        os.close(self._fd)

