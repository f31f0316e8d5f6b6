"""Programs run through ``torch.compile``: the one place the execution mode is applied.

A plan's ``execution`` is ``eager`` (each program's generated Python dispatches one kernel
after another) or ``compiled``. Compiled, every program (the full forward, each stage, the
serial baseline's denoiser) goes through ``torch.compile`` with static shapes: dynamo makes
one graph per (program, rows, dtype, device) on its first call, the warm-up call, and none
after. On CPU inductor fuses the graph into C++ kernels; on CUDA ``mode="reduce-overhead"``
also replays it as a CUDA graph, which is what makes a launch-bound step pay for its rows.

Communication never enters a compiled region: a program is straight-line compute between the
actions that send and receive, so the transport runs between graphs (``sp`` shard forwards,
whose attentions exchange keys mid-forward, stay eager; ``docs/compiled.md``).

Inductor's caches live in a folder hybridiff names (``cache_dir``), so a second run of the
same plan loads its kernels instead of compiling them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$HYBRIDIFF_CACHE_DIR`` or ``~/.cache/hybridiff``,
    folder ``inductor``."""
    root = os.environ.get("HYBRIDIFF_CACHE_DIR") or Path.home() / ".cache" / "hybridiff"
    return Path(root) / "inductor"


def use_cache_dir() -> Path:
    """Point inductor's on-disk caches (kernels, FX graphs, AOT autograd) at ``cache_dir``.
    Inductor reads the variable each time it looks for a cache, and workers inherit it."""
    folder = cache_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def compile_callable(module: nn.Module, device: torch.device | None = None) -> Callable[..., Any]:
    """``module`` under ``torch.compile`` with static shapes (CUDA graphs on CUDA)."""
    use_cache_dir()
    if device is not None and device.type == "cuda":
        graphed = torch.compile(module, dynamic=False, mode="reduce-overhead")
        return _OwnedOutputs(graphed)
    return torch.compile(module, dynamic=False)


class _OwnedOutputs:
    """A CUDA-graphed program whose outputs outlive its next replay: cudagraph trees reuse a
    graph's output memory on the next replay, but a stage's values are sent on, and a full
    step's are kept for the window's hand-off, after the program runs again."""

    def __init__(self, graphed: Callable[..., Any]) -> None:
        self.graphed = graphed

    def __call__(self, *args: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        out = self.graphed(*args)
        if isinstance(out, dict):
            return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out.clone() if isinstance(out, torch.Tensor) else out


@dataclass(frozen=True)
class CompileCounts:
    """What dynamo and inductor did in this process so far (``torch._dynamo`` counters):
    subtract two of them for what happened in between."""

    graphs: int = 0
    cache_hits: int = 0
    cache_misses: int = 0

    @classmethod
    def now(cls) -> CompileCounts:
        from torch._dynamo.utils import counters

        return cls(
            graphs=counters["stats"]["unique_graphs"],
            cache_hits=counters["inductor"]["fxgraph_cache_hit"],
            cache_misses=counters["inductor"]["fxgraph_cache_miss"],
        )

    def __sub__(self, other: CompileCounts) -> CompileCounts:
        return CompileCounts(self.graphs - other.graphs, self.cache_hits - other.cache_hits, self.cache_misses - other.cache_misses)

    def __add__(self, other: CompileCounts) -> CompileCounts:
        return CompileCounts(self.graphs + other.graphs, self.cache_hits + other.cache_hits, self.cache_misses + other.cache_misses)

    def as_dict(self) -> dict[str, int]:
        return {"graphs": self.graphs, "cache_hits": self.cache_hits, "cache_misses": self.cache_misses}
