"""Where a worker process starts.

- Started by ``hybridiff run``'s launcher (``hybridiff.runtime.launch.launcher``): ``launched`` starts
  the heartbeat before anything heavy is imported (so a worker stopped while it loads is found
  too), runs this rank, and leaves any failure as one line for the launcher. If the launcher
  is killed, the heartbeat thread closes the report, removes the run's temporary folder and
  shared blocks, and ends the worker, wherever its main thread is.
- Started by torchrun on every node (``torchrun ... -m hybridiff run plan.json ...``): the
  ``run`` command (``hybridiff.cli.run``) executes the rank in that process.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

from hybridiff.errors import HybridiffError, one_line
from hybridiff.runtime import watchdog
from hybridiff.runtime.comm.blocks import RUN_ID_ENV, remove_run_blocks
from hybridiff.runtime.run.options import RunOptions
from hybridiff.runtime.run.report import end_report

#: ``prctl`` option that sets the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def failure_line(error: BaseException, rank: int, out: Path) -> str:
    """What the user reads about a failed worker; a non-user error's traceback goes to a log."""
    if isinstance(error, HybridiffError):
        return str(error)
    where = out / "logs" / f"rank-{rank}.log"
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        where.write_text("".join(traceback.format_exception(error)))
    except OSError:
        where = None
    line = f"worker rank {rank} failed: {one_line(error)}"
    if "timed out" in line.lower() or "timeout" in line.lower():
        line += f" (it waited longer than {watchdog.TIMEOUT_ENV}={watchdog.timeout_s()} s for a peer)"
    return line + (f" (traceback: {where})" if where else "")


def launched(opts: RunOptions, run_dir: str) -> None:
    """A launched worker: heartbeat first, then the run; a failure leaves one line in run_dir."""
    rank = int(os.environ["RANK"])
    # Ctrl-C reaches every worker: die at once, as on SIGTERM, even inside a blocking gloo wait;
    # the launcher closes the report.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _outlive_the_launcher()
    watchdog.start_heartbeat(Path(run_dir, "heartbeat"), rank, on_orphaned=lambda: _orphaned(opts.out, run_dir, rank))
    try:
        from hybridiff.runtime.run.session import execute

        execute(opts)
    except BaseException as e:  # noqa: BLE001 - every failure becomes one line for the launcher
        kind = "user" if isinstance(e, HybridiffError) else "fault"
        Path(run_dir, "errors", f"rank-{rank}.{kind}").write_text(failure_line(e, rank, opts.out))
        raise SystemExit(2 if kind == "user" else 1) from None


def _outlive_the_launcher() -> None:
    """torch's spawn makes a worker's parent's death send it SIGINT, which kills it at once and
    leaves the run's report, folder and shared blocks behind; the heartbeat cleans up instead."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)


def _orphaned(out: Path, run_dir: str, rank: int) -> None:
    """The launcher died without stopping this worker (SIGKILL, a crash): rank 0 closes the
    report; every rank removes what the run left and ends at once."""
    if rank == 0:
        end_report(out, "failed", "the launcher ended without stopping its workers (it was killed or crashed); the workers stopped")
    remove_run_blocks(os.environ[RUN_ID_ENV])
    shutil.rmtree(run_dir, ignore_errors=True)
    os._exit(1)
