"""A goodbye table (§5.7): the search of its binary search tree, ties
included, and the places of a directory's children it gives."""

import struct

import pytest
from hypothesis import given, strategies as st

from cafuse import catar
from cafuse.errors import FormatError


def level_order(values: list, key=None) -> list:
    """``values`` sorted into the level-order array of a complete BST, as
    casync lays out a goodbye table."""
    ordered, out = sorted(values, key=key), [0] * len(values)
    position = iter(range(len(values)))

    def fill(k):
        if k < len(out):
            fill(2 * k + 1)
            out[k] = ordered[next(position)]
            fill(2 * k + 2)
    fill(0)
    return out


def goodbye(hashes: list[int], sizes: list[int] | None = None):
    """A GOODBYE record, its start and the places of its children: child k
    has hash ``hashes[k]`` and ``sizes[k]`` bytes (MIN_CHILD by default),
    and the children lie one after the other in that order."""
    sizes = sizes or [catar.MIN_CHILD] * len(hashes)
    places = [(catar.ENTRY_SIZE + sum(sizes[:k]), sizes[k]) for k in range(len(sizes))]
    start = catar.ENTRY_SIZE + sum(sizes)
    size = catar.HEADER + (len(hashes) + 1) * catar.GOODBYE_ITEM
    buf = struct.pack("<2Q", size, catar.GOODBYE)
    for k in level_order(list(range(len(hashes))), key=lambda k: (hashes[k], k)):
        buf += struct.pack("<3Q", start - places[k][0], places[k][1], hashes[k])
    buf += struct.pack("<3Q", start, size, catar.GOODBYE_TAIL_MARKER)
    return buf, start, places


@given(st.lists(st.integers(0, 20), max_size=60), st.integers(0, 21))
def test_the_search_finds_every_item_with_the_hash(hashes, h):
    buf, start, places = goodbye(hashes)
    found = catar.goodbye_search(buf, start, 0, h)
    assert sorted((i.start, i.size) for i in found) == \
        [place for place, hash_ in zip(places, hashes) if hash_ == h]
    assert all(i.hash == h for i in found)


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(catar.MIN_CHILD, 500)),
                max_size=60))
def test_the_places_are_the_children_in_archive_order(children):
    buf, start, places = goodbye([h for h, _ in children], [size for _, size in children])
    found = catar.goodbye_places(buf, start, 0)
    assert len(found) == len(places)
    assert found.page() == places
    assert found.page(3, 5) == places[3:8]


def bent(buf: bytes, k: int, back: int | None = None, size: int | None = None) -> bytes:
    """``buf`` with item ``k`` (in table order) pointing elsewhere."""
    at = catar.HEADER + k * catar.GOODBYE_ITEM
    old_back, old_size = struct.unpack_from("<2Q", buf, at)
    item = struct.pack("<2Q", old_back if back is None else back,
                       old_size if size is None else size)
    return buf[:at] + item + buf[at + 16:]


def test_a_candidate_outside_its_directory_is_a_format_error():
    buf, start, _ = goodbye([5])
    bad = bent(buf, 0, back=start + 1)
    with pytest.raises(FormatError, match="outside its directory"):
        catar.goodbye_search(bad, start, 0, 5)
    assert catar.goodbye_search(bad, start, 0, 4) == []   # not on the way


@pytest.mark.parametrize("how, error", [
    ({"back": 2**64 - 1}, "outside its directory"),                 # before the archive
    ({"back": 10**6}, "outside its directory"),                     # before the ENTRY
    ({"size": catar.MIN_CHILD - 1}, "outside its directory"),       # too small
    ({"size": 10**6}, "overlap|outside its directory"),             # past the GOODBYE
])
def test_places_outside_the_directory_are_format_errors(how, error):
    buf, start, _ = goodbye([1, 2, 3])
    for k in range(3):
        with pytest.raises(FormatError, match=error):
            catar.goodbye_places(bent(buf, k, **how), start, 0)


def test_overlapping_places_are_a_format_error():
    buf, start, places = goodbye([1, 2, 3])
    # The first child in table order made to start where its successor in
    # the archive starts.
    bad = bent(buf, 0, back=start - places[2][0])
    with pytest.raises(FormatError, match="overlap"):
        catar.goodbye_places(bad, start, 0)
