"""Text forms of archive entries, for ``cafuse ls`` and ``cafuse info``."""

import stat
from datetime import datetime, timedelta, timezone

from . import flags as ff
from .catar import Entry

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def quote(name: bytes) -> str:
    """``name`` as one printable line: bytes that are not valid UTF-8,
    control characters and backslashes are escaped as ``\\xNN`` / ``\\\\``,
    other characters that do not print as ``\\uNNNN`` or ``\\UNNNNNNNN``
    (as Python writes them)."""
    out = []
    for ch in name.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif not ch.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else
                       f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def timestamp(ns: int) -> str:
    """UTC time with nanoseconds; ``ns`` may be negative (before 1970)."""
    seconds, frac = divmod(ns, 10**9)
    when = _EPOCH + timedelta(seconds=seconds)
    return f"{when:%Y-%m-%d %H:%M:%S}.{frac:09d}"


def owner(name: bytes | None, ident: int, entry: Entry) -> str:
    if name is not None:
        return quote(name)
    if ident == 0 and entry.feature_flags & ff.WITH_USER_NAMES:
        return "root"  # casync omits the USER/GROUP record for id 0 (§5.4)
    return str(ident)


def long_line(entry: Entry, path: bytes) -> str:
    """An ``ls -l``-style line: mode, owner, group, size, mtime, path."""
    if entry.rdev is not None:
        size = f"{entry.rdev[0]},{entry.rdev[1]}"
    else:
        size = str(entry.size)
    line = (f"{stat.filemode(entry.mode)} {owner(entry.user, entry.uid, entry):<8} "
            f"{owner(entry.group, entry.gid, entry):<8} {size:>12} "
            f"{timestamp(entry.mtime_ns)} {quote(path)}")
    if entry.target is not None:
        line += f" -> {quote(entry.target)}"
    return line


def size_text(n: float) -> str:
    """A byte count for people: 512 B, 1.5 MiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n /= 1024
        i += 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"
