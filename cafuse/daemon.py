"""Running a mount: checks, the FUSE session, signals, background mode.

``cafuse mount`` in the foreground serves until SIGINT/SIGTERM or an
external unmount, then unmounts.  With ``--background`` the command forks:
the child mounts and reports "ready" (or the error) through a pipe, and the
parent exits 0 only once the mount is usable, or 1 with the child's error,
leaving nothing mounted.
"""

import errno
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import trio

from .archive import Archive
from . import fusesession
from .errors import CafuseError, FormatError, UsageError, first_error
from .http import shown
from .inputs import Input, Options, open_input
from .mount import INIT_FLAGS, BlobFS, TreeFS
from .mountinfo import canonical, device_of, mount_at
from .signals import heeded, stop_like_sigint
from .store import is_url

log = logging.getLogger("cafuse")


@dataclass
class MountRequest:
    index: str
    mountpoint: str
    options: Options
    fuse_options: list[str]


READ_AHEAD_KB = 1024
SUBTYPE = "cafuse"   # the mount's type is fuse.cafuse
STOP_GRACE = 10.0    # seconds a background child given up has to unmount


def mounted(mountpoint: str) -> bool:
    """Whether ``mountpoint`` is a mount point now."""
    return device_of(mountpoint) is not None


async def raise_read_ahead(mountpoint: str, session: fusesession.Session) -> None:
    """Let the kernel read ahead 1 MiB instead of 128 KiB: sequential reads
    then reach us as 1 MiB requests (about 2x the throughput).  Needs root;
    without it the default stays.  The kernel sets the read-ahead when it
    processes the FUSE INIT reply, so this waits until that is done."""
    await session.initialized.wait()
    device = device_of(mountpoint)
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.info("read-ahead of %s stays at the default: %s", mountpoint, e.strerror)


def check_mountpoint(mountpoint: str) -> None:
    # mountinfo first: isdir on a hung mount would hang.
    if mounted(mountpoint):
        raise UsageError(f"{mountpoint}: something is already mounted there")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: mount point is not an existing directory")


async def build_fs(inp: Input):
    """The file system for an input, after reading what proves it works:
    the root's records for a tree, the first chunk for a blob."""
    stream = inp.source
    mtime_ns = (time.time_ns() if is_url(inp.path)
                else os.stat(inp.path).st_mtime_ns)
    if inp.is_tree:
        archive = Archive(stream)
        try:
            root = await archive.root()
            await archive.places(root)
        except FormatError as e:  # e.g. a blob index named .caidx
            raise e.named(inp.path) from None
        return TreeFS(stream, root, mtime_ns)
    if stream.size:
        await stream.read(0, 1)
    path = urlsplit(inp.path).path if is_url(inp.path) else inp.path
    name = os.path.basename(path.rstrip("/")).removesuffix(".caibx")
    if name in ("", ".", ".."):  # no name a directory entry can have
        name = "blob"
    return BlobFS(stream, name, mtime_ns)


async def serve(request: MountRequest, ready) -> None:
    """Mount, call ``ready()``, serve until a signal or an unmount."""
    inp = await open_input(request.index, request.options)
    if inp.index is None:
        await inp.aclose()
        raise UsageError(f"{shown(request.index)}: mount takes a .caidx or .caibx index")
    try:
        fs = await build_fs(inp)
        options = ["ro", "default_permissions", f"subtype={SUBTYPE}",
                   f"fsname={shown(request.index)}", *request.fuse_options]
        mount = fusesession.Mount(request.mountpoint, options)
        try:
            session = fusesession.Session(mount.fd, fs.handlers(), INIT_FLAGS)
            async with trio.open_nursery() as nursery:
                fs.nursery, fs.session = nursery, session
                background = _Background(fs)
                nursery.start_soon(background.run)
                nursery.start_soon(inp.source.engine.maintain)
                nursery.start_soon(_stop_on_signal, background, nursery.cancel_scope)
                nursery.start_soon(raise_read_ahead, request.mountpoint, session)
                ready()
                await session.run()
                nursery.cancel_scope.cancel()
        finally:
            mount.close()
    finally:
        await inp.aclose()


class _Background:
    """The file system's own work (pushing pages ahead of a walk), stopped
    before the session: a page push may wait for a READ of the same page,
    which only a running session answers."""

    def __init__(self, fs):
        self.fs = fs
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def run(self):
        with self.scope:
            await self.fs.background()
        self.done.set()

    async def stop(self, grace: float = 5.0):
        self.scope.cancel()
        with trio.move_on_after(grace):
            await self.done.wait()


async def _stop_on_signal(background: _Background, scope: trio.CancelScope):
    signums = heeded(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    if not signums:  # all ignored: only an unmount ends the mount
        await trio.sleep_forever()
    with trio.open_signal_receiver(*signums) as signals:
        async for signum in signals:
            log.info("%s: unmounting", signal.Signals(signum).name)
            await background.stop()
            scope.cancel()
            return


def run_foreground(request: MountRequest) -> None:
    trio.run(serve, request, lambda: log.info("mounted %s on %s", shown(request.index),
                                              request.mountpoint))


def run_background(request: MountRequest, log_file: str | None) -> None:
    """Fork; return in the parent once the child's mount is ready, raise
    CafuseError with the child's error otherwise."""
    try:
        log_fd = os.open(log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        raise CafuseError(f"{log_file}: {e.strerror}") from None
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: serve, and say how the mount went
        os.close(rfd)
        _detach(log_fd)
        code = 0
        try:
            trio.run(serve, request, lambda: _say(wfd, "ready"))
        except BaseException as e:  # reported to the parent, whatever it is
            log.error("%s", _message(e))
            _say(wfd, f"error\t{_message(e)}")
            code = 1
        os._exit(code)
    os.close(wfd)
    os.close(log_fd)
    stop_like_sigint(signal.SIGTERM, signal.SIGHUP)
    try:
        with os.fdopen(rfd, "r") as pipe:
            reply = pipe.readline().rstrip("\n")
    except KeyboardInterrupt:  # the mount is given up: so is the child
        _stop_child(pid)
        raise
    if reply == "ready":
        return
    if reply.startswith("error\t"):
        raise CafuseError(reply.partition("\t")[2])
    os.waitpid(pid, 0)
    raise CafuseError("the mount process ended before the mount was ready")


def _stop_child(pid):
    """End the child, which unmounts if it had mounted (else the
    mount's watchdog does), and wait for it."""
    os.kill(pid, signal.SIGTERM)
    given_up = time.monotonic() + STOP_GRACE
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > given_up:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.05)


def _detach(log_fd):
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.chdir("/")  # not to keep the directory it was started in busy


def _say(fd, text):
    try:
        os.write(fd, (text + "\n").encode())
    except OSError:
        pass


def _message(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        found = first_error(error)
        if found is not None:
            return str(found)
    if isinstance(error, OSError):
        return f"{error.filename + ': ' if error.filename else ''}{error.strerror or error}"
    return str(error) or type(error).__name__


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount a cafuse mount, and nothing else (root may unmount anything);
    ``lazy``: detach it now, and let it end once nothing under it is in use."""
    found = mount_at(mountpoint)
    if found is None:
        raise UsageError(f"{mountpoint}: not mounted")
    if found[1] != f"fuse.{SUBTYPE}":
        raise UsageError(f"{mountpoint}: not a cafuse mount (a {found[1]} mount)")
    done = subprocess.run(["fusermount3", "-u", *(["-z"] if lazy else []), "--",
                           canonical(mountpoint)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode:
        reason = done.stderr.strip() or os.strerror(errno.EBUSY)
        if os.strerror(errno.EBUSY) in reason:
            reason += (" (a file or directory under it is in use; "
                       "-l detaches it now, and it ends once none is)")
        raise CafuseError(f"{mountpoint}: cannot unmount: {reason}")
