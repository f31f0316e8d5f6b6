"""Where each millisecond of the denoising loop goes: per-step spans, a breakdown, a trace file.

Every step of a pipeline call is cut into five categories, which add up to the step's wall
time (from the end of the previous step to the end of this one):

- ``compute``: the denoiser's forward, whole or one stage;
- ``wait``: blocked until a peer's data is there (its compute is late, or the wire is slow: on
  gloo a message moves on a background thread, so its transfer time shows up here);
- ``send-recv``: issuing sends and receives, making tensors contiguous, receive buffers;
- ``pipeline``: the stock pipeline's own work between denoiser calls: CFG batching, guidance,
  the scheduler step, callbacks;
- ``glue``: hybridiff's work inside the denoiser call that is none of the above: mapping the
  call onto graph inputs, slicing rows, concatenating predictions, the discrepancy,
  bookkeeping. It is the remainder of the call after its measured spans.

Spans cost about a microsecond each; a disabled recorder costs one attribute test. The trace
is Chrome's trace-event JSON, which chrome://tracing and https://ui.perfetto.dev open.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterator

CATEGORIES = ("compute", "wait", "send-recv", "pipeline", "glue")


@dataclass
class _Step:
    call: int
    index: int
    phase: str
    start_ns: int
    end_ns: int
    #: (category, name, start, end) of the measured spans inside the step's denoiser call.
    spans: list[tuple[str, str, int, int]]
    denoiser: tuple[int, int] | None

    def seconds(self) -> dict[str, float]:
        """Seconds per category; they sum to the step's wall time."""
        out = dict.fromkeys(CATEGORIES, 0.0)
        for category, _, start, end in self.spans:
            out[category] += (end - start) / 1e9
        call_s = (self.denoiser[1] - self.denoiser[0]) / 1e9 if self.denoiser else 0.0
        out["glue"] = max(0.0, call_s - sum(out.values()))
        out["pipeline"] = (self.end_ns - self.start_ns) / 1e9 - call_s
        return out


@dataclass
class Spans:
    """Records the spans of one process's denoising loops (one rank, or every rank emulated)."""

    enabled: bool = False
    steps: list[_Step] = field(default_factory=list)
    _open: list[tuple[str, str, int, int]] = field(default_factory=list)
    _denoiser: tuple[int, int] | None = None
    _step_start: int | None = None
    _calls: int = 0
    _index: int = 0
    #: How each point-to-point link of this process moves tensors (``DistTransport.links``).
    links: dict[str, str] = field(default_factory=dict)

    def span(self, category: str, name: str) -> ContextManager[None]:
        """Time the enclosed block as ``category`` (one of ``CATEGORIES``)."""
        return self._timed(category, name) if self.enabled else nullcontext()

    @contextmanager
    def _timed(self, category: str, name: str) -> Iterator[None]:
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self._open.append((category, name, start, time.perf_counter_ns()))

    @contextmanager
    def call(self) -> Iterator[None]:
        """The denoiser call of the current step (its remainder is glue)."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            self._denoiser = (start, time.perf_counter_ns())

    def begin_loop(self, at_s: float) -> None:
        """The denoising loop starts (``at_s``: ``time.perf_counter()``)."""
        if self.enabled:
            self._step_start = int(at_s * 1e9)
            self._calls += 1
            self._index = 0

    def end_step(self, at_s: float, phase: str) -> None:
        """The step ends at ``at_s`` (the pipeline's step-end callback)."""
        if not self.enabled or self._step_start is None:
            return
        end = int(at_s * 1e9)
        self.steps.append(_Step(self._calls - 1, self._index, phase, self._step_start, end, self._open, self._denoiser))
        self._index += 1
        self._step_start, self._open, self._denoiser = end, [], None

    def breakdown(self) -> dict[str, dict[str, Any]]:
        """Per phase: milliseconds per step by category and ``total``, as the ``median`` (the
        typical step), the ``mean`` (which adds up to the loop's time) and the ``trimmed`` mean
        (without the slowest tenth of the steps: the mean a quiet machine would see), and
        ``steps``. The first call warms caches and buffers up: it is left out when there are
        others."""
        by_phase: dict[str, list[dict[str, float]]] = {}
        warm = [s for s in self.steps if s.call > 0] or self.steps
        for step in warm:
            seconds = step.seconds()
            by_phase.setdefault(step.phase, []).append({**seconds, "total": sum(seconds.values())})
        table: dict[str, dict[str, Any]] = {}
        for phase, rows in by_phase.items():
            quiet = sorted(rows, key=lambda r: r["total"])[: max(1, len(rows) - len(rows) // 10)]
            table[phase] = {
                stat: {c: 1e3 * average(r[c] for r in chosen) for c in (*CATEGORIES, "total")}
                for stat, average, chosen in (
                    ("median", statistics.median, rows), ("mean", statistics.fmean, rows), ("trimmed", statistics.fmean, quiet)
                )
            }
            table[phase]["steps"] = len(rows)
        return table

    def chrome_trace(self, process: str) -> dict[str, Any]:
        """The steps as Chrome trace events: one row of steps, one of what happened inside."""
        origin = self.steps[0].start_ns if self.steps else 0
        events: list[dict[str, Any]] = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": process}}]

        def event(category: str, name: str, start: int, end: int, tid: int, **args: Any) -> None:
            events.append(
                {"ph": "X", "cat": category, "name": name, "pid": 0, "tid": tid,
                 "ts": (start - origin) / 1e3, "dur": (end - start) / 1e3, "args": args}
            )

        for step in self.steps:
            ms = {c: round(s * 1e3, 3) for c, s in step.seconds().items()}
            event("step", f"call {step.call} step {step.index} ({step.phase})", step.start_ns, step.end_ns, 0, **ms)
            if step.denoiser is None:
                event("pipeline", "pipeline", step.start_ns, step.end_ns, 1)
                continue
            start, end = step.denoiser
            event("pipeline", "pipeline", step.start_ns, start, 1)
            event("pipeline", "pipeline", end, step.end_ns, 1)
            cursor = start
            for category, name, span_start, span_end in sorted(step.spans, key=lambda s: s[2]):
                if span_start > cursor:
                    event("glue", "glue", cursor, span_start, 1)
                event(category, name, span_start, span_end, 1)
                cursor = max(cursor, span_end)
            if end > cursor:
                event("glue", "glue", cursor, end, 1)
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"links": self.links}}

    def write(self, path: Path, process: str) -> None:
        from hybridiff.files import write_atomic

        write_atomic(path, json.dumps(self.chrome_trace(process)))
