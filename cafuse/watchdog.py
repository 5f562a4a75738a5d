"""``python -m cafuse.watchdog MOUNTPOINT DEVICE PID``: take a dead mount down.

The mount process PID starts this with a pipe on its standard input and
writes "done" to it once it has unmounted.  If the pipe ends without that
word, or PID is gone or a zombie (a thread of it can be stuck in the
kernel, waiting for a request only the dead process would have answered),
the connection is aborted and the mount at MOUNTPOINT, if it is still the
same DEVICE, is unmounted: a dead mount never lingers.  (fusermount3's
auto_unmount cannot be used: it unmounts only if opening the mount point
fails, and the kernel opens a directory without asking a daemon that
declined OPENDIR.)
"""

import os
import select
import signal
import subprocess
import sys

from .mountinfo import abort_connection, device_of


def main(argv: list[str]) -> int:
    mountpoint, device, pid = argv
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    said = b""
    while _alive(int(pid)):
        if select.select([0], [], [], 1.0)[0]:
            data = os.read(0, 64)
            if not data:
                break
            said += data
    while select.select([0], [], [], 0)[0]:  # what it said just before it ended
        data = os.read(0, 64)
        if not data:
            break
        said += data
    if said == b"done":
        return 0
    if device_of(mountpoint) == device:
        abort_connection(device)
        subprocess.run(["fusermount3", "-u", "-z", "-q", "--", mountpoint],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
