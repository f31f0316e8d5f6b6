"""diffusers' own context parallelism (Ulysses) as a peer to measure hybridiff against.

``UlyssesDenoiser`` is the stock denoiser, observed like the serial baseline, after diffusers'
``enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` over every rank of the
world: each rank holds 1/N of the tokens, and every attention exchanges them all-to-all so each
rank attends over all tokens for 1/N of the heads. Every rank makes the same pipeline call. Only
diffusers' code splits, exchanges and gathers; hybridiff times the loop and counts the bytes.

Two things diffusers needs that a CPU run or a trimmed prompt lacks, applied here only:

- its mesh set-up divides by ``torch.accelerator.device_count()``, which is 0 on a CPU build;
  the count reads 1 while ``enable_parallelism`` runs (gloo needs no device).
- its input hooks split every token dimension evenly; a text of odd length (Qwen-Image trims the
  prompt to its tokens) is padded with masked-out tokens to a multiple of N first, the
  family's declared mask (``Family.masks``), which changes the output by rounding only.

Bytes are those each rank posts to other ranks in diffusers' collectives (all-to-all: the
(N-1)/N of a tensor that leaves; all-gather: the tensor once per peer), summed over ranks, the
accounting of hybridiff's own transports.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.families import pad_under_mask
from hybridiff.runtime.execution.denoiser import ObservedDenoiser, ReplicaCall
from hybridiff.runtime.spans import Spans

#: The bytes phase diffusers' exchanges are reported under.
PHASE = "context-parallel"


class UlyssesDenoiser(ObservedDenoiser):
    """The stock denoiser under diffusers' Ulysses over all ``dist`` ranks; see the module text."""

    def __init__(self, denoiser: nn.Module, attr: str, spans: Spans, two_calls: bool, masks: dict[str, str]) -> None:
        super().__init__(denoiser, attr, spans, two_calls)
        self.degree = dist.get_world_size()
        self.masks = masks
        self.sent_bytes = 0
        enable_ulysses(denoiser, self.degree)

    def begin_call(self, guided: bool) -> None:
        super().begin_call(guided)
        self.sent_bytes = 0

    def record(self, replica: int, images: list[int], latency_s: float) -> ReplicaCall:
        return replace(super().record(replica, images, latency_s), comm_bytes_by_phase={PHASE: self.sent_bytes})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for condition, mask in self.masks.items():
            if isinstance(kwargs.get(condition), torch.Tensor):
                tokens = kwargs[condition].shape[1]
                kwargs = pad_under_mask(kwargs, condition, mask, math.ceil(tokens / self.degree) * self.degree)
        with _counted(self):
            return super().forward(*args, **kwargs)


def enable_ulysses(denoiser: nn.Module, degree: int) -> None:
    """diffusers' Ulysses of ``degree`` on ``denoiser``, or one line saying why it cannot run."""
    from diffusers import ContextParallelConfig

    name = type(denoiser).__name__
    if getattr(denoiser, "_cp_plan", None) is None or not hasattr(denoiser, "enable_parallelism"):
        raise HybridiffError(f"diffusers has no context-parallel plan for {name}; its Ulysses peer runs Flux, Qwen-Image, Wan and others")
    heads = getattr(denoiser.config, "num_attention_heads", None)
    if heads is not None and heads % degree:
        raise HybridiffError(f"diffusers' Ulysses splits attention heads: {name}'s {heads} heads do not divide among {degree} workers")
    # diffusers' own call of a deprecated torch name, once per forward: not the user's to fix
    warnings.filterwarnings("ignore", message=".*all_gather_tensor` is deprecated", category=FutureWarning)
    count = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: max(count(), 1)  # the CPU shim; see the module text
    try:
        denoiser.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    finally:
        torch.accelerator.device_count = count


@contextmanager
def _counted(owner: UlyssesDenoiser) -> Iterator[None]:
    """Count the bytes of diffusers' collectives (reached through these module attributes)
    into ``owner.sent_bytes`` while a forward runs."""
    peers = owner.degree - 1
    originals = {name: getattr(funcol, name) for name in ("all_to_all_single", "all_gather_tensor")}
    all_gather = dist.all_gather

    def all_to_all_single(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        owner.sent_bytes += x.numel() * x.element_size() * peers // owner.degree
        return originals["all_to_all_single"](x, *args, **kwargs)

    def all_gather_tensor(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        owner.sent_bytes += x.numel() * x.element_size() * peers
        return originals["all_gather_tensor"](x, *args, **kwargs)

    def gather_list(outputs: list[torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        owner.sent_bytes += x.numel() * x.element_size() * peers
        return all_gather(outputs, x, *args, **kwargs)

    funcol.all_to_all_single, funcol.all_gather_tensor, dist.all_gather = all_to_all_single, all_gather_tensor, gather_list
    try:
        yield
    finally:
        funcol.all_to_all_single, funcol.all_gather_tensor = originals["all_to_all_single"], originals["all_gather_tensor"]
        dist.all_gather = all_gather
