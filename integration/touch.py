"""Touching a mount from a subprocess, under a timeout, so that a hung
mount fails a test instead of hanging the suite."""

import pickle
import subprocess
import sys

WALK = """
import pickle, sys
sys.path.insert(0, sys.argv[2])
import oracle
sys.stdout.buffer.write(pickle.dumps(oracle.walk_fs(sys.argv[1].encode())))
"""


def walk(root, tests_dir, timeout=120) -> dict:
    done = subprocess.run([sys.executable, "-c", WALK, str(root), str(tests_dir)],
                          capture_output=True, timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()
    return pickle.loads(done.stdout)


def sh(*cmd, timeout=60, check=True, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout,
                          **kwargs)
    if check:
        assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done
