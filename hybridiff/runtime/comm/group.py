"""Which device a parallel pipeline computes on, and the process group its ranks meet in."""

from __future__ import annotations

import atexit
import contextlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from hybridiff import device as devices
from hybridiff.errors import HybridiffError
from hybridiff.plan import Plan
from hybridiff.runtime import peer_watch, watchdog
from hybridiff.runtime.comm import STORE_ENV


def pipe_device(pipe: Any) -> torch.device:
    """Where ``pipe``'s denoiser's weights are."""
    return torch.device(getattr(pipe, "device", torch.device("cpu")))


def choose_device(pipe: Any, wanted: str | torch.device | None, distributed: bool) -> torch.device:
    """``wanted``, else, for a ``distributed`` rank: its own GPU where CUDA exists
    (``HYBRIDIFF_DEVICE`` may force cpu); else the pipeline's device."""
    if wanted is not None:
        return torch.device(wanted)
    current = pipe_device(pipe)
    if not distributed or current.type == "cuda":
        return current
    if "LOCAL_RANK" in os.environ:
        devices.check_fits(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return devices.worker_device(int(os.environ.get("LOCAL_RANK", "0")))


class _Kept:
    """The default group this process's ``join_group`` created: kept from the first parallel
    block to the process's exit. Destroying it at a block's end and creating it again at the
    next made the second rendezvous race: torchrun's store still held the first group's
    addresses, and gloo's full mesh got "Connection refused" (2 of 6 tries) or hung."""

    created = False
    #: The last block ended cleanly on every rank, so the ranks may wait for each other at exit.
    leave_together = False


def join_group(plan: Plan, device: torch.device, any_size: bool = False) -> int:
    """Join the process group torchrun or the local launcher set up (or use the one the caller
    initialised, or the one an earlier block created); returns this process's rank. The local
    launcher hands over a file store: nothing listens on the network. The world must be the
    plan's, unless ``any_size``."""
    _Kept.leave_together = False
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise HybridiffError(
                "running a plan on several devices needs one process per device: start the script with "
                f"`torchrun --nproc-per-node {plan.mesh.world_size} SCRIPT`, or pass emulate=True to run every rank here"
            )
        joined: dict[str, Any] = {"timeout": timedelta(seconds=watchdog.timeout_s())}
        if os.environ.get(STORE_ENV):
            world = int(os.environ["WORLD_SIZE"])
            joined.update(store=dist.FileStore(os.environ[STORE_ENV], world), rank=int(os.environ["RANK"]), world_size=world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds NCCL's communicator to this GPU instead of a guess from the rank
            joined["device_id"] = device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **joined)
        if not _Kept.created:
            _Kept.created = True
            atexit.register(_leave_at_exit)
    if not any_size and dist.get_world_size() != plan.mesh.world_size:
        raise HybridiffError(world_mismatch(plan, dist.get_world_size()))
    peer_watch.watch_peers()
    return dist.get_rank()


def release_group(graceful: bool) -> None:
    """A parallel block ends: after a clean end every rank waits here for the others, so that
    none leaves while a peer still sends (gloo can abort at teardown, leaving a torchrun peer
    waiting at its exit). The group stays for the next block; see ``_Kept``."""
    peer_watch.stop_watching()
    if graceful and _Kept.created and dist.is_initialized():
        dist.barrier()
    _Kept.leave_together = graceful


def _leave_at_exit() -> None:
    """Destroy the group ``join_group`` created; together, unless a block ended in a failure
    (a peer may be gone: waiting for it would delay this rank's exit by the whole timeout)."""
    if not dist.is_initialized():
        return
    if _Kept.leave_together:
        with contextlib.suppress(Exception):  # a peer that died after the block: leave anyway
            dist.barrier()
    dist.destroy_process_group()


def world_mismatch(plan: Plan, launched: int) -> str:
    """Why ``plan`` does not fit ``launched`` workers, and the fix. A 1-device plan compiled for
    more devices is the compiler's choice (no mesh paid), which the line says with its numbers."""
    size, est = plan.mesh.world_size, plan.estimates
    said = f"the plan is for {size} device{'s' if size > 1 else ''} but {launched} workers were launched"
    others = {label: s for label, s in est.alternatives.items() if label != plan.mesh.label}
    if size == 1 and others:
        best = min(others, key=others.__getitem__)
        return (
            f"{said}: its compile found no multi-device mesh that pays (the best, {best}, was predicted "
            f"{others[best]:.3f} s against {est.latency_s:.3f} s on one device), so it wrote a 1-device plan; launch "
            f"1 worker, or recompile on a quiet machine, or force a mesh with --gpus {launched} --mesh {best}"
        )
    return f"{said}; launch {size} or recompile with --gpus {launched}"
