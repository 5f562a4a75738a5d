import struct
from array import array

import pytest
from hypothesis import given, strategies as st

from cafuse import FormatError
from cafuse.index import Index
from cafuse.inputs import read_index_file

from memory import build_index


def test_empty_index():
    index = Index.parse(build_index([]))
    assert len(index) == 0 and index.size == 0
    assert index.span(0, 10) == range(0)


def test_one_byte_blob():
    # casync's one.caibx: one item, end 1, id = SHA-512/256("x") (§2.4).
    index = Index.parse(build_index([b"x"]))
    assert index.size == 1
    assert index.chunk_id(0).hex() == \
        "6a1db6c1dd481f7aab2adb9c262b210edcca35624ec64c29ffca6857b1e30253"
    assert index.digest == "sha512-256"


def test_sha256_flag():
    index = Index.parse(build_index([b"x"], feature_flags=0x9000000000000000))
    assert index.digest == "sha256"


def test_ends_are_a_compact_array():
    index = Index.parse(build_index([b"a" * 3, b"b" * 5, b"c"]))
    assert isinstance(index.ends, array) and index.ends.typecode == "Q"
    assert list(index.ends) == [3, 8, 9]
    assert [index.chunk_size(i) for i in range(3)] == [3, 5, 1]


@pytest.mark.parametrize("offset,size,expect", [
    (0, 1, [0]), (2, 1, [0]), (2, 2, [0, 1]), (3, 5, [1]), (3, 6, [1, 2]),
    (0, 100, [0, 1, 2]), (8, 1, [2]), (9, 1, []), (0, 0, []),
])
def test_span(offset, size, expect):
    index = Index.parse(build_index([b"a" * 3, b"b" * 5, b"c"]))
    assert list(index.span(offset, size)) == expect


@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.data())
def test_span_covers_exactly_the_range(sizes, data):
    index = Index.parse(build_index([b"z" * n for n in sizes]))
    offset = data.draw(st.integers(0, index.size - 1))
    size = data.draw(st.integers(1, index.size - offset))
    span = index.span(offset, size)
    assert index.start(span[0]) <= offset < index.end(span[0])
    assert index.start(span[-1]) < offset + size <= index.end(span[-1])


def corrupt(data, offset, value):
    return data[:offset] + struct.pack("<Q", value) + data[offset + 8:]


GOOD = build_index([b"a" * 3, b"b" * 5])


@pytest.mark.parametrize("data,where", [
    (b"", 0),
    (b"hello world, this is not an index at all" * 3, 0),
    (GOOD[:-1], None),
    (GOOD + b"\0", None),
    (GOOD[:-40], None),
    (corrupt(GOOD, 8, 1), 0),
    (corrupt(GOOD, 16, 1 << 40), 0x10),           # unknown feature flag
    (corrupt(GOOD, 24, 0), 0x18),                 # chunk_size_min 0
    (corrupt(GOOD, 40, 1 << 40), 0x18),           # max above 128 MiB
    (corrupt(GOOD, 56, 0), 0x30),                 # TABLE magic
    (corrupt(GOOD, 104, 3), 104),                 # ends not increasing
    (corrupt(GOOD, 64, 0), 64),                   # end offset 0
    (corrupt(GOOD, len(GOOD) - 16, 7), None),     # tail size
    (corrupt(GOOD, len(GOOD) - 8, 7), None),      # tail marker
])
def test_bad_indexes(data, where):
    with pytest.raises(FormatError) as info:
        Index.parse(data)
    if where is not None:
        assert info.value.offset == where
    assert "offset" in str(info.value)


def test_an_index_file_error_names_the_file_and_keeps_the_offset(tmp_path):
    bad = tmp_path / "bad.caibx"
    bad.write_bytes(corrupt(GOOD, 24, 0))
    with pytest.raises(FormatError) as info:
        read_index_file(str(bad))
    assert info.value.offset == 0x18 and info.value.source == str(bad)
    assert str(info.value).startswith(f"{bad}: ") and str(info.value).endswith("(at offset 24)")


def test_chunk_larger_than_max_is_rejected():
    with pytest.raises(FormatError, match="chunk 1"):
        Index.parse(build_index([b"a", b"b" * 9], sizes=(1, 4, 8)))


@given(st.binary(max_size=400))
def test_random_bytes_raise_only_format_error(data):
    try:
        Index.parse(data)
    except FormatError:
        pass


@given(st.integers(0, len(GOOD) - 1), st.integers(0, 255))
def test_mutated_index_raises_only_format_error(position, value):
    data = bytearray(GOOD)
    data[position] = value
    try:
        index = Index.parse(bytes(data))
    except FormatError:
        return
    assert index.size == index.ends[-1]
