"""Start one worker per device on this machine with torch's elastic launcher.

Workers report user errors (a plan that does not fit the model, say) through small files so
the launching command prints each distinct message once instead of a traceback per worker.
Multi-node jobs skip this module: ``torchrun ... -m hybridiff.runtime.worker`` runs on each node.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import uuid
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from hybridiff.errors import HybridiffError
from hybridiff.runtime.session import RunOptions, execute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_entry(opts: RunOptions, error_dir: str) -> None:
    rank = os.environ.get("RANK", "0")
    try:
        execute(opts)
    except HybridiffError as e:
        Path(error_dir, f"rank{rank}.err").write_text(str(e))
        raise SystemExit(2) from None
    except Exception as e:  # a bug or a fault: its traceback goes to stderr, its last line to the user
        last = (str(e).strip().splitlines() or [""])[-1]
        Path(error_dir, f"rank{rank}.err").write_text(f"worker rank {rank} failed: {type(e).__name__}: {last}")
        raise


def launch_local(opts: RunOptions, world_size: int) -> None:
    """Run ``opts`` on ``world_size`` local workers; raises HybridiffError if any fails."""
    with tempfile.TemporaryDirectory(prefix="hybridiff-") as error_dir:
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=world_size,
            run_id=f"hybridiff-{uuid.uuid4().hex[:8]}",
            rdzv_backend="c10d",
            rdzv_endpoint=f"127.0.0.1:{_free_port()}",
            max_restarts=0,
            monitor_interval=0.1,
            start_method="spawn",
        )
        # Elastic logs every failed or stopped worker with a traceback, from loggers created at
        # any time; the workers' error files say what matters in one line.
        logging.disable(logging.CRITICAL)
        try:
            elastic_launch(config, _worker_entry)(opts, error_dir)
        except ChildFailedError as e:
            messages = sorted({p.read_text() for p in Path(error_dir).glob("*.err")})
            if messages:
                raise HybridiffError("; ".join(messages)) from None
            failed = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in sorted(e.failures.items()))
            raise HybridiffError(f"worker {failed} failed; its output above says why") from None
        finally:
            logging.disable(logging.NOTSET)
