"""Peer parallel strategies as presets of a plan's mesh and schedule.

Every strategy a user compares hybrid against is a plan the same runtime executes, so all of
them share one code path, one report and one way of being timed (``hybridiff bench``):

- ``serial``: one device; ``bench`` runs it as the stock pipeline.
- ``cfg-parallel``: condition partitioning only, one guidance branch per device and no window
  (``cfg=2, pp=1, k=0``): xDiT's cfg_parallel, DistriFusion's split_batch. Exact.
- ``pipeline``: AsyncDiff's stale-activation pipeline with stride 1 over all devices, guidance
  exact (``cfg=1, pp=N``: every stage runs both branches), from a fixed warm-up to the last step.
- ``hybrid``: the paper's schedule, guidance mixed inside the window (``cfg=2``).
- ``hybrid-cached``: the same with the window keeping guidance (``window_guidance=cached``).

A fixed warm-up is the discrepancy rule switched off (``g_slope=0`` never fires, so the window
opens at ``tau_cap``): steps ``0 .. warmup-1`` run whole, the window runs to the last step.
"""

from __future__ import annotations

from typing import Literal, get_args

from hybridiff.compiler.mesh import candidate_meshes
from hybridiff.errors import HybridiffError
from hybridiff.plan import Mesh, Schedule

StrategyName = Literal["serial", "cfg-parallel", "pipeline", "hybrid", "hybrid-cached"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)
#: Strategies whose window length ``k`` is a free parameter (the k sweep).
WINDOWED = ("hybrid", "hybrid-cached")

#: AsyncDiff's warm-up steps (whole forwards before the pipeline starts) by denoiser family, the
#: defaults of its example scripts (github.com/czg1225/AsyncDiff): ``examples/run_sd.py`` and
#: ``examples/run_sdxl.py`` pass ``--warm_up 9`` for SD 1.5/2.1 and SDXL at 50 steps;
#: ``examples/run_sd3.py`` passes ``--warm_up 1`` for SD3 at 28 steps. Other models get 1,
#: the default of its ``AsyncDiff(..., warm_up=1)``.
ASYNCDIFF_WARMUP = {"unet": 9, "sd3-transformer": 1}


def default_warmup(denoiser: str) -> int:
    """AsyncDiff's own warm-up for a denoiser family (``ModelRef.denoiser``)."""
    return ASYNCDIFF_WARMUP.get(denoiser, 1)


def parse_strategies(text: str, option: str = "--strategies") -> list[str]:
    """``"serial,hybrid"`` as strategy names, or a one-line error naming the known ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise HybridiffError(f"{option} {text!r}: unknown {unknown or 'empty list'}; choose from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def strategy_schedule(name: str, schedule: Schedule, warmup: int) -> Schedule:
    """``schedule`` as strategy ``name`` runs it (``warmup`` matters to ``pipeline`` only)."""
    if name in ("cfg-parallel", "hybrid", "hybrid-cached") and not schedule.guided:
        raise HybridiffError(f"strategy {name!r} splits the guidance branches; it needs --guidance-scale > 1")
    if name in ("serial", "cfg-parallel"):
        return schedule.model_copy(update={"k": 0})
    if name == "pipeline":
        if not 1 <= warmup < schedule.steps:
            raise HybridiffError(f"--warmup {warmup}: the pipeline strategy needs 1 <= warmup < steps ({schedule.steps})")
        return schedule.model_copy(update={"g_slope": 0.0, "tau_cap": warmup - 1, "k": schedule.steps - warmup})
    return schedule.model_copy(update={"window_guidance": "cached" if name == "hybrid-cached" else "mixed"})


def strategy_meshes(name: str, gpus: int, batch: int) -> list[Mesh]:
    """The meshes strategy ``name`` may use on ``gpus`` devices for ``batch`` images."""
    if name == "serial":
        return [Mesh(world_size=1, dp=1, cfg=1, pp=1, batch=batch)]
    if gpus < 2:
        raise HybridiffError(f"strategy {name!r} needs at least 2 devices; raise --gpus")
    if name == "cfg-parallel":
        return [Mesh(world_size=gpus, dp=dp, cfg=2, pp=1, batch=batch) for dp in range(1, min(batch, gpus // 2) + 1)]
    if name == "pipeline":
        return [Mesh(world_size=gpus, dp=1, cfg=1, pp=gpus, batch=batch)]
    return [m for m in candidate_meshes(gpus, True, batch) if m.cfg == 2]
