"""Integration fixtures: the tests/ fixtures, plus FUSE mounts that are
always taken down, even when a test fails."""

import os
import signal
import subprocess
import time
from contextlib import contextmanager

import pytest

from command import CAFUSE
from casync_fixtures import require


def is_mounted(path) -> bool:
    # mountinfo spells a space, tab, newline and backslash in octal.
    target = os.fsencode(os.path.realpath(path))
    for char in b"\\ \t\n":  # the backslash first
        target = target.replace(bytes([char]), b"\\%03o" % char)
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split(b" ")[4] == target for line in f)


def teardown_mount(path):
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=30)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def start_foreground(index, mountpoint, *args, ignoring=()) -> subprocess.Popen:
    """``cafuse mount`` in the foreground, once its mount is up, started
    with the signals ``ignoring`` ignored (as nohup does); the caller stops
    it (and calls teardown_mount)."""
    mountpoint.mkdir(parents=True, exist_ok=True)

    def ignore():
        for signum in ignoring:
            signal.signal(signum, signal.SIG_IGN)
    proc = subprocess.Popen([CAFUSE, "mount", *map(str, args), str(index), str(mountpoint)],
                            stderr=subprocess.PIPE, preexec_fn=ignore)
    deadline = time.monotonic() + 30
    while not is_mounted(mountpoint):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"the mount did not come up: {proc.communicate()[1]!r}")
        time.sleep(0.02)
    return proc


@contextmanager
def in_the_foreground(index, mountpoint, *args, ignoring=()):
    """``start_foreground``; the process is killed if it is still running
    afterwards, and the mount torn down, whatever happens."""
    proc = start_foreground(index, mountpoint, *args, ignoring=ignoring)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        teardown_mount(mountpoint)


@contextmanager
def mounted(index, mountpoint, *args):
    """``cafuse mount --background``; unmounted afterwards whatever happens."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([CAFUSE, "mount", "--background", *map(str, args), str(index),
                           str(mountpoint)], capture_output=True, text=True, timeout=120)
    try:
        assert done.returncode == 0, done.stderr
        assert is_mounted(mountpoint)
        yield mountpoint
    finally:
        teardown_mount(mountpoint)


@pytest.fixture(scope="session")
def fuse_ready():
    require(os.geteuid() == 0, "mount tests need root")
    require(os.path.exists("/dev/fuse"), "mount tests need /dev/fuse")
