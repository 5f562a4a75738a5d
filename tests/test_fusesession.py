"""The request loop (fusesession.Session) without a kernel: a SEQPACKET
socket pair stands in for /dev/fuse, one request or reply per message."""

import errno
import os
import socket
import struct

import trio

from cafuse import fuseproto as proto
from cafuse.fusesession import FuseError, Session

KERNEL_FLAGS = proto.ASYNC_READ | proto.MAX_PAGES | proto.POSIX_ACL


def request(opcode, unique, body=b"", nodeid=1):
    return struct.pack("<IIQQIIIHH", 40 + len(body), opcode, unique, nodeid, 0, 0, 0, 0,
                       0) + body


def init_request(unique=1, minor=38):
    return request(proto.INIT, unique, struct.pack("<IIIII", 7, minor, 131072,
                                                   KERNEL_FLAGS, 0) + bytes(44))


def reply(raw):
    """(unique, error, payload) of one reply message."""
    length, error, unique = struct.unpack_from("<IiQ", raw)
    assert length == len(raw)
    return unique, -error, raw[16:]


def serve(handlers, messages, replies_wanted):
    """Send ``messages`` to a Session over a socket pair; the replies."""
    kernel, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    replies = []

    async def run():
        session = Session(daemon.fileno(), handlers, proto.ASYNC_READ | proto.POSIX_ACL)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run)
            for message in messages:
                kernel.send(message)
            kernel.setblocking(False)
            with trio.fail_after(10):
                while len(replies) < replies_wanted:
                    await trio.lowlevel.wait_readable(kernel)
                    replies.append(reply(kernel.recv(1 << 20)))
            kernel.close()  # the session sees the end, as on unmount
        return session

    try:
        session = trio.run(run)
    finally:
        daemon.close()
    return session, replies


def test_init_grants_what_both_sides_have():
    session, replies = serve({}, [init_request()], 1)
    (unique, error, payload), = replies
    assert (unique, error, len(payload)) == (1, 0, 64)
    major, minor, _, flags = struct.unpack_from("<IIII", payload)
    assert (major, minor, flags) == (7, proto.MINOR, proto.ASYNC_READ | proto.POSIX_ACL)
    assert session.initialized.is_set()


def test_errors_unknown_opcodes_and_silent_ones():
    def broken(req):
        raise KeyError("a bug")

    def missing(req):
        raise FuseError(errno.ENOENT)

    handlers = {proto.GETATTR: broken, proto.LOOKUP: missing,
                proto.FORGET: lambda req: None}
    messages = [init_request(),
                request(proto.FORGET, 2, struct.pack("<Q", 1)),  # never answered
                request(proto.GETATTR, 3), request(proto.LOOKUP, 4, b"x\0"),
                request(proto.OPEN, 5, struct.pack("<II", 0, 0))]
    _, replies = serve(handlers, messages, 4)
    assert [(u, e) for u, e, _ in replies[1:]] == \
        [(3, errno.EIO), (4, errno.ENOENT), (5, errno.ENOSYS)]


def test_a_slow_request_does_not_hold_up_a_quick_one():
    release = trio.Event()

    async def slow(req):
        await release.wait()
        return b"slow"

    def quick(req):
        release.set()
        return b"quick"

    handlers = {proto.READ: slow, proto.GETATTR: quick}
    _, replies = serve(handlers, [init_request(), request(proto.READ, 2),
                                  request(proto.GETATTR, 3)], 3)
    assert [(u, p) for u, _, p in replies[1:]] == [(3, b"quick"), (2, b"slow")]


def test_store_writes_a_notify_store_message():
    kernel, daemon = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with kernel, daemon:
        session = Session(daemon.fileno(), {}, 0)
        assert session.store(42, 4096, b"data")
        raw = kernel.recv(4096)
        assert struct.unpack_from("<IiQ", raw) == (len(raw), proto.NOTIFY_STORE, 0)
        assert struct.unpack_from("<QQII", raw, 16) == (42, 4096, 4, 0)
        assert raw[40:] == b"data"
        kernel.close()
        os.set_blocking(daemon.fileno(), True)
        assert not session.store(42, 0, b"x")  # refused: no exception
