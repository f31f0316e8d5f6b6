"""One exception type for every problem a user can fix, and one for signals.

The CLI prints ``error: <message>`` and exits with status 2 for ``HybridiffError``, so each
message must name the problem and the fix on one line. A signal (Ctrl-C, SIGTERM) raises
``Interrupted`` wherever the program is; the command cleans up, prints one line and exits
with 128 + the signal's number (130, 143), as shells expect.
"""

from __future__ import annotations

import signal
import sys
from typing import Any, Callable, NoReturn


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


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def raise_on_signals() -> None:
    """From now on SIGINT and SIGTERM raise ``Interrupted`` in the main thread."""
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)


def run_cli(app: Callable[[], Any]) -> None:
    """Run a command line app: a signal ends it with one line and 128 + signal, no traceback."""
    raise_on_signals()
    try:
        app()
    except Interrupted as e:
        print(f"error: interrupted by {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
