"""SipHash-2-4 with casync's fixed key, for goodbye-table lookups (§5.7).

Python's own ``hash`` is randomly keyed SipHash-1-3, so it cannot be used.
"""

import struct

_MASK = 0xFFFFFFFFFFFFFFFF
# The key bytes b3 84 1d 0f 2b 44 74 85 c1 2e c2 d1 30 ed 36 27 as two le64.
CASYNC_KEY = (0x8574442B0F1D84B3, 0x2736ED30D1C22EC1)


def _rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & _MASK


def _rounds(v0, v1, v2, v3, n):
    for _ in range(n):
        v0 = (v0 + v1) & _MASK
        v1 = _rotl(v1, 13) ^ v0
        v0 = _rotl(v0, 32)
        v2 = (v2 + v3) & _MASK
        v3 = _rotl(v3, 16) ^ v2
        v0 = (v0 + v3) & _MASK
        v3 = _rotl(v3, 21) ^ v0
        v2 = (v2 + v1) & _MASK
        v1 = _rotl(v1, 17) ^ v2
        v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash24(data: bytes, key: tuple[int, int] = CASYNC_KEY) -> int:
    """The 64-bit SipHash-2-4 of ``data`` under ``key`` (two le64 words)."""
    k0, k1 = key
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    whole = len(data) // 8 * 8
    for (m,) in struct.iter_unpack("<Q", data[:whole]):
        v3 ^= m
        v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
        v0 ^= m
    # The last word holds the leftover bytes and the length's low byte on top.
    last = int.from_bytes(data[whole:], "little") | ((len(data) & 0xFF) << 56)
    v3 ^= last
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
    v0 ^= last
    v2 ^= 0xFF
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 4)
    return v0 ^ v1 ^ v2 ^ v3
