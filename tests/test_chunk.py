import gzip
import hashlib
import lzma

import pytest
import zstandard
from hypothesis import given, strategies as st

from cafuse import ChunkError
from cafuse.chunk import compression_of, decode, decompress

DATA = bytes(range(256)) * 300
ID = hashlib.new("sha512_256", DATA).digest()


def zstd_like_casync(data):
    # casync writes frames without a content size (casync-format §4.2).
    return zstandard.ZstdCompressor(level=3, write_content_size=False).compress(data)


COMPRESSORS = {
    "zstd": zstd_like_casync,
    "xz": lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64),
    "gzip": gzip.compress,
}


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_decode_each_compression(kind):
    raw = COMPRESSORS[kind](DATA)
    assert compression_of(raw) == kind
    assert decode(raw, True, ID, len(DATA), "sha512-256") == DATA


def test_uncompressed_chunk_file():
    assert decode(DATA, False, ID, len(DATA), "sha512-256") == DATA


def test_sha256_ids():
    chunk_id = hashlib.sha256(DATA).digest()
    assert decode(zstd_like_casync(DATA), True, chunk_id, len(DATA), "sha256") == DATA
    with pytest.raises(ChunkError, match="does not match"):
        decode(zstd_like_casync(DATA), True, chunk_id, len(DATA), "sha512-256")


def test_wrong_content_is_refused():
    other = DATA[:-1] + b"\x00"
    with pytest.raises(ChunkError, match=ID.hex()):
        decode(zstd_like_casync(other), True, ID, len(DATA), "sha512-256")


def test_wrong_length_is_refused():
    with pytest.raises(ChunkError, match="bytes, index says"):
        decode(gzip.compress(DATA + b"x"), True, ID, len(DATA), "sha512-256")


def test_output_is_bounded():
    bomb = zstd_like_casync(bytes(50 << 20))
    with pytest.raises(ValueError):
        decompress(bomb, 1000)


def test_a_stated_content_size_cannot_make_it_allocate():
    # One flipped bit in the frame header made a casync frame state 10^17
    # bytes, which the decompressor tried to allocate (MemoryError).
    raw = bytearray(zstd_like_casync(DATA))
    raw[4] = 0xF0
    with pytest.raises(ChunkError, match="zstd frame says"):
        decode(bytes(raw), True, ID, len(DATA), "sha512-256")
    stated = zstandard.ZstdCompressor(write_content_size=True).compress(DATA)
    assert decode(stated, True, ID, len(DATA), "sha512-256") == DATA


@pytest.mark.parametrize("kind", sorted(COMPRESSORS))
def test_truncated_stream(kind):
    raw = COMPRESSORS[kind](DATA)
    with pytest.raises(ChunkError):
        decode(raw[:len(raw) // 2], True, ID, len(DATA), "sha512-256")


@given(st.sampled_from(sorted(COMPRESSORS)), st.data())
def test_mutated_chunks_never_pass(kind, data):
    raw = bytearray(COMPRESSORS[kind](DATA))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] ^= data.draw(st.integers(1, 255))
    try:
        out = decode(bytes(raw), True, ID, len(DATA), "sha512-256")
    except ChunkError:
        return
    assert out == DATA  # a flip in unused bits may still decode to the truth


@given(st.binary(max_size=200))
def test_random_chunk_bytes(raw):
    with pytest.raises(ChunkError):
        decode(raw, True, ID, len(DATA), "sha512-256")
