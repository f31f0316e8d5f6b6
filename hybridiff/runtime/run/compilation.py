"""What compiling cost a run, kept apart from its latency (``report.json``'s ``compilation``).

A compiled run makes one untimed call of each call size before its timed calls: dynamo
compiles every program it meets (each at its row counts), so the timed calls run compiled
code only. What dynamo and inductor did is counted per rank, around the warm-up calls and
around the timed ones: graphs compiled, and inductor's on-disk cache hits and misses. A graph
compiled during a timed call is a recompilation, and the summary says how many there were.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from hybridiff.graph.compiled import CompileCounts, cache_dir

T = TypeVar("T")


class Compilation:
    """One rank's warm-up calls and compile counts (nothing at all when eager)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.warmed: set[int] = set()
        self.warmup_s: list[float] = []
        self.during_warmup = CompileCounts()
        self.during_timed = CompileCounts()

    def warm_up(self, size: int, call: Callable[[], Any]) -> None:
        """Make ``call`` once, untimed, if no call of ``size`` images was made yet."""
        if self.enabled and size not in self.warmed:
            self.warmed.add(size)
            before, start = CompileCounts.now(), time.perf_counter()
            call()
            self.warmup_s.append(time.perf_counter() - start)
            self.during_warmup += CompileCounts.now() - before

    def timed(self, call: Callable[[], T]) -> T:
        """``call``'s result, counting what was compiled while it ran."""
        if not self.enabled:
            return call()
        before = CompileCounts.now()
        result = call()
        self.during_timed += CompileCounts.now() - before
        return result

    def record(self) -> dict[str, Any]:
        """This rank's part of the summary (exchanged among the ranks)."""
        return {"warmup_s": self.warmup_s, "warm_up": self.during_warmup.as_dict(), "timed": self.during_timed.as_dict()}

    def summary(self, ranks: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The run's compilation: per rank, and the recompilations in timed calls (must be 0)."""
        if not self.enabled:
            return None
        return {
            "cache_dir": str(cache_dir()),
            "warmup_s": max((sum(r["warmup_s"]) for r in ranks), default=0.0),
            "recompilations": sum(r["timed"]["graphs"] for r in ranks),
            "ranks": dict(enumerate(ranks)),
        }
