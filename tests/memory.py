"""Test helpers that build casync objects in memory."""

import hashlib
import struct

from cafuse.index import INDEX_MAGIC, TABLE_MAGIC, TABLE_TAIL_MARKER

UINT64_MAX = 0xFFFFFFFFFFFFFFFF


class MemorySource:
    """A byte source over ``bytes`` that counts what it was asked for."""

    def __init__(self, data: bytes):
        self.data = data
        self.size = len(data)
        self.reads = []

    async def read(self, offset, size):
        self.reads.append((offset, size))
        return self.data[offset:offset + size]

    async def preload(self, ranges):
        pass


def build_index(chunks: list[bytes], feature_flags=0xB000000000000000,
                sizes=(1, 1, 1 << 20)) -> bytes:
    """An index over ``chunks`` laid out as casync writes it (§2.1)."""
    algorithm = "sha512_256" if feature_flags & 0x2000000000000000 else "sha256"
    out = [struct.pack("<6Q", 48, INDEX_MAGIC, feature_flags, *sizes),
           struct.pack("<2Q", UINT64_MAX, TABLE_MAGIC)]
    end = 0
    for chunk in chunks:
        end += len(chunk)
        out.append(struct.pack("<Q", end) + hashlib.new(algorithm, chunk).digest())
    out.append(struct.pack("<5Q", 0, 0, 48, 16 + 40 * len(chunks) + 40, TABLE_TAIL_MARKER))
    return b"".join(out)
