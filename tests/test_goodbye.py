"""The search of a goodbye table's binary search tree (§5.7) against a
scan of all its items, ties included."""

import struct

import pytest
from hypothesis import given, strategies as st

from cafuse import catar
from cafuse.errors import FormatError


def level_order(hashes: list[int]) -> list[int]:
    """``hashes`` sorted into the level-order array of a complete BST, as
    casync lays out a goodbye table."""
    ordered, out = sorted(hashes), [0] * len(hashes)
    position = iter(range(len(hashes)))

    def fill(k):
        if k < len(out):
            fill(2 * k + 1)
            out[k] = ordered[next(position)]
            fill(2 * k + 2)
    fill(0)
    return out


def goodbye(hashes: list[int]) -> tuple[bytes, int]:
    """A GOODBYE record over children of MIN_CHILD bytes each, and its start."""
    start = catar.ENTRY_SIZE + len(hashes) * catar.MIN_CHILD
    size = catar.HEADER + (len(hashes) + 1) * catar.GOODBYE_ITEM
    buf = struct.pack("<2Q", size, catar.GOODBYE)
    for k, h in enumerate(level_order(hashes)):
        child = catar.ENTRY_SIZE + k * catar.MIN_CHILD
        buf += struct.pack("<3Q", start - child, catar.MIN_CHILD, h)
    return buf + struct.pack("<3Q", start, size, catar.GOODBYE_TAIL_MARKER), start


@given(st.lists(st.integers(0, 20), max_size=60), st.integers(0, 21))
def test_the_search_finds_every_item_with_the_hash(hashes, h):
    buf, start = goodbye(hashes)
    items = catar.decode_goodbye(buf, start, 0)
    found = catar.goodbye_search(buf, start, 0, h)
    assert sorted(i.start for i in found) == sorted(i.start for i in items if i.hash == h)


def test_a_candidate_outside_its_directory_is_a_format_error():
    buf, start = goodbye([5])
    bad = buf[:catar.HEADER] + struct.pack("<Q", start + 1) + buf[catar.HEADER + 8:]
    with pytest.raises(FormatError, match="outside its directory"):
        catar.goodbye_search(bad, start, 0, 5)
    assert catar.goodbye_search(bad, start, 0, 4) == []   # not on the way
