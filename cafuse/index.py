"""casync index files (.caibx, .caidx): parsing and byte-range lookup.

Sans-IO: ``Index.parse`` takes the file's bytes.  Layout (casync-format.md
§2): a 48-byte INDEX record, a TABLE header, n 40-byte items of (end offset,
chunk id), and a 40-byte tail.  End offsets live in a compact ``array('Q')``
so a lookup is a C-level bisect, never a scan of Python objects.
"""

import bisect
import struct
import sys
from array import array

from . import flags as ff
from .errors import FormatError

INDEX_MAGIC = 0x96824D9C7B129FF9
TABLE_MAGIC = 0xE75B9E112F17417D
TABLE_TAIL_MARKER = 0x4B4F050E5549ECD1
UINT64_MAX = 0xFFFFFFFFFFFFFFFF

HEADER_SIZE = 48
TABLE_HEADER_SIZE = 16
ITEM_SIZE = 40
TAIL_SIZE = 40
OVERHEAD = HEADER_SIZE + TABLE_HEADER_SIZE + TAIL_SIZE  # 104
ID_SIZE = 32

# casync's hard limit for a chunk, compressed or not (§2.1).
CHUNK_SIZE_LIMIT = 128 * 1024 * 1024


class Index:
    """A parsed index: the chunker's parameters and the chunk table.

    Chunk ``i`` covers ``[start(i), end(i))`` of the reassembled stream.
    """

    __slots__ = ("feature_flags", "chunk_size_min", "chunk_size_avg",
                 "chunk_size_max", "ends", "_table")

    def __init__(self, feature_flags, chunk_size_min, chunk_size_avg,
                 chunk_size_max, ends, table):
        self.feature_flags = feature_flags
        self.chunk_size_min = chunk_size_min
        self.chunk_size_avg = chunk_size_avg
        self.chunk_size_max = chunk_size_max
        self.ends = ends
        self._table = table

    @classmethod
    def parse(cls, data: bytes) -> "Index":
        """Validate ``data`` as a whole index file; raise FormatError if not."""
        data = bytes(data)
        if len(data) < OVERHEAD:
            raise FormatError(f"not a casync index: {len(data)} bytes is shorter "
                              f"than the {OVERHEAD}-byte minimum", 0)
        size, magic, feature_flags, cmin, cavg, cmax = struct.unpack_from("<6Q", data)
        if size != HEADER_SIZE or magic != INDEX_MAGIC:
            raise FormatError("not a casync index: bad INDEX header", 0)
        _check_header(feature_flags, cmin, cavg, cmax)
        tsize, tmagic = struct.unpack_from("<2Q", data, HEADER_SIZE)
        if tsize != UINT64_MAX or tmagic != TABLE_MAGIC:
            raise FormatError("bad TABLE header", HEADER_SIZE)
        n, rest = divmod(len(data) - OVERHEAD, ITEM_SIZE)
        if rest:
            raise FormatError(f"index is truncated or has trailing bytes "
                              f"({len(data)} bytes is not 104 + 40*n)", len(data))
        table_start = HEADER_SIZE + TABLE_HEADER_SIZE
        _check_tail(data, table_start + n * ITEM_SIZE, n)
        table = memoryview(data)[table_start:table_start + n * ITEM_SIZE]
        ends = array("Q")
        ends.frombytes(table.cast("Q")[::ITEM_SIZE // 8].tobytes())
        if sys.byteorder != "little":
            ends.byteswap()
        _check_ends(ends, cmax, table_start)
        return cls(feature_flags, cmin, cavg, cmax, ends, table)

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def size(self) -> int:
        """Length of the reassembled stream (blob or catar)."""
        return self.ends[-1] if self.ends else 0

    @property
    def digest(self) -> str:
        return ff.digest_name(self.feature_flags)

    def chunk_id(self, i: int) -> bytes:
        base = i * ITEM_SIZE + 8
        return bytes(self._table[base:base + ID_SIZE])

    def start(self, i: int) -> int:
        return self.ends[i - 1] if i else 0

    def end(self, i: int) -> int:
        return self.ends[i]

    def chunk_size(self, i: int) -> int:
        return self.ends[i] - self.start(i)

    def locate(self, offset: int) -> int:
        """The chunk holding byte ``offset``; ``offset`` must be < size."""
        return bisect.bisect_right(self.ends, offset)

    def span(self, offset: int, size: int) -> range:
        """Chunks that hold bytes ``[offset, offset+size)``, clipped to the stream."""
        stop = min(offset + size, self.size)
        if offset >= stop:
            return range(0)
        return range(self.locate(offset), self.locate(stop - 1) + 1)


def _check_header(feature_flags, cmin, cavg, cmax):
    if feature_flags & ~ff.KNOWN:
        raise FormatError(f"index uses unknown feature flags "
                          f"{feature_flags & ~ff.KNOWN:#x}", 0x10)
    for value in (cmin, cavg, cmax):
        if not 1 <= value <= CHUNK_SIZE_LIMIT:
            raise FormatError(f"chunk size {value} outside 1..{CHUNK_SIZE_LIMIT}", 0x18)
    if not cmin <= cavg <= cmax:
        raise FormatError(f"chunk sizes not ordered: min {cmin}, avg {cavg}, "
                          f"max {cmax}", 0x18)


def _check_tail(data, offset, n):
    zero1, zero2, index_offset, size, marker = struct.unpack_from("<5Q", data, offset)
    expect = TABLE_HEADER_SIZE + n * ITEM_SIZE + TAIL_SIZE
    if (zero1, zero2, index_offset, size, marker) != (0, 0, HEADER_SIZE, expect,
                                                      TABLE_TAIL_MARKER):
        raise FormatError("bad TABLE tail: index is truncated or corrupt", offset)


def _check_ends(ends, cmax, table_start):
    # End offsets must grow by 1..cmax per chunk; this also bounds every
    # chunk a reader will ever decompress.
    prev = 0
    for i, end in enumerate(ends):
        if not prev < end <= prev + cmax:
            raise FormatError(f"chunk {i} ends at {end} after {prev}: sizes must "
                              f"be 1..{cmax}", table_start + i * ITEM_SIZE)
        prev = end
