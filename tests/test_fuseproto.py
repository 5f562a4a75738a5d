"""The FUSE wire format against the kernel's struct layouts (linux/fuse.h)."""

import stat
import struct

import pytest

from cafuse import fuseproto as proto


def request(opcode, body=b"", unique=7, nodeid=1):
    header = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 1000, 100,
                         4242, 0, 0)
    return header + body


def test_request_header_fields():
    req = proto.parse_request(request(proto.LOOKUP, b"name\0", unique=99, nodeid=5))
    assert (req.opcode, req.unique, req.nodeid, req.uid, req.gid, req.pid) == \
        (proto.LOOKUP, 99, 5, 1000, 100, 4242)
    assert proto.name_arg(req.body) == b"name"


@pytest.mark.parametrize("raw", [b"\0" * 39, request(proto.GETATTR, b"12345678")[:-1]])
def test_short_or_inconsistent_request_is_an_error(raw):
    with pytest.raises(proto.ProtocolError):
        proto.parse_request(raw)


def test_read_and_xattr_arguments():
    body = struct.pack("<QQIIQII", 3, 1 << 40, 131072, 0, 0, 0, 0)
    assert proto.read_arg(proto.parse_request(request(proto.READ, body)).body) == \
        (3, 1 << 40, 131072)
    body = struct.pack("<II", 255, 0) + b"security.selinux\0"
    assert proto.getxattr_arg(proto.parse_request(request(proto.GETXATTR, body)).body) == \
        (255, b"security.selinux")
    body = struct.pack("<II", 2, 0) + struct.pack("<QQ", 10, 1) + struct.pack("<QQ", 11, 3)
    assert proto.batch_forget_arg(memoryview(body)) == [(10, 1), (11, 3)]


def test_reply_header_negates_errno():
    assert struct.unpack("<IiQ", proto.reply_header(5, 0, 2)) == (16, -2, 5)
    assert struct.unpack("<IiQ", proto.reply_header(5, 100)) == (116, 0, 5)


def test_entry_and_attr_layout():
    attr = proto.Attr(ino=43, mode=stat.S_IFREG | 0o4755, size=1000, uid=70000, gid=5,
                      mtime_ns=-1_500_000_000, rdev=0, nlink=1)
    out = proto.entry_out(attr, 1.5)
    assert len(out) == 40 + 88
    nodeid, gen, entry_valid, attr_valid, entry_nsec, attr_nsec = \
        struct.unpack_from("<QQQQII", out)
    assert (nodeid, gen, entry_valid, attr_valid, entry_nsec, attr_nsec) == \
        (43, 0, 1, 1, 500_000_000, 500_000_000)
    fields = struct.unpack_from("<QQQqqqIIIIIIIIII", out, 40)
    ino, size, blocks, _, mtime, _, _, mtime_ns, _, mode, nlink, uid, gid, _, blksize, _ = \
        fields
    assert (ino, size, blocks, mode, nlink, uid, gid, blksize) == \
        (43, 1000, 2, stat.S_IFREG | 0o4755, 1, 70000, 5, 4096)
    assert mtime * 1_000_000_000 + mtime_ns == -1_500_000_000  # before 1970


def test_negative_entry_has_node_zero_and_a_timeout():
    out = proto.entry_out(None, 60)
    assert struct.unpack_from("<QQQQ", out) == (0, 0, 60, 0)


def test_init_reply_grants_only_what_the_kernel_offered():
    out = proto.init_out(45, 131072, proto.ASYNC_READ | proto.MAX_PAGES,
                         proto.ASYNC_READ | proto.POSIX_ACL | proto.MAX_PAGES)
    assert len(out) == 64
    major, minor, readahead, flags = struct.unpack_from("<IIII", out)
    assert (major, minor, readahead, flags) == \
        (7, proto.MINOR, 131072, proto.ASYNC_READ | proto.MAX_PAGES)
    assert struct.unpack_from("<H", out, 28)[0] == 256  # max_pages


def test_xattr_size_query():
    assert proto.xattr_out(b"abc", 0) == struct.pack("<II", 3, 0)
    assert proto.xattr_out(b"abc", 10) == b"abc"


def test_direntplus_buffer_pads_names_and_stops_when_full():
    attr = proto.Attr(ino=9, mode=stat.S_IFLNK | 0o777)
    one = 128 + 24 + 8  # entry_out, dirent, a 5-byte name padded to 8
    buf = proto.DirentBuffer(2 * one + 10)
    assert buf.add(b"link1", attr, 1, 60) and buf.add(b"link2", attr, 2, 60)
    assert not buf.add(b"link3", attr, 3, 60)
    data = buf.payload()
    assert len(data) == 2 * one
    ino, off, namelen, kind = struct.unpack_from("<QQII", data, one + 128)
    assert (ino, off, namelen, kind) == (9, 2, 5, stat.S_IFLNK >> 12)
    assert data[one + 152:one + 160] == b"link2\0\0\0"


def test_plain_dirents_have_no_entry_part():
    attr = proto.Attr(ino=12, mode=stat.S_IFDIR | 0o755)
    buf = proto.DirentBuffer(4096, plus=False)
    assert buf.add(b"a-directory", attr, 1, 60)
    assert buf.payload() == struct.pack("<QQII", 12, 1, 11, stat.S_IFDIR >> 12) + \
        b"a-directory\0\0\0\0\0"
