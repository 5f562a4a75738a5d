"""The watchdog's side of its contract with a mount process (the unmount
itself is tested with real FUSE in integration/test_mount.py)."""

import subprocess
import sys
import time


def watchdog(pid, mountpoint="/nonexistent-cafuse-mountpoint"):
    return subprocess.Popen([sys.executable, "-m", "cafuse.watchdog", mountpoint, "0:0",
                             str(pid)], stdin=subprocess.PIPE)


def test_done_ends_it_at_once():
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        dog = watchdog(sleeper.pid)
        dog.stdin.write(b"done")
        dog.stdin.close()
        assert dog.wait(timeout=10) == 0
    finally:
        sleeper.kill()
        sleeper.wait()


def test_it_notices_a_zombie_even_with_its_pipe_open():
    sleeper = subprocess.Popen(["sleep", "60"])
    dog = watchdog(sleeper.pid)
    try:
        time.sleep(0.5)
        assert dog.poll() is None  # the process lives: it waits
        sleeper.kill()  # not reaped yet: a zombie, as a killed daemon with a stuck thread
        assert dog.wait(timeout=10) == 0  # though our end of the pipe is still open
        sleeper.wait()
    finally:
        dog.stdin.close()
        if dog.poll() is None:
            dog.kill()
