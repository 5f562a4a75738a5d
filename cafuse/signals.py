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
    KeyboardInterrupt as SIGINT does, by calling SIGINT's handler (trio's,
    once it runs).  Where SIGINT itself is ignored, it stays ignored in
    effect: it is blocked, so that its handler can be Python's, which trio
    takes over, for the other signals to call."""
    stoppers = heeded(*signums)
    if stoppers and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def interrupt(signum, frame):
        _received.append(signum)
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)
    for signum in stoppers:
        signal.signal(signum, interrupt)


def stopping_signal() -> int:
    """The signal that stopped the command: the first that came, or SIGINT."""
    return _received[0] if _received else signal.SIGINT
