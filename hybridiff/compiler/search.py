"""Choosing the mesh: every candidate's step programs are simulated for the batch and the
fastest becomes the plan (``emit``)."""

from __future__ import annotations

from typing import Callable

from hybridiff.compiler.costing import CostedModel, Workload
from hybridiff.compiler.emit import assemble
from hybridiff.compiler.mesh import candidate_meshes, parse_mesh
from hybridiff.compiler.options import CompileOptions
from hybridiff.compiler.strategies import default_warmup, strategy_meshes, strategy_schedule
from hybridiff.errors import HybridiffError
from hybridiff.plan import Mesh, Plan, Schedule, StepCosts
from hybridiff.simulate import simulate

#: Measures a 2-device plan's per-step costs on this machine (``hybridiff.calibrate``).
Calibrate = Callable[[Plan], StepCosts]


def check_gpus(gpus: int) -> None:
    if gpus < 1:
        raise HybridiffError(f"--gpus {gpus}: a plan needs at least one device")


def calibrate_steps(costed: CostedModel, schedule: Schedule, calibrate: Calibrate) -> None:
    """Measure what a step costs besides compute with a 2-device plan, for every later plan."""
    guided = schedule.guided
    probe = Mesh(world_size=2, dp=1, cfg=2 if guided else 1, pp=1 if guided else 2)
    costed.step_costs = calibrate(assemble(costed, probe, costed.workload(probe, schedule), {}, schedule=schedule))


def plan_for(costed: CostedModel, options: CompileOptions) -> Plan:
    """The plan for ``options.gpus`` devices and ``options.batch`` images.

    Every candidate mesh (or the one ``mesh`` names, or those ``strategy`` allows: see
    ``hybridiff.compiler.strategies``) is simulated for ``batch`` images and the fastest becomes
    the plan; one device alone is a candidate too, so a plan is never slower than not splitting
    the work. ``warmup`` is the pipeline strategy's (default: AsyncDiff's for the family)."""
    gpus, schedule, mesh, batch, strategy = options.gpus, options.schedule, options.mesh, options.batch, options.strategy
    # A UNet's bands are stale, so only a forced mesh or patch_parallel asks for them.
    splits = costed.sp_allows(patches=options.patch_parallel or mesh is not None)
    check_gpus(gpus)
    if batch < 1:
        raise HybridiffError(f"--batch {batch}: need at least one image")
    if strategy is not None:
        schedule = strategy_schedule(strategy, schedule, options.warmup or default_warmup(costed.model.denoiser))
        candidates = [parse_mesh(mesh, gpus, schedule.guided, batch, splits)] if mesh else strategy_meshes(strategy, gpus, batch)
    else:
        candidates = [parse_mesh(mesh, gpus, schedule.guided, batch, splits)] if mesh else _candidates(gpus, schedule.guided, batch, splits)
    simulated: dict[str, tuple[float, Mesh, Workload]] = {}
    for candidate in candidates:
        try:
            runs = schedule.for_stages(candidate.replica_size)
            work = costed.workload(candidate, runs)
        except ValueError as e:
            if mesh or strategy:
                raise HybridiffError(f"--mesh {candidate.label}: {e}; use fewer pipeline stages") from None
            continue
        simulated[candidate.label] = (simulate(candidate, work, runs, batch).latency_s, candidate, work)
    if not any(m.world_size == gpus for _, m, _ in simulated.values()) and strategy != "serial":
        raise HybridiffError(f"--gpus {gpus}: the graph has too few blocks to mesh {gpus} devices; use fewer devices")
    # Fastest first; on a tie, fewer idle devices, then split guidance branches (cfg = 2).
    _, chosen, work = min(simulated.values(), key=lambda v: (round(v[0], 9), len(v[1].idle_ranks), -v[1].cfg, v[1].dp))
    runs = schedule.for_stages(chosen.replica_size)
    plan = assemble(costed, chosen, work, {label: v[0] for label, v in simulated.items()}, schedule=runs)
    return plan.model_copy(update={"strategy": strategy}) if strategy else plan


def _candidates(gpus: int, guided: bool, batch: int, splits: Callable[[int], bool] | None) -> list[Mesh]:
    """Every mesh for ``gpus`` devices, and one device alone (a plan that uses fewer)."""
    meshes = candidate_meshes(gpus, guided, batch, splits)
    return meshes + [Mesh(world_size=1, dp=1, cfg=1, pp=1, batch=batch)] if gpus > 1 else meshes
