"""A torchrun job's ranks on one node watching each other, as ``hybridiff run``'s launcher
watches its workers (``watchdog``).

Under torchrun the launcher is not ours: without this, a stopped rank (SIGSTOP, a frozen
process) is found only when a peer's collective times out after ``HYBRIDIFF_TIMEOUT_S``, and the
line names no one. From its first parallel block on, every rank beats into a folder shared by
the job's ranks on its node; during each block a watchdog thread watches the node's other
ranks. A peer silent for half the timeout is named in one ``error:`` line, killed (torchrun's
SIGTERM does not end a stopped process), and this rank exits with 2, so torchrun ends the job.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
import threading
from pathlib import Path

from hybridiff.runtime import watchdog
from hybridiff.runtime.comm import STORE_ENV


class _Beat:
    """This process's heartbeat (started once, kept to the exit) and the current block's watch."""

    started = False
    dog: watchdog.Watchdog | None = None
    stop = threading.Event()


def _folder() -> Path | None:
    """The heartbeat folder of this torchrun job on this node, or None outside torchrun (and
    under ``hybridiff run``, whose launcher watches the workers itself)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id or os.environ.get(STORE_ENV) or "LOCAL_WORLD_SIZE" not in os.environ:
        return None
    job = f"{run_id}-{os.environ.get('MASTER_PORT', '')}"
    return Path(tempfile.gettempdir(), f"hybridiff-torchrun-{job}", "heartbeat")


def watch_peers() -> None:
    """At a parallel block's start: beat (from the first block to the exit) and watch this
    node's other ranks until ``stop_watching``."""
    folder = _folder()
    if folder is None:
        return
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if not _Beat.started:
        folder.mkdir(parents=True, exist_ok=True)
        thread = watchdog.start_heartbeat(folder, rank, _Beat.stop)
        atexit.register(_leave, thread, folder / f"rank-{rank}")
        _Beat.started = True
    first = rank - local  # torchrun numbers a node's ranks one after the other
    peers = [r for r in range(first, first + int(os.environ["LOCAL_WORLD_SIZE"])) if r != rank]
    stop_watching()
    _Beat.dog = watchdog.Watchdog(folder, peers, watchdog.timeout_s(), startup=False, on_verdict=_give_up)
    _Beat.dog.start()


def stop_watching() -> None:
    """At a block's end: peers may now leave (and stop beating) without being condemned."""
    if _Beat.dog is not None:
        _Beat.dog.stop()
        _Beat.dog = None


def _leave(thread: threading.Thread, beat: Path) -> None:
    """At exit: stop beating and remove this rank's file; the last rank out removes the job's
    folder."""
    stop_watching()
    _Beat.stop.set()
    thread.join(timeout=2)
    with contextlib.suppress(OSError):
        beat.unlink()
        beat.parent.rmdir()
        beat.parent.parent.rmdir()


def _give_up(verdict: str) -> None:
    """From the watchdog thread: the main thread may be blocked in a collective for the whole
    timeout, so this rank leaves at once with the verdict."""
    sys.stderr.write(f"error: {verdict}\n")
    sys.stderr.flush()
    os._exit(2)
