"""A FUSE session: the mount, the /dev/fuse descriptor, the request loop.

The kernel's FUSE device is read and written directly (the wire format is
in fuseproto).  That gives the file system what pyfuse3 hides: the node id
of every READ and READDIRPLUS, so it can decline OPEN and OPENDIR, after
which the kernel sends no OPEN, FLUSH, RELEASE, OPENDIR or RELEASEDIR and
keeps pages and listings itself; and a loop short enough that a metadata
request costs about 20 us instead of 60 (docs/architecture.md).

The mount is made by ``fusermount3``, which hands the device back through a
socket (the ``_FUSE_COMMFD`` protocol that libfuse uses), so it works for
root and for users alike.
"""

import errno
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Awaitable, Callable

import trio

from . import fuseproto as proto
from .errors import CafuseError
from .mountinfo import abort_connection, canonical, device_of

log = logging.getLogger("cafuse")

# After a request, keep asking the device for the next one this long before
# sleeping in epoll: on a VM, waking a sleeping daemon on another CPU costs
# ~35 us per request, and a sequential reader sends its next request sooner.
SPIN_NS = 100_000
YIELD_EVERY = 16  # requests handled between checkpoints when busy


class FuseError(Exception):
    """Answer the current request with this errno."""

    def __init__(self, errno_: int):
        super().__init__(os.strerror(errno_))
        self.errno = errno_


Reply = bytes | None
Handler = Callable[[proto.Request], "Reply | Awaitable[Reply]"]


def _escape(option: str) -> str:
    return option.replace("\\", "\\\\").replace(",", "\\,")


class Mount:
    """A FUSE mount made by fusermount3, and a watchdog process that
    unmounts it if this process dies without doing so (cafuse.watchdog)."""

    def __init__(self, mountpoint: str, options: list[str]):
        # Resolved here: fusermount3 takes no symlink for a mount point.
        self.mountpoint = mountpoint = canonical(mountpoint)
        self.fd = _fusermount(mountpoint, options)
        self.device = device_of(mountpoint) or "?"
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "cafuse.watchdog", mountpoint, self.device,
                 str(os.getpid())],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            self._watchdog = None
            self.close()
            raise CafuseError(f"{mountpoint}: cannot start the mount's watchdog: "
                              f"{e.strerror}") from None

    def close(self) -> None:
        """Unmount (lazily: files still open keep it until they close), if
        the mount there is still this one: once detached (``cafuse umount
        -l``), the mount point may hold another mount by now."""
        if self.device == "?" or device_of(self.mountpoint) == self.device:
            subprocess.run(["fusermount3", "-u", "-z", "-q", "--", self.mountpoint],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        abort_connection(self.device)
        os.close(self.fd)
        if self._watchdog is not None:
            try:
                self._watchdog.stdin.write(b"done")
                self._watchdog.stdin.close()
            except OSError:
                pass
            self._watchdog.wait()


def _fusermount(mountpoint: str, options: list[str]) -> int:
    """Mount; the FUSE device's descriptor, which fusermount3 sends back
    through a socket (the _FUSE_COMMFD protocol of libfuse)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            done = subprocess.run(
                ["fusermount3", "-o", ",".join(map(_escape, options)), "--", mountpoint],
                env=env, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=60)
        except FileNotFoundError:
            raise CafuseError("fusermount3 not found: install the fuse3 package") from None
        if done.returncode:
            lines = done.stderr.strip().splitlines()
            raise CafuseError(f"{mountpoint}: cannot mount: "
                              f"{lines[-1] if lines else 'fusermount3 failed'}")
        theirs.close()
        ours.settimeout(60)
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise CafuseError(f"{mountpoint}: cannot mount: fusermount3 sent no device")
    return fds[0]


class Session:
    """Serves one mounted file system until it is unmounted.

    ``handlers`` maps opcodes to functions of a Request that return the
    reply body, or None for no reply, or an awaitable of either when the
    answer needs I/O; a FuseError raised by either becomes an error reply.
    Immediate answers are written at once in the loop; awaitables run as
    tasks in the session's nursery, so a slow read never holds up a stat.
    """

    def __init__(self, fd: int, handlers: dict[int, Handler], init_flags: int):
        self.fd = fd
        self.handlers = handlers
        self.init_flags = init_flags
        self.initialized = trio.Event()
        os.set_blocking(fd, False)

    async def run(self) -> None:
        """Serve until the file system is unmounted."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self._loop()
            nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        handled = 0
        while True:
            buf = await self._next_request()
            if buf is None:
                return
            self._dispatch(proto.parse_request(buf))
            handled += 1
            if handled % YIELD_EVERY == 0:
                await trio.lowlevel.checkpoint()

    async def _next_request(self) -> bytes | None:
        """The next request, or None once the mount is gone."""
        while True:
            buf = self._read(spin=True)
            if buf is not None:
                return buf if buf else None
            await trio.lowlevel.wait_readable(self.fd)
            buf = self._read(spin=False)
            if buf is not None:
                return buf if buf else None

    def _read(self, spin: bool) -> bytes | None:
        """A request, b"" at the end, None if none is waiting (after
        spinning, if allowed and nothing else in trio wants to run)."""
        deadline = None
        while True:
            try:
                return os.read(self.fd, proto.BUFFER_SIZE)
            except BlockingIOError:
                pass
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # the request was interrupted meanwhile
                    continue
                if e.errno == errno.ENODEV:  # unmounted
                    return b""
                raise
            if not spin:
                return None
            now = time.perf_counter_ns()
            if deadline is None:
                stats = trio.lowlevel.current_statistics()
                if stats.tasks_runnable or stats.run_sync_soon_queue_size:
                    return None
                deadline = now + SPIN_NS
            elif now > deadline:
                return None

    def _dispatch(self, req: proto.Request) -> None:
        handler = self.handlers.get(req.opcode)
        if req.opcode == proto.INIT:
            self._reply(req, self._init(req))
            # The kernel applies the reply while we write it: from here on
            # the mount's settings (its bdi read-ahead) are final.
            self.initialized.set()
            return
        if handler is None:
            if req.opcode not in proto.NO_REPLY:
                self._error(req, errno.ENOSYS)
            return
        try:
            result = handler(req)
        except FuseError as e:
            self._error(req, e.errno)
            return
        except Exception as e:  # a bug must cost one request, not the mount
            self._failed(req, e)
            return
        if result is None or isinstance(result, bytes):
            if req.opcode not in proto.NO_REPLY:
                self._reply(req, result or b"")
            return
        self._nursery.start_soon(self._finish, req, result)

    async def _finish(self, req: proto.Request, pending: Awaitable[Reply]) -> None:
        try:
            result = await pending
        except FuseError as e:
            self._error(req, e.errno)
        except Exception as e:
            self._failed(req, e)
        else:
            self._reply(req, result or b"")

    def _init(self, req: proto.Request) -> bytes:
        major, minor, max_readahead, flags = proto.init_arg(req.body)
        if major != proto.MAJOR or minor < 26:
            log.error("kernel FUSE protocol %d.%d is too old (7.26 needed)", major, minor)
            raise CafuseError(f"unsupported kernel FUSE protocol {major}.{minor}")
        return proto.init_out(minor, max_readahead, flags, self.init_flags)

    def store(self, nodeid: int, offset: int, data: bytes) -> bool:
        """Put ``data`` into the kernel's page cache of ``nodeid`` at
        ``offset``; False if the kernel no longer holds that node."""
        try:
            os.writev(self.fd, [proto.notify_store(nodeid, offset, len(data)), data])
        except OSError as e:  # ENOENT: forgotten; the kernel reads it itself then
            log.debug("NOTIFY_STORE of node %d refused: %s", nodeid, e.strerror)
            return False
        return True

    def _failed(self, req: proto.Request, error: Exception) -> None:
        log.error("FUSE request %d on node %d failed: %r", req.opcode, req.nodeid, error)
        self._error(req, errno.EIO)

    def _reply(self, req: proto.Request, payload: bytes) -> None:
        if not self._write([proto.reply_header(req.unique, len(payload)), payload]):
            # The kernel refused the reply (EINVAL: a bug here): that one
            # request fails, the mount goes on.
            log.error("the kernel refused the reply to FUSE request %d", req.opcode)
            self._error(req, errno.EIO)

    def _error(self, req: proto.Request, code: int) -> None:
        self._write([proto.reply_header(req.unique, 0, code)])

    def _write(self, parts: list[bytes]) -> bool:
        """False if the kernel refused the message; a request that is gone
        (interrupted, ENOENT) or a mount that is gone (ENODEV) is no error."""
        try:
            os.writev(self.fd, parts)
        except OSError as e:
            return e.errno in (errno.ENOENT, errno.ENODEV)
        return True
