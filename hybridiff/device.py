"""Which device, how many CPU threads and which cores a worker uses.

One worker per accelerator, addressed by LOCAL_RANK (never the global rank, so multi-node
works), and never more workers than accelerators. On CPU the cores are split evenly between the workers of one machine, so a plan's
costs, a serial baseline and a distributed run all use the same per-device compute. Where
every worker's threads fit on cores of their own, each worker is bound to its share: its
compute then never migrates onto a peer's core, and its communication threads run next to it.
``HYBRIDIFF_CPU_BIND=0`` turns binding off (a machine shared with other work).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from hybridiff.errors import HybridiffError


def available_cores() -> list[int]:
    """The cores this process may run on (a container or ``taskset`` may allow fewer than exist)."""
    return sorted(os.sched_getaffinity(0))


def default_threads(workers_per_machine: int) -> int:
    return max(1, len(available_cores()) // max(1, workers_per_machine))


#: ``cpu`` or ``cuda`` forces the kind of device (``hybridiff run --device`` sets it for its
#: workers); unset or ``auto``: CUDA where it exists.
DEVICE_ENV = "HYBRIDIFF_DEVICE"


def device_kind() -> str:
    """``cuda`` or ``cpu``: what this process's workers compute on."""
    wanted = os.environ.get(DEVICE_ENV, "auto")
    if wanted not in ("auto", "cpu", "cuda"):
        raise HybridiffError(f"{DEVICE_ENV}={wanted!r}: use cpu, cuda or auto")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise HybridiffError("--device cuda, but this machine has no CUDA device torch can use; use --device cpu")
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


def worker_device(local_rank: int) -> torch.device:
    if device_kind() == "cuda":
        return torch.device("cuda", local_rank)  # check_fits has refused more workers than GPUs
    return torch.device("cpu")


def check_fits(local_workers: int) -> None:
    """Refuse to start more local workers than there are GPUs to give them (two ranks on one
    GPU fail inside NCCL with nothing useful said)."""
    if device_kind() == "cuda" and local_workers > torch.cuda.device_count():
        gpus = torch.cuda.device_count()
        raise HybridiffError(
            f"{local_workers} workers on this machine but {gpus} visible GPU(s): NCCL needs a GPU per worker; run with "
            f"--emulate, compile a plan for {gpus} GPU(s) (--gpus {gpus}), or run on CPU workers with --device cpu"
        )


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


@dataclass(frozen=True)
class Placement:
    """Where one process computes."""

    device: torch.device
    threads: int
    #: Cores kept for this process alone (CPU workers whose threads all fit), else None.
    cores: frozenset[int] | None


def placement(local_rank: int, local_workers: int, threads: int | None = None) -> Placement:
    """The placement of worker ``local_rank`` of ``local_workers`` on this machine."""
    check_fits(local_workers)
    device = worker_device(local_rank)
    threads = threads or default_threads(local_workers)
    cores = available_cores()
    bind = device.type == "cpu" and local_workers * threads <= len(cores) and os.environ.get("HYBRIDIFF_CPU_BIND") != "0"
    mine = frozenset(cores[local_rank * threads : (local_rank + 1) * threads]) if bind else None
    return Placement(device, threads, mine)


@contextmanager
def placed(where: Placement) -> Iterator[None]:
    """Use ``where``'s threads and cores until the block ends (threads started inside inherit
    the cores: enter it before the process group starts its communication threads)."""
    threads, cores = torch.get_num_threads(), os.sched_getaffinity(0)
    torch.set_num_threads(where.threads)
    if where.cores is not None:
        os.sched_setaffinity(0, where.cores)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if where.cores is not None:
            os.sched_setaffinity(0, cores)
