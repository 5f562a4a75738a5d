"""How `mount --background` ends a child it gives up on (the whole flow,
with a real mount, is in integration/test_mount.py), and the file a blob
mount shows."""

import os
import subprocess
import sys
import threading

import pytest
import trio

from cafuse import daemon
from cafuse.inputs import Options, open_input


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


def test_a_blob_file_is_named_after_its_index_or_blob(casync_archive, tmp_path):
    made = casync_archive("blob1m")

    async def name_for(index_name):
        index = tmp_path / index_name
        index.write_bytes(made.index.read_bytes())
        inp = await open_input(str(index), Options(stores=[str(made.store)], no_cache=True))
        fs = await daemon.build_fs(inp)
        await inp.aclose()
        return fs.name

    for index_name, name in (("disk.img.caibx", b"disk.img"), ("..caibx", b"blob"),
                             ("...caibx", b"blob"), (".caibx", b"blob"),
                             (".hidden.caibx", b".hidden")):
        assert trio.run(name_for, index_name) == name, index_name
