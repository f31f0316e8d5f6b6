"""One exception type for every problem a user can fix.

The CLI prints ``error: <message>`` and exits with status 2 for these, so each message must
name the problem and the fix on one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class HybridiffError(Exception):
    """A user-facing error: bad input, a mismatched plan, an unsupported model."""


def report_and_exit(error: HybridiffError) -> NoReturn:
    """Print the one-line message a user sees and exit with status 2."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(2)
