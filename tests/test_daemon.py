"""How `mount --background` ends a child it gives up on (the whole flow,
with a real mount, is in integration/test_mount.py)."""

import os
import subprocess
import sys
import threading

import pytest

from cafuse import daemon


def child(ignores_sigterm: bool) -> subprocess.Popen:
    """A child process, ready once it has said so on stdout."""
    setup = "signal.signal(signal.SIGTERM, signal.SIG_IGN)" if ignores_sigterm else ""
    proc = subprocess.Popen(
        [sys.executable, "-c", f"import signal, time\n{setup}\nprint('ready', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"ready\n"
    return proc


@pytest.mark.parametrize("ignores_sigterm", [False, True], ids=["stops", "ignores SIGTERM"])
def test_a_child_given_up_on_is_ended_and_reaped(monkeypatch, ignores_sigterm):
    monkeypatch.setattr(daemon, "STOP_GRACE", 0.3)
    proc = child(ignores_sigterm)
    stopper = threading.Thread(target=daemon._stop_child, args=(proc.pid,), daemon=True)
    try:
        stopper.start()
        stopper.join(timeout=10)
        assert not stopper.is_alive(), "_stop_child still waits for the child"
        # Reaped by _stop_child: the pid is no child of ours any more.
        with pytest.raises(ChildProcessError):
            os.waitpid(proc.pid, 0)
    finally:
        proc.kill()
