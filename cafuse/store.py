"""Local chunk stores in casync's layout (casync-format.md §4.1).

``<store>/<first 4 hex>/<64 hex>.cacnk`` holds a compressed chunk and
``<store>/<first 4 hex>/<64 hex>`` an uncompressed one; a store may mix
both.  ``load`` is blocking file I/O, meant to run in a worker thread next
to decompression and hashing.
"""

import os

from .errors import CafuseError

SUFFIX = os.environ.get("CASYNC_COMPRESSED_CHUNK_SUFFIX", ".cacnk")


class LocalStore:
    def __init__(self, path: str):
        self.path = path

    def __str__(self) -> str:
        return self.path

    def load(self, chunk_id: bytes) -> tuple[bytes, bool] | None:
        """The chunk file's bytes and whether they are compressed; None if
        the store does not have the chunk."""
        name = chunk_id.hex()
        base = os.path.join(self.path, name[:4], name)
        for path, compressed in ((base + SUFFIX, True), (base, False)):
            try:
                with open(path, "rb") as f:
                    return f.read(), compressed
            except FileNotFoundError:
                continue
            except OSError as e:
                raise CafuseError(f"{path}: {e.strerror}") from None
        if not os.path.isdir(self.path):
            raise CafuseError(f"{self.path}: chunk store not found (no such directory)")
        return None
