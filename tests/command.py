"""Running the installed ``cafuse`` command as a user would."""

import subprocess
import sys
from pathlib import Path

CAFUSE = str(Path(sys.executable).parent / "cafuse")


def run(*args, ok=True, timeout=300, **kwargs):
    done = subprocess.run([CAFUSE, *map(str, args)], capture_output=True,
                          timeout=timeout, **kwargs)
    if ok:
        assert done.returncode == 0, done.stderr.decode()
    return done


def fails(*args, match, **kwargs):
    """The command fails cleanly: exit 1, one line on stderr, nothing on stdout."""
    done = run(*args, ok=False, **kwargs)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    errors = [line for line in err.splitlines() if line.startswith("cafuse: error: ")]
    assert len(errors) == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert match in errors[0], err
    assert done.stdout == b""
    return errors[0]
