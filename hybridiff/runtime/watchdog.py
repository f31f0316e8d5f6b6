"""Finding a stopped or stuck worker in bounded time, and naming it.

Every worker runs a heartbeat thread that rewrites ``rank-<r>`` in a folder the launcher
gave it, twice a second, with its pid and its progress (denoising steps done). A stopped
(SIGSTOP), frozen or CPU-starved process stops beating: the launcher's ``Watchdog`` sees a
heartbeat older than half of ``HYBRIDIFF_TIMEOUT_S``, names that rank and kills the workers.
A worker that is alive but stuck keeps beating; its peers' collectives then time out after
``HYBRIDIFF_TIMEOUT_S``, and the progress counts name the rank that fell behind
(``laggards``). Only imports the standard library: the heartbeat starts before the worker
imports torch and diffusers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

from hybridiff.errors import HybridiffError

TIMEOUT_ENV = "HYBRIDIFF_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 60
#: The default wait for a peer in compiled runs: a rank compiling its stage for the first time
#: (minutes on a CPU, with an empty cache) keeps its peers waiting at their next exchange.
COMPILED_TIMEOUT_S = 900
#: Seconds between two heartbeats of a worker.
BEAT_S = 0.5
#: A worker that has not written its first heartbeat this long after launch is declared stuck
#: at start-up even if the timeout is shorter (spawning and importing torch take seconds).
STARTUP_GRACE_S = 60.0

_progress = 0


def timeout_s() -> int:
    """The validated ``HYBRIDIFF_TIMEOUT_S``: how long a rank may wait for a peer."""
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 2 <= value <= 86400:
        raise HybridiffError(f"{TIMEOUT_ENV}={text!r}: give whole seconds from 2 to 86400 (default {DEFAULT_TIMEOUT_S})")
    return value


def allow_compilation() -> None:
    """Before a compiled run joins its peers (and launches them): unless the user set
    ``HYBRIDIFF_TIMEOUT_S``, wait ``COMPILED_TIMEOUT_S`` for a peer. A stopped worker is still
    named within half of it (its heartbeat, which compiling does not stop, goes stale)."""
    os.environ.setdefault(TIMEOUT_ENV, str(COMPILED_TIMEOUT_S))


def stale_after_s(timeout: int) -> float:
    """A heartbeat this old means the worker is stopped: half the timeout, so the watchdog
    names the stopped rank before its peers' collectives time out and blame themselves."""
    return timeout / 2


def advance() -> None:
    """One more unit of progress (a denoising step) for this worker's heartbeat."""
    global _progress
    _progress += 1


def start_heartbeat(
    folder: Path, rank: int, stop: threading.Event | None = None, on_orphaned: Callable[[], None] | None = None
) -> threading.Thread:
    """Beat into ``folder/rank-<rank>`` from a daemon thread until the process ends (or ``stop``
    is set). Each beat replaces the file whole: a reader that caught a rewrite half-done (empty)
    would miss the pid, and the watchdog could then not kill that worker. ``on_orphaned`` is
    called from this thread, within a beat, once the process that started this one has ended
    (its launcher was killed); it is expected to end the process."""
    path, draft = folder / f"rank-{rank}", folder / f".rank-{rank}.tmp"
    pid, parent = os.getpid(), os.getppid()
    stop = stop or threading.Event()

    def beat() -> None:
        while not stop.is_set():
            if on_orphaned is not None and os.getppid() != parent:
                on_orphaned()
                return
            with contextlib.suppress(OSError):  # the launcher removed its folder: the run is ending
                draft.write_text(f"{pid} {_progress}")
                os.replace(draft, path)
            stop.wait(BEAT_S)

    thread = threading.Thread(target=beat, name="hybridiff-heartbeat", daemon=True)
    thread.start()
    return thread


def _read(path: Path) -> tuple[int, int] | None:
    try:
        pid, progress = path.read_text().split()
        return int(pid), int(progress)
    except (OSError, ValueError):
        return None  # not written yet


class Watchdog(threading.Thread):
    """Watches the heartbeats of the local workers ``ranks``; on a stale one, records why
    (``verdict``), kills every worker it knows, so the launcher's wait ends at once, and calls
    ``on_verdict``. ``startup``: a rank that never beats is condemned too; torchrun's ranks
    watching each other leave that out (a peer still loading is the collective timeout's case)."""

    def __init__(
        self, folder: Path, ranks: list[int], timeout: int, *, startup: bool = True,
        on_verdict: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name="hybridiff-watchdog", daemon=True)
        self.folder, self.ranks, self.timeout = folder, ranks, timeout
        self._startup, self.on_verdict = startup, on_verdict
        self.verdict: str | None = None
        self._halt = threading.Event()
        self._launched = time.time()

    def run(self) -> None:
        stale = stale_after_s(self.timeout)
        while not self._halt.wait(0.25):
            now = time.time()
            for rank in self.ranks:
                path = self.folder / f"rank-{rank}"
                age = now - path.stat().st_mtime if path.exists() else None
                if age is None and self._startup and now - self._launched > max(stale, STARTUP_GRACE_S):
                    self._condemn(f"worker rank {rank} never started (no heartbeat {now - self._launched:.0f} s after launch)")
                    return
                if age is not None and age > stale:
                    self._condemn(
                        f"worker rank {rank} stopped responding: no heartbeat for {age:.0f} s (limit {stale:g} s, half "
                        f"of {TIMEOUT_ENV}={self.timeout}); it was stopped, frozen or starved of CPU"
                    )
                    return

    def _condemn(self, verdict: str) -> None:
        self.verdict = verdict
        for rank in self.ranks:
            beat = _read(self.folder / f"rank-{rank}")
            if beat is not None:
                with contextlib.suppress(ProcessLookupError):  # it ended on its own meanwhile
                    os.kill(beat[0], signal.SIGKILL)
        if self.on_verdict is not None:
            self.on_verdict(verdict)

    def stop(self) -> None:
        self._halt.set()

    def laggards(self) -> str | None:
        """Which ranks fell behind the others, from the last heartbeats, or None if none did."""
        progress = {r: beat[1] for r in self.ranks if (beat := _read(self.folder / f"rank-{r}"))}
        if len(set(progress.values())) < 2:
            return None
        low, high = min(progress.values()), max(progress.values())
        behind = ", ".join(str(r) for r, p in progress.items() if p == low)
        return f"worker rank {behind} stopped making progress ({low} steps done, others reached {high})"
