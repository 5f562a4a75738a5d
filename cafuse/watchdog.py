"""``python -m cafuse.watchdog MOUNTPOINT DEVICE``: take a dead mount down.

A mounting process starts this with a pipe on its standard input and
writes "done" to it once it has unmounted.  If the pipe ends without that
word, the process died (SIGKILL, a crash), and the mount it left at
MOUNTPOINT, still there if it is the same device, is unmounted, so a dead
mount never lingers.  (fusermount3's auto_unmount cannot be used: it
unmounts only if opening the mount point fails, and the kernel opens a
directory without asking a daemon that declined OPENDIR.)
"""

import signal
import subprocess
import sys

from .mountinfo import device_of


def main(argv: list[str]) -> int:
    mountpoint, device = argv
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if sys.stdin.buffer.read() == b"done":
        return 0
    if device_of(mountpoint) == device:
        subprocess.run(["fusermount3", "-u", "-z", "-q", "--", mountpoint],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
