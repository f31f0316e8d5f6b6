"""Where a run's shared-memory blocks live and what they are called, so that whoever outlives
a crash can remove them by name. Standard library only: the launcher and a worker whose
launcher died (before it imports torch, or while it is stuck in a collective) both use it.

Every block of a run launched by ``hybridiff run`` starts with the run id the launcher put in
``HYBRIDIFF_RUN_ID``. Jobs that torchrun or a user's script started have no such id; their
blocks start with ``hybridiff`` and each is unlinked as soon as every end has it mapped.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

#: Set by the local launcher for its workers: the prefix of every shared block of the run.
RUN_ID_ENV = "HYBRIDIFF_RUN_ID"


def shared_folder() -> Path:
    """Where shared blocks live: in memory (``/dev/shm``) where the system has it."""
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def run_prefix() -> str:
    """The prefix of this process's shared blocks: its run's id, else ``hybridiff``."""
    return os.environ.get(RUN_ID_ENV) or "hybridiff"


def remove_run_blocks(run_id: str) -> None:
    """Unlink every shared block of run ``run_id`` that is still there (mapped ones stay valid
    for whoever has them mapped)."""
    for path in shared_folder().glob(f"{run_id}-*"):
        with contextlib.suppress(OSError):
            path.unlink()
