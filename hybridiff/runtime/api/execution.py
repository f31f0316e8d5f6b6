"""Which execution mode a ``parallelize`` call runs: the one it asks for, or the plan's.
(Not in ``runtime.api`` itself: ``RunOptions`` imports that package, with the standard library only.)"""

from __future__ import annotations

from typing import get_args

from hybridiff.errors import HybridiffError
from hybridiff.plan import Execution


def chosen_execution(requested: str | None, planned: Execution) -> Execution:
    """``parallelize(execution=...)``: ``requested`` (checked), or the plan's ``planned`` when None."""
    if requested is None:
        return planned
    known = get_args(Execution)
    if requested not in known:
        raise HybridiffError(f"execution {requested!r} is not one of {', '.join(known)}")
    return requested  # type: ignore[return-value]
