"""What ``compile`` decides with, as one frozen object (DistriFusion keeps one config object
too): the CLI builds it once, and ``compile_model``, ``compile_module``, ``cost_model``,
``cost_arch`` and ``plan_for`` all read it, instead of a dozen loose keywords travelling
through every layer. What only one entry point has (image size, dtype, calibration, leaves,
the roofline device) stays an argument of that entry point."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hybridiff.compiler.schedule_defaults import DEFAULT_SCHEDULE
from hybridiff.errors import HybridiffError
from hybridiff.plan import Schedule

#: Default link bandwidth: PCIe 3.0 x16 moves ~15.75 GB/s raw, ~100 Gbit/s in practice.
DEFAULT_LINK_GBPS = 100.0


@dataclass(frozen=True)
class CompileOptions:
    """Costing reads ``link_gbps``, ``repeats``, ``threads``, ``cost`` (and ``gpus`` and
    ``batch``: threads per device, row counts to time); planning reads ``gpus``, ``schedule``,
    ``batch``, ``mesh``, ``strategy``, ``warmup`` and ``patch_parallel``."""

    gpus: int = 2
    schedule: Schedule = DEFAULT_SCHEDULE
    #: Images generated together: the mesh is chosen for them.
    batch: int = 1
    #: A mesh forced as ``dp=D,cfg=C,pp=P``; None: the fastest predicted.
    mesh: str | None = None
    #: A peer strategy's plan (``hybridiff.compiler.strategies``); None: the compiler's choice.
    strategy: str | None = None
    #: The pipeline strategy's whole steps before its window; None: AsyncDiff's per family.
    warmup: int | None = None
    link_gbps: float = DEFAULT_LINK_GBPS
    #: Timing repeats per node (median).
    repeats: int = 10
    #: CPU threads while profiling; None: cores / gpus.
    threads: int | None = None
    #: "time" (measured), "flops" (counted, reproducible) or "roofline" (published architectures).
    cost: str = "time"
    #: Let the compiler consider displaced patch parallelism (``sp``) for UNets. It reads
    #: one-step-stale halos, statistics and keys between bands (DistriFusion), so it is not
    #: exact: off unless asked for. Transformer token splits are exact and always considered.
    patch_parallel: bool = False
    #: "eager" or "compiled": how the plan's programs are timed and will run (``graph.compiled``).
    execution: str = "eager"

    def __post_init__(self) -> None:
        if self.execution not in ("eager", "compiled"):
            raise HybridiffError(f"execution {self.execution!r} is not one of eager, compiled")

    def but(self, **changes: Any) -> CompileOptions:
        """These options with ``changes``."""
        return dataclasses.replace(self, **changes)
