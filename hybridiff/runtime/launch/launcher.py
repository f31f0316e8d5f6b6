"""Start one worker per device on this machine with torch's elastic launcher, and end the run
with one line whatever happens to them.

- Every store binds nothing to the network: the rendezvous and the process group meet in
  files of a private temporary folder, and gloo/NCCL pair sockets use the loopback
  interface. Nothing a remote host sends is ever unpickled.
- A worker that fails writes one line to that folder (``hybridiff.runtime.launch.worker``), and its
  traceback to ``OUT/logs/rank-<r>.log``; nothing reaches the terminal as a traceback. The
  launcher prints the line that explains the failure.
- A heartbeat watchdog names a stopped rank within half of ``HYBRIDIFF_TIMEOUT_S``.
- A signal to the launcher stops the workers, closes ``report.json`` as ``interrupted`` and
  ends with 128 + the signal.
- Whatever ends the run, the launcher removes its folder and the run's shared-memory blocks
  (named after the run id, ``HYBRIDIFF_RUN_ID``). If the launcher itself is killed, its
  workers notice (``hybridiff.runtime.launch.worker``), close the report and remove them.

Multi-node jobs skip this module: ``torchrun ... -m hybridiff run`` runs on each node.
Only ``launch_local`` imports torch.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hybridiff.errors import HybridiffError, Interrupted, paused_promptness, raise_on_signals
from hybridiff.plan import load_plan
from hybridiff.runtime import watchdog
from hybridiff.runtime.comm import STORE_ENV
from hybridiff.runtime.comm.blocks import RUN_ID_ENV, remove_run_blocks
from hybridiff.runtime.launch.worker import launched
from hybridiff.runtime.run.options import RunOptions
from hybridiff.runtime.run.report import end_report

#: Environment the workers get unless the user set it: pair sockets on the loopback interface,
#: and no note from multiprocessing's tracker about the semaphores of a killed worker.
WORKER_ENV = {
    "GLOO_SOCKET_IFNAME": "lo",
    "NCCL_SOCKET_IFNAME": "lo",
    "PYTHONWARNINGS": "ignore::UserWarning:multiprocessing.resource_tracker",
}


@contextmanager
def _environment(values: dict[str, str], override: bool) -> Iterator[None]:
    """Set environment variables (the workers inherit them) for the duration of a launch."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if override or key not in os.environ:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def launch_local(opts: RunOptions, world_size: int) -> None:
    """Run ``opts`` on ``world_size`` local workers; raises HybridiffError if any fails and
    ``Interrupted`` if the launcher is signalled, after closing the run's report."""
    if (opts.execution or load_plan(opts.plan).execution) == "compiled":
        watchdog.allow_compilation()
    with paused_promptness(), tempfile.TemporaryDirectory(prefix="hybridiff-") as run_dir:
        for sub in ("heartbeat", "errors", "elastic"):
            Path(run_dir, sub).mkdir()
        dog = watchdog.Watchdog(Path(run_dir, "heartbeat"), list(range(world_size)), watchdog.timeout_s())
        run_id = f"hybridiff-{uuid.uuid4().hex[:12]}"
        private = {STORE_ENV: str(Path(run_dir, "group.store")), RUN_ID_ENV: run_id, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        with _environment(private, override=True), _environment(WORKER_ENV, override=False):
            dog.start()
            try:
                _elastic(opts, world_size, run_id, run_dir, dog)
            except HybridiffError as e:
                end_report(opts.out, "failed", str(e))
                raise
            except Interrupted as e:
                end_report(opts.out, "interrupted", f"interrupted by {e}")
                raise
            finally:
                dog.stop()
                remove_run_blocks(run_id)  # a killed worker's; the others unlinked theirs
                raise_on_signals()  # elastic replaced the command's handlers with its own


def _elastic(opts: RunOptions, world_size: int, run_id: str, run_dir: str, dog: watchdog.Watchdog) -> None:
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=world_size,
        run_id=run_id,
        rdzv_backend="c10d",
        rdzv_endpoint=str(Path(run_dir, "rendezvous.store")),
        rdzv_configs={"store_type": "file"},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(run_dir, "elastic"))),
    )
    # Elastic logs every failed or stopped worker with a traceback, from loggers created at
    # any time; the workers' error files say what matters in one line.
    logging.disable(logging.CRITICAL)
    try:
        elastic_launch(config, launched)(opts, run_dir)
    except ChildFailedError as e:
        raise HybridiffError(_explain(e.failures, Path(run_dir, "errors"), dog)) from None
    except SignalException as e:
        raise Interrupted(int(e.sigval)) from None
    finally:
        logging.disable(logging.NOTSET)


def _explain(failures: dict, errors: Path, dog: watchdog.Watchdog) -> str:
    """The line that explains a failed run, most telling first: a rank the watchdog found
    stopped; user errors; ranks killed from outside; a rank that fell behind before its peers
    timed out; the workers' own last lines, a peer's lost connection last."""
    if dog.verdict:
        return dog.verdict
    said = {int(p.stem.split("-")[1]): (p.suffix, p.read_text()) for p in errors.glob("rank-*")}
    user = sorted({line for kind, line in said.values() if kind == ".user"})
    if user:
        return "; ".join(user)
    killed = [
        f"worker rank {r} was killed by {f.signal_name()} (from outside, or out of memory)"
        for r, f in sorted(failures.items())
        if f.exitcode < 0 and r not in said
    ]
    if killed:
        return "; ".join(killed)
    faults = [line for _, (_, line) in sorted(said.items())]
    laggards = dog.laggards()
    if laggards and any("waited longer than" in line for line in faults):
        return f"{laggards}; its peers timed out waiting for it"
    lost = ("connection closed", "connection reset", "broken pipe")
    primary = [line for line in faults if not any(w in line.lower() for w in lost)] or faults
    if primary:
        return "; ".join(primary)
    codes = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in sorted(failures.items()))
    return f"worker {codes} failed without saying why"
