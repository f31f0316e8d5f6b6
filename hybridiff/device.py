"""Which device and how many CPU threads a worker uses.

One worker per accelerator, addressed by LOCAL_RANK (never the global rank, so multi-node
works). On CPU the cores are split evenly between the workers of one machine, so a plan's
costs, a serial baseline and a distributed run all use the same per-device compute.
"""

from __future__ import annotations

import os

import torch


def default_threads(workers_per_machine: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers_per_machine))


def worker_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"
