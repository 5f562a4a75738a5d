"""Chunk decoding and verification (casync-format.md §3, §4.2).

Sans-IO: bytes in, bytes out.  A chunk file is one compressed stream whose
kind is told by its first bytes; the chunk id is the digest of the
decompressed bytes, SHA-512/256 or SHA-256 as the index's flags say.
Decompression and hashing release the GIL, so callers may run ``decode`` in
worker threads.
"""

import hashlib
import lzma
import threading
import zlib

import zstandard

from .errors import ChunkError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"

_HASHES = {"sha512-256": "sha512_256", "sha256": "sha256"}
_local = threading.local()


def compression_of(raw: bytes) -> str:
    """The compression a chunk file uses, by its magic; 'none' if unknown."""
    if raw.startswith(ZSTD_MAGIC):
        return "zstd"
    if raw.startswith(XZ_MAGIC):
        return "xz"
    if raw.startswith(GZIP_MAGIC):
        return "gzip"
    return "none"


def decompress(raw: bytes, size: int) -> bytes:
    """Decompress a ``.cacnk`` file expected to hold exactly ``size`` bytes.

    Output is capped at ``size + 1`` bytes, so a hostile chunk cannot inflate
    without bound.  Raises ValueError on anything but a complete stream.
    """
    kind = compression_of(raw)
    if kind == "zstd":
        # casync's frames carry no content size, so the bound is given
        # explicitly.  A frame that states one gets a buffer of that size,
        # bound or not: a stated size other than the index's is refused
        # before anything is allocated (a corrupt one asked for 10^17 bytes).
        try:
            stated = zstandard.frame_content_size(raw)
            if stated not in (-1, size):
                raise ValueError(f"zstd frame says {stated} bytes, index says {size}")
            out = _zstd().decompress(raw, max_output_size=size)
        except zstandard.ZstdError as e:
            raise ValueError(f"bad zstd data: {e}") from None
    elif kind == "xz":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            out = d.decompress(raw, max_length=size + 1)
        except lzma.LZMAError as e:
            raise ValueError(f"bad xz data: {e}") from None
        if not d.eof:
            raise ValueError("truncated xz data")
    elif kind == "gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(raw, size + 1)
        except zlib.error as e:
            raise ValueError(f"bad gzip data: {e}") from None
        if not d.eof:
            raise ValueError("truncated gzip data")
    else:
        raise ValueError("unknown compression (no zstd, xz or gzip magic)")
    return out


def compressed_bound(size: int) -> int:
    """The most a ``.cacnk`` of a chunk of ``size`` bytes can take, with
    room to spare: incompressible data grows by well under 1% in zstd, xz
    and gzip, plus their headers."""
    return size + size // 64 + 4096


def digest(data: bytes, algorithm: str) -> bytes:
    """The chunk id of ``data``: 'sha512-256' or 'sha256'."""
    return hashlib.new(_HASHES[algorithm], data).digest()


def decode(raw: bytes, compressed: bool, chunk_id: bytes, size: int,
           algorithm: str) -> bytes:
    """Turn a chunk file's bytes into the verified chunk, or raise ChunkError.

    ``compressed`` says whether the file was a ``.cacnk`` (compressed) or an
    un-suffixed (plain) chunk file.
    """
    name = chunk_id.hex()
    try:
        data = decompress(raw, size) if compressed else raw
    except ValueError as e:
        raise ChunkError(f"chunk {name}: {e}") from None
    if len(data) != size:
        raise ChunkError(f"chunk {name}: {len(data)} bytes, index says {size}")
    if digest(data, algorithm) != chunk_id:
        raise ChunkError(f"chunk {name}: content does not match its id")
    return data


def _zstd() -> zstandard.ZstdDecompressor:
    # A decompression context may not be shared between threads.
    d = getattr(_local, "zstd", None)
    if d is None:
        d = _local.zstd = zstandard.ZstdDecompressor()
    return d
