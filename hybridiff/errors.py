"""One exception type for every problem a user can fix, and one for signals.

The CLI prints ``error: <message>`` and exits with status 2 for ``HybridiffError``, so each
message must name the problem and the fix on one line. A signal (Ctrl-C, SIGTERM) raises
``Interrupted`` wherever the program is; the command cleans up, prints one line and exits
with 128 + the signal's number (130, 143), as shells expect.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NoReturn


class HybridiffError(Exception):
    """A user-facing error: bad input, a mismatched plan, an unsupported model."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so ``except Exception`` never swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def one_line(error: BaseException) -> str:
    """A user error's message; a signal's name; else the exception's type and last line."""
    if isinstance(error, HybridiffError):
        return str(error)
    if isinstance(error, (Interrupted, KeyboardInterrupt)):
        return f"interrupted by {error if isinstance(error, Interrupted) else 'SIGINT'}"
    last = (str(error).strip().splitlines() or [""])[-1]
    return f"{type(error).__name__}: {last}"


def report_and_exit(error: HybridiffError) -> NoReturn:
    """Print the one-line message a user sees and exit with status 2."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)


def one_line_when_uncaught() -> None:
    """From now on, a ``HybridiffError`` nothing catches ends the process as the CLI does: one
    ``error:`` line and exit status 2, after the exit handlers ran (the leave-together barrier
    of a process group ``parallelize`` created), instead of a traceback and status 1. Set by
    ``parallelize`` under torchrun, where each rank is a user's script; other exceptions
    reach the hook that was there before."""
    previous = sys.excepthook
    if getattr(previous, "one_line", False):
        return

    def hook(kind: type[BaseException], error: BaseException, tb: Any) -> None:
        if not issubclass(kind, HybridiffError):
            previous(kind, error, tb)
            return
        print(f"error: {error}", file=sys.stderr, flush=True)
        atexit._run_exitfuncs()
        sys.stdout.flush()
        os._exit(2)

    hook.one_line = True  # type: ignore[attr-defined]
    sys.excepthook = hook


#: How long a signal waits for the main thread to raise ``Interrupted`` before ``stop_promptly``
#: ends the process without it: the main thread runs Python's handler only between bytecodes,
#: so one long native call (attention over a million tokens) would hold it for minutes.
SIGNAL_GRACE_S = 1.5

_answered = threading.Event()
#: Set while a launcher's own handlers own the signals (``paused_promptness``).
_paused = threading.Event()


def _raise_interrupted(signum: int, _frame: Any) -> None:
    _answered.set()
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise ``Interrupted`` in the main thread."""
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)


@contextmanager
def stop_promptly() -> Iterator[None]:
    """Inside: SIGINT or SIGTERM ends the process within ``SIGNAL_GRACE_S`` even while the main
    thread is inside native code. Python's C-level handler writes each signal to a wakeup pipe
    at once; a thread reading it gives the main thread the grace to raise ``Interrupted`` and
    clean up, and otherwise prints the one line and exits with 128 + the signal. For work that
    leaves nothing half-done when cut short (costing a model); call from the main thread."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = signal.set_wakeup_fd(write_fd)
    done = threading.Event()
    watcher = threading.Thread(target=_end_unanswered, args=(read_fd, done), name="hybridiff-signals", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        done.set()
        os.close(write_fd)  # wakes the watcher, which closes its end


@contextmanager
def paused_promptness() -> Iterator[None]:
    """Inside: ``stop_promptly`` leaves signals to other handlers (torch's elastic launcher
    answers them by stopping its workers first, which must not be cut short)."""
    _paused.set()
    try:
        yield
    finally:
        _paused.clear()


def _end_unanswered(read_fd: int, done: threading.Event) -> None:
    """``stop_promptly``'s watcher: each signal read from the pipe either gets its ``Interrupted``
    raised in the grace, or ends the process."""
    try:
        while not done.is_set():
            select.select([read_fd], [], [])
            signals = os.read(read_fd, 64)
            wanted = [s for s in signals if s in (signal.SIGINT, signal.SIGTERM)]
            if not wanted or done.is_set() or _paused.is_set() or _answered.wait(SIGNAL_GRACE_S):
                _answered.clear()
                continue
            print(f"error: interrupted by {signal.Signals(wanted[0]).name}", file=sys.stderr, flush=True)
            os._exit(128 + wanted[0])
    finally:
        os.close(read_fd)


def run_cli(app: Callable[[], Any]) -> None:
    """Run a command line app: a signal ends it with one line and 128 + signal, no traceback."""
    raise_on_signals()
    try:
        app()
    except Interrupted as e:
        print(f"error: interrupted by {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
