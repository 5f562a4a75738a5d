"""SIGTERM and SIGHUP made to stop a command as SIGINT does.

Python turns SIGINT into KeyboardInterrupt wherever the main thread is,
even blocked in a write, and trio delivers it into the running task; what
the command was doing is then unwound and cleaned up.  The other signals
that ask a process to end get the same treatment, and the command's exit
status still names the signal that came.
"""

import signal

_received: list[int] = []


def heeded(*signums: int) -> list[int]:
    """Those of ``signums`` that this process does not ignore: one that it
    was started ignoring (SIGHUP under nohup, SIGINT in a background job
    of a script) stays ignored."""
    return [signum for signum in signums if signal.getsignal(signum) is not signal.SIG_IGN]


def stop_like_sigint(*signums: int) -> None:
    """Make those of ``signums`` that are ``heeded`` raise
    KeyboardInterrupt as SIGINT does."""
    def interrupt(signum, _frame):
        _received.append(signum)
        signal.raise_signal(signal.SIGINT)
    for signum in heeded(*signums):
        signal.signal(signum, interrupt)


def stopping_signal() -> int:
    """The signal that stopped the command: the first that came, or SIGINT."""
    return _received[0] if _received else signal.SIGINT
