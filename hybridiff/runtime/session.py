"""One run of a plan on this process: load, validate, generate, report.

The same code serves the three modes, which differ only in what stands in for the denoiser:
``serial`` keeps the stock denoiser (the baseline, observed for its discrepancy curve),
``emulate`` runs every rank's share of the hybrid schedule in this process, one replica after
another, and ``hybrid`` runs this process's rank under torch.distributed.

Images are shared out as the plan's mesh says (``Mesh.replica_images``): round-robin over
the mesh's replicas, ``images_per_call`` at a time through one stock pipeline call. The first
rank of each replica decodes its images; at the end rank 0 gathers everything and writes
``image-<i>.png`` per image and ``report.json``.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hybridiff import device as devices
from hybridiff.compiler.compile import trace_pipeline
from hybridiff.errors import HybridiffError
from hybridiff.models import load_pipeline
from hybridiff.plan import Plan, load_plan, write_atomic
from hybridiff.runtime.denoiser import HybridDenoiser, ObservedDenoiser
from hybridiff.runtime.requests import ImageRequest
from hybridiff.runtime import shared
from hybridiff.runtime.schedulers import use_scheduler
from hybridiff.runtime.spans import Spans
from hybridiff.runtime.transport import DistTransport, LocalTransport, Transport

Mode = Literal["hybrid", "emulate", "serial"]

#: How long a collective may wait for a peer before the run fails instead of hanging.
TIMEOUT_S = int(os.environ.get("HYBRIDIFF_TIMEOUT_S", "300"))


@dataclass(frozen=True)
class RunOptions:
    plan: Path
    requests: tuple[ImageRequest, ...]
    out: Path
    mode: Mode = "hybrid"
    steps: int | None = None
    guidance_scale: float | None = None
    threads: int | None = None
    repeats: int = 1
    window_guidance: Literal["mixed", "cached"] | None = None
    scheduler: str | None = None
    #: Folder for per-rank step traces (``rank-<r>.json``) and the report's ``profile_ms``.
    trace: Path | None = None


@dataclass
class _Call:
    """One pipeline call of a replica: which images, what it took, what it sent."""

    replica: int
    index: int
    images: list[int]
    latency_runs_s: list[float]
    record: dict[str, Any]
    comm: dict[str, int]
    pngs: dict[int, bytes]


def _init_distributed(plan: Plan, device: torch.device) -> int:
    """Join the process group torchrun/elastic set up; returns this process's rank."""
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds NCCL's communicator to this GPU instead of a guess from the rank
            dist.init_process_group("nccl", timeout=timedelta(seconds=TIMEOUT_S), device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    if dist.get_world_size() != plan.mesh.world_size:
        raise HybridiffError(
            f"the plan is for {plan.mesh.world_size} devices but {dist.get_world_size()} workers were "
            f"launched; launch {plan.mesh.world_size} or recompile with --gpus {dist.get_world_size()}"
        )
    return dist.get_rank()


def _placement(opts: RunOptions, plan: Plan) -> devices.Placement:
    """This process's device, threads and cores. Serial and emulated runs get the compute of
    one of the plan's devices, as the plan's costs and the hybrid workers do."""
    if opts.mode == "hybrid" and "RANK" not in os.environ:
        raise HybridiffError("hybrid mode needs launched workers; use `hybridiff run` or torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if opts.mode == "hybrid" else 0
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", plan.mesh.world_size))
    return devices.placement(local_rank, local_workers, opts.threads)


def _load(opts: RunOptions) -> Plan:
    plan = load_plan(opts.plan)
    if opts.window_guidance is not None:  # the user's explicit override of the plan's choice
        schedule = plan.schedule.model_copy(update={"window_guidance": opts.window_guidance})
        plan = plan.model_copy(update={"schedule": schedule})
    if plan.model.source.startswith(("arch:", "python:")):
        raise HybridiffError(
            f"{opts.plan} is a plan for {plan.model.source}, which is compile-only: the runtime executes plans "
            "of pipelines it can load (builtin:NAME or a diffusers pipeline folder)"
        )
    if not opts.requests:
        raise HybridiffError("nothing to generate: give --prompt or --prompts FILE")
    return plan


def execute(opts: RunOptions) -> dict[str, Any] | None:
    """Run the plan; returns the report on the rank that writes outputs, else None."""
    plan = _load(opts)
    where = _placement(opts, plan)
    with devices.placed(where):
        try:
            return _execute(opts, plan, where)
        finally:
            if opts.mode == "hybrid" and dist.is_initialized():
                dist.destroy_process_group()  # on every way out, failures included


def _execute(opts: RunOptions, plan: Plan, where: devices.Placement) -> dict[str, Any] | None:
    device = where.device
    rank = _init_distributed(plan, device) if opts.mode == "hybrid" else 0
    pipe = load_pipeline(plan.model.source, plan.model.dtype, device)
    if opts.scheduler:
        use_scheduler(pipe, opts.scheduler)
    traced = trace_pipeline(pipe, plan.graph.refined)
    if traced.fingerprint != plan.graph.fingerprint:
        raise HybridiffError(
            f"plan fingerprint {plan.graph.fingerprint} does not match the model's graph "
            f"({traced.fingerprint}): the model changed since the plan was compiled; recompile it"
        )
    steps = opts.steps or plan.schedule.steps
    guidance = opts.guidance_scale if opts.guidance_scale is not None else plan.schedule.guidance_scale
    images = len(opts.requests)

    spans = Spans(enabled=opts.trace is not None)
    transport = _dist_transport(plan, where, spans) if opts.mode == "hybrid" else None
    work = _work(opts, plan, rank)
    writer = rank == 0
    show = writer and images > 1
    pipe.set_progress_bar_config(disable=None if writer else True, leave=False)
    calls: list[_Call] = []
    with tqdm(total=sum(len(c) for _, share in work for c in share), desc="images", unit="img", disable=None if show else True) as bar:
        for replica, share in work:
            if opts.mode == "serial":
                proxy: Any = ObservedDenoiser(traced.denoiser, traced.attr, spans)
            else:
                local = transport or LocalTransport(plan.mesh.replica_ranks(replica), spans)
                proxy = HybridDenoiser(traced, plan, local, replica)
            decoder = opts.mode != "hybrid" or proxy.ranks[0] == rank  # a replica's first rank decodes
            for index, chosen in enumerate(share):
                calls.append(_run_call(pipe, proxy, opts, plan, replica, index, chosen, steps, guidance, decoder, device))
                bar.update(len(chosen))

    if opts.trace is not None:
        spans.write(opts.trace / f"rank-{rank}.json", f"rank {rank} ({opts.mode})")
    everything = _gather((calls, spans.breakdown()), opts.mode)
    report = _write_outputs(opts, plan, everything, steps, guidance, device) if writer else None
    if transport is not None:
        transport.close()
    if opts.mode == "hybrid":
        # Leave together: a rank that exits while its peer still holds the gloo group open can
        # abort at teardown, which leaves a torchrun peer waiting at its exit.
        dist.barrier()
    return report


def _work(opts: RunOptions, plan: Plan, rank: int) -> list[tuple[int, list[list[int]]]]:
    """(replica, its calls' image indices) for what this process generates: the serial
    baseline takes the plan's batch per call; the mesh shares images out as the simulator
    assumes (``Mesh.replica_images``), and a hybrid rank takes its replica's share."""
    images = len(opts.requests)
    if opts.mode == "serial":
        per_call = plan.mesh.batch
        return [(0, [list(range(i, min(i + per_call, images))) for i in range(0, images, per_call)])]
    work = list(enumerate(plan.mesh.replica_images(images)))
    if opts.mode == "emulate":
        return work
    located = plan.mesh.locate(rank)
    return [work[located[0]]] if located else []


def _dist_transport(plan: Plan, where: devices.Placement, spans: Spans) -> DistTransport:
    """Bound CPU workers poll instead of sleeping, and share memory when all run on one machine."""
    own_cores = where.cores is not None
    one_machine = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    return DistTransport(
        [plan.mesh.replica_ranks(d) for d in range(plan.mesh.dp)],
        spans,
        spin=own_cores,
        shared=own_cores and one_machine and shared.supported(),
        timeout_s=TIMEOUT_S,
    )


def _run_call(
    pipe: Any,
    proxy: Any,
    opts: RunOptions,
    plan: Plan,
    replica: int,
    index: int,
    chosen: list[int],
    steps: int,
    guidance: float,
    decode: bool,
    device: torch.device,
) -> _Call:
    """Generate the images ``chosen`` in one pipeline call, ``opts.repeats`` times."""
    transport: Transport | None = getattr(proxy, "transport", None)
    latencies, result, comm = [], None, {}
    for _ in range(opts.repeats):
        latency, result = _generate(pipe, proxy, [opts.requests[i] for i in chosen], plan, steps, guidance, decode, device)
        latencies.append(latency)
        if transport is not None:
            comm = transport.take_counts()  # per call: counts restart each repeat
    controller = getattr(proxy, "controller", None)
    record = {
        "tau1": controller.tau1 if controller else None,
        "tau2": controller.tau2 if controller else None,
        "phases": [p.value for p in controller.phases] if controller else ["serial"] * steps,
        "discrepancy": proxy.discrepancy,
    }
    pngs = {}
    if decode:
        for i, image in zip(chosen, result):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs[i] = buffer.getvalue()
    return _Call(replica, index, chosen, latencies, record, comm, pngs)


def _generate(
    pipe: Any,
    proxy: Any,
    requests: list[ImageRequest],
    plan: Plan,
    steps: int,
    guidance: float,
    decode: bool,
    device: torch.device,
) -> tuple[float, Any]:
    """One call of the stock pipeline; returns (denoising-loop seconds, images or None)."""
    ends: list[float] = []

    def clock(_pipe: Any, step: int, _t: Any, kwargs: dict) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter())
        proxy.spans.end_step(ends[-1], proxy.phase_name(step))
        return kwargs

    negatives = [r.negative_prompt for r in requests]
    proxy.begin_call(steps, guided=guidance > 1)
    with proxy.installed(pipe), torch.inference_mode():
        result = pipe(
            prompt=[r.prompt for r in requests],
            # diffusers takes one negative prompt per image or none at all
            negative_prompt=None if all(n is None for n in negatives) else [n or "" for n in negatives],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=plan.model.height,
            width=plan.model.width,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests],
            output_type="pil" if decode else "latent",
            callback_on_step_end=clock,
            **plan.model.pipeline_kwargs,
        )
    return ends[-1] - proxy.loop_start, result.images if decode else None


#: What each process hands rank 0: its calls and its step breakdown (empty unless traced).
_Share = tuple[list[_Call], dict[str, dict[str, Any]]]


def _gather(share: _Share, mode: Mode) -> list[_Share]:
    """Every process's share on rank 0, in rank order."""
    if mode != "hybrid":
        return [share]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(share, gathered, dst=0)
    return gathered or []


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _entry(request: ImageRequest, index: int, call: _Call, comm: dict[str, int]) -> dict[str, Any]:
    """The report's entry for image ``index``, generated by ``call``."""
    return {
        "index": index,
        "image": f"image-{index}.png",
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "seed": request.seed,
        "replica": call.replica,
        "call": call.index,
        "images_in_call": len(call.images),
        "latency_s": _median(call.latency_runs_s),
        "latency_runs_s": call.latency_runs_s,
        **call.record,
        "comm_bytes": sum(comm.values()),
        "comm_bytes_by_phase": comm,
    }


def _write_outputs(
    opts: RunOptions, plan: Plan, everything: list[_Share], steps: int, guidance: float, device: torch.device
) -> dict[str, Any]:
    """Write every image and ``report.json`` atomically; returns the report."""
    merged: dict[tuple[int, int], _Call] = {}
    comm: dict[tuple[int, int], dict[str, int]] = {}
    for calls, _ in everything:
        for call in calls:
            key = (call.replica, call.index)
            counted = comm.setdefault(key, {})
            for phase, n in call.comm.items():
                counted[phase] = counted.get(phase, 0) + n
            if call.pngs or key not in merged:
                merged[key] = call
    entries: dict[int, dict[str, Any]] = {}
    busy: dict[int, float] = {}
    for key, call in sorted(merged.items()):
        busy[call.replica] = busy.get(call.replica, 0.0) + _median(call.latency_runs_s)
        for i in call.images:
            write_atomic(opts.out / f"image-{i}.png", call.pngs[i])
            entries[i] = _entry(opts.requests[i], i, call, comm[key])
    by_phase: dict[str, int] = {}
    for counted in comm.values():
        for phase, n in counted.items():
            by_phase[phase] = by_phase.get(phase, 0) + n
    denoise_s = max(busy.values())
    report = {
        "mode": opts.mode,
        "world_size": 1 if opts.mode == "serial" else plan.mesh.world_size,
        "mesh": "serial" if opts.mode == "serial" else plan.mesh.label,
        "plan_fingerprint": plan.graph.fingerprint,
        "model": plan.model.source,
        "steps": steps,
        "guidance_scale": guidance,
        "scheduler": opts.scheduler or "default",
        "window_guidance": plan.schedule.window_guidance,
        "threads": torch.get_num_threads(),
        "device": devices.describe(device),
        "images": [entries[i] for i in sorted(entries)],
        "totals": {
            "images": len(entries),
            "calls": len(merged),
            "denoise_s": denoise_s,
            "images_per_s": len(entries) / denoise_s if denoise_s else None,
            "comm_bytes": sum(by_phase.values()),
            "comm_bytes_by_phase": by_phase,
        },
    }
    if opts.trace is not None:
        report["profile_ms"] = {str(rank): profile for rank, (_, profile) in enumerate(everything)}
    write_atomic(opts.out / "report.json", json.dumps(report, indent=2) + "\n")
    return report
