"""`make demo` (demo/demo.sh, which make runs after its set-up): it must
mount over HTTP, show the tree, and fetch only a few chunks."""

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("fuse_ready")
REPO = Path(__file__).resolve().parent.parent


def test_the_demo_runs_and_reads_lazily():
    done = subprocess.run(["sh", str(REPO / "demo" / "demo.sh")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hello from a casync archive" in done.stdout
    fetched, total = map(int, re.search(r"chunks fetched so far: (\d+) of (\d+)",
                                        done.stdout).groups())
    assert 0 < fetched < total / 4
    with open("/proc/self/mountinfo") as f:
        assert "cafuse-demo" not in f.read()
