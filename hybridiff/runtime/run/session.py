"""One run of a plan on this process (``hybridiff run``): load, validate, generate, report.

Generation goes through the Python API's ``ParallelPipeline``, so the CLI and users' own
code share one execution path. The three modes differ only in what stands in for the
denoiser: ``serial`` keeps the stock denoiser (the baseline, observed for its discrepancy
curve), ``emulate`` runs every rank's share of the hybrid schedule in this process, one
replica after another, and ``hybrid`` runs this process's rank under torch.distributed.

Images are shared out as the plan's mesh says (``Mesh.replica_images``): round-robin over the
mesh's replicas, ``images_per_call`` of them per replica and call. Each call's images reach
rank 0 when it ends, which writes ``image-<i>.png`` then, and keeps ``report.json``
(``hybridiff.runtime.run.report``) from the start to the end of the run.
"""

from __future__ import annotations

import contextlib
import io
import os
from functools import partial
from typing import Any

import torch
from tqdm.auto import tqdm

from hybridiff import device as devices
from hybridiff.errors import HybridiffError, Interrupted, one_line
from hybridiff.files import write_atomic
from hybridiff.models import load_pipeline
from hybridiff.plan import Plan, load_plan
from hybridiff.runtime import watchdog
from hybridiff.runtime.api import DISTRIBUTED
from hybridiff.runtime.api.parallel import ParallelPipeline
from hybridiff.runtime.run.checks import check_run, warn_truncated_prompts
from hybridiff.runtime.run.compilation import Compilation
from hybridiff.runtime.run.options import RunOptions
from hybridiff.runtime.run.report import Call, RunReport
from hybridiff.runtime.run.requests import ImageRequest
from hybridiff.runtime.run.samplers import use_scheduler


def _placement(opts: RunOptions, plan: Plan) -> devices.Placement:
    """This process's device, threads and cores. Serial and emulated runs get the compute of
    one of the plan's devices, as the plan's costs and the hybrid workers do."""
    launched = opts.mode in DISTRIBUTED
    if launched and "RANK" not in os.environ:
        raise HybridiffError(f"{opts.mode} mode needs launched workers; use `hybridiff run` or torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", plan.mesh.world_size))
    if launched:
        devices.check_fits(local_workers)  # torchrun may start more ranks than the machine has GPUs
    return devices.placement(local_rank, local_workers, opts.threads)


def load_run_plan(opts: RunOptions) -> Plan:
    """The plan ``opts`` runs, with the user's overrides, checked against ``opts``."""
    plan = load_plan(opts.plan)
    if opts.window_guidance is not None:  # the user's explicit override of the plan's choice
        schedule = plan.schedule.model_copy(update={"window_guidance": opts.window_guidance})
        plan = plan.model_copy(update={"schedule": schedule})
    check_run(opts, plan)
    return plan


def execute(opts: RunOptions) -> dict[str, Any] | None:
    """Run the plan; returns the report on the rank that writes outputs, else None."""
    watchdog.timeout_s()  # a bad value fails here, not at the first collective
    plan = load_run_plan(opts)
    where = _placement(opts, plan)
    with devices.placed(where):
        return _execute(opts, plan, where)


def _execute(opts: RunOptions, plan: Plan, where: devices.Placement) -> dict[str, Any] | None:
    rank = int(os.environ.get("RANK", "0")) if opts.mode in DISTRIBUTED else 0
    steps = opts.steps or plan.schedule.steps
    guidance = opts.guidance_scale if opts.guidance_scale is not None else plan.schedule.guidance_scale
    report = RunReport(opts.out, opts.requests, _header(opts, plan, steps, guidance, where.device)) if rank == 0 else None
    if report is not None:
        report.write("running")
    try:
        pipe = load_pipeline(plan.model.source, plan.model.dtype, where.device)
        if opts.scheduler:
            use_scheduler(pipe, opts.scheduler)
        if report is not None:
            warn_truncated_prompts(pipe, opts)
        pipe.set_progress_bar_config(disable=None if report is not None else True, leave=False)
        trace = opts.trace is not None
        own_cores = where.cores is not None
        with ParallelPipeline(pipe, plan, opts.mode, where.device, trace=trace, own_cores=own_cores, execution=opts.execution) as ppipe:
            compiling = Compilation(ppipe.execution == "compiled")
            _generate(opts, plan, ppipe, report, steps, guidance, compiling)
            if trace:
                ppipe.write_trace(opts.trace / f"rank-{ppipe.rank}.json")
            profiles = ppipe.step_breakdowns()
            compiled = compiling.summary(ppipe.agreement.exchange(compiling.record()))
            if report is not None:
                return report.complete(compilation=compiled, **({"profile_ms": dict(enumerate(profiles))} if trace else {}))
    except BaseException as e:
        if report is not None:
            # a full disk may refuse the report as well: the error to tell is the first one
            with contextlib.suppress(HybridiffError):
                report.write("interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "failed", error=one_line(e))
        raise
    return None


def _header(opts: RunOptions, plan: Plan, steps: int, guidance: float, device: torch.device) -> dict[str, Any]:
    return {
        "mode": opts.mode,
        "world_size": _world(opts, plan),
        "mesh": {"serial": "serial", "ulysses": f"diffusers ulysses={_world(opts, plan)}"}.get(opts.mode, plan.mesh.label),
        "plan_fingerprint": plan.graph.fingerprint,
        "model": plan.model.source,
        "steps": steps,
        "guidance_scale": guidance,
        "scheduler": opts.scheduler or "default",
        "window_guidance": plan.schedule.window_guidance,
        "window_warning": plan.schedule.short_call(steps) if guidance > 1 else None,
        "execution": "eager" if opts.mode == "ulysses" else opts.execution or plan.execution,
        "plan_costed_with": plan.execution,
        "threads": torch.get_num_threads(),
        "device": devices.describe(device),
        "requested_images": len(opts.requests),
    }


def _world(opts: RunOptions, plan: Plan) -> int:
    """The processes ``opts`` runs on: the launched world for diffusers' Ulysses."""
    if opts.mode == "ulysses":
        return int(os.environ.get("WORLD_SIZE", "1"))
    return 1 if opts.mode == "serial" else plan.mesh.world_size


def _generate(
    opts: RunOptions, plan: Plan, ppipe: ParallelPipeline, report: RunReport | None, steps: int, guidance: float,
    compiling: Compilation,
) -> None:
    """Generate every requested image, ``per_call`` at a time: each call is shared among the
    mesh's replicas (image i of a call to replica i % dp), which generate their share together,
    as ``Mesh.replica_images`` and the simulator assume; the serial baseline takes the plan's
    batch per call. Rank 0 writes each call's images and report entries as it ends. Compiled,
    an untimed call of each size compiles first (``Compilation``)."""
    per_call = plan.mesh.batch if opts.mode in ("serial", "ulysses") else plan.mesh.dp * plan.mesh.images_per_call
    total = len(opts.requests)
    show = report is not None and total > 1
    with tqdm(total=total, desc="images", unit="img", disable=None if show else True) as bar:
        for index, start in enumerate(range(0, total, per_call)):
            chosen = list(range(start, min(start + per_call, total)))
            one_call = partial(_call, ppipe, [opts.requests[i] for i in chosen], steps, guidance)
            compiling.warm_up(len(chosen), one_call)
            runs = [compiling.timed(one_call) for _ in range(opts.repeats)]
            output, last = runs[-1]
            if report is not None:
                for i, image in zip(chosen, output.images):
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    write_atomic(opts.out / f"image-{i}.png", buffer.getvalue())
                for k, done in enumerate(last.replicas):
                    record = {"tau1": done.tau1, "tau2": done.tau2, "phases": done.phases, "discrepancy": done.discrepancy}
                    latencies = [run.replicas[k].latency_s for _, run in runs]
                    images = [chosen[j] for j in done.images]
                    report.add(Call(done.replica, index, images, latencies, record, done.comm_bytes_by_phase))
            bar.update(len(chosen))


def _call(ppipe: ParallelPipeline, requests: list[ImageRequest], steps: int, guidance: float) -> tuple[Any, Any]:
    """One call of the parallel pipeline for ``requests``: (output, report) on rank 0."""
    negatives = [r.negative_prompt for r in requests]
    # diffusers takes one negative prompt per image or none at all (then the model card's, if any)
    given = {} if all(n is None for n in negatives) else {"negative_prompt": [n or "" for n in negatives]}
    output = ppipe(
        prompt=[r.prompt for r in requests],
        num_inference_steps=steps,
        generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
        output_type="pil",
        **{ppipe.guidance.scale: guidance},
        **given,
    )
    return output, ppipe.last_report
