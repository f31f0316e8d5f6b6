"""One run of a plan on this process: load, validate, generate, report.

The same code serves the three modes, which differ only in what stands in for the denoiser:
``serial`` keeps the stock denoiser (the baseline, observed for its discrepancy curve),
``emulate`` runs every rank's share of the hybrid schedule in this process, one replica after
another, and ``hybrid`` runs this process's rank under torch.distributed.

Images are shared out as the plan's mesh says (``Mesh.replica_images``): round-robin over
the mesh's replicas, ``images_per_call`` at a time through one stock pipeline call. The first
rank of each replica decodes its images and writes ``image-<i>.png`` as soon as its call
ends (a decoder on another machine hands its PNGs to rank 0 at the end instead). Rank 0
keeps ``report.json`` (``hybridiff.runtime.report``) from the start to the end of the run.
"""

from __future__ import annotations

import io
import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from hybridiff import device as devices
from hybridiff.errors import HybridiffError, Interrupted, one_line
from hybridiff.files import write_atomic
from hybridiff.graph.pipeline import TracedModel, trace_pipeline
from hybridiff.models import load_pipeline
from hybridiff.plan import Plan, load_plan
from hybridiff.runtime import shared, watchdog
from hybridiff.runtime.checks import check_plan_graph, check_run, warn_truncated_prompts
from hybridiff.runtime.denoiser import HybridDenoiser, ObservedDenoiser
from hybridiff.runtime.options import STORE_ENV, Mode, RunOptions
from hybridiff.runtime.report import Call, RunReport
from hybridiff.runtime.requests import ImageRequest
from hybridiff.runtime.samplers import use_scheduler
from hybridiff.runtime.spans import Spans
from hybridiff.runtime.transport import DistTransport, LocalTransport, Transport


def _init_distributed(plan: Plan, device: torch.device) -> int:
    """Join the process group torchrun or the local launcher set up; returns this process's
    rank. The local launcher hands over a file store: nothing listens on the network."""
    if not dist.is_initialized():
        timeout = timedelta(seconds=watchdog.timeout_s())
        backend = "nccl" if device.type == "cuda" else "gloo"
        joined: dict[str, Any] = {"timeout": timeout}
        if os.environ.get(STORE_ENV):
            world = int(os.environ["WORLD_SIZE"])
            joined.update(store=dist.FileStore(os.environ[STORE_ENV], world), rank=int(os.environ["RANK"]), world_size=world)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # device_id binds NCCL's communicator to this GPU instead of a guess from the rank
            joined["device_id"] = device
        dist.init_process_group(backend, **joined)
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
    if opts.mode == "hybrid":
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
        try:
            return _execute(opts, plan, where)
        finally:
            if opts.mode == "hybrid" and dist.is_initialized():
                dist.destroy_process_group()  # on every way out, failures included


def _execute(opts: RunOptions, plan: Plan, where: devices.Placement) -> dict[str, Any] | None:
    rank = _init_distributed(plan, where.device) if opts.mode == "hybrid" else 0
    steps = opts.steps or plan.schedule.steps
    guidance = opts.guidance_scale if opts.guidance_scale is not None else plan.schedule.guidance_scale
    report = RunReport(opts.out, opts.requests, _header(opts, plan, steps, guidance, where.device)) if rank == 0 else None
    if report is not None:
        report.write("running")
    try:
        traced = _load_model(opts, plan, where.device, report is not None)
        spans = Spans(enabled=opts.trace is not None)
        transport = _dist_transport(plan, where, spans) if opts.mode == "hybrid" else None
        calls = _generate_share(opts, plan, traced, transport, spans, rank, report, steps, guidance, where.device)
        if opts.trace is not None:
            spans.write(opts.trace / f"rank-{rank}.json", f"rank {rank} ({opts.mode})")
        everything = _gather((calls, spans.breakdown()), opts.mode)
        result = None
        if report is not None:
            profile = {"profile_ms": {str(r): p for r, (_, p) in enumerate(everything)}} if opts.trace else {}
            result = report.complete([c for share, _ in everything for c in share], **profile)
    except BaseException as e:
        if report is not None:
            report.write("interrupted" if isinstance(e, (Interrupted, KeyboardInterrupt)) else "failed", error=one_line(e))
        raise
    if transport is not None:
        transport.close()
    if opts.mode == "hybrid":
        # Leave together: a rank that exits while its peer still holds the gloo group open can
        # abort at teardown, which leaves a torchrun peer waiting at its exit.
        dist.barrier()
    return result


def _header(opts: RunOptions, plan: Plan, steps: int, guidance: float, device: torch.device) -> dict[str, Any]:
    return {
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
        "requested_images": len(opts.requests),
    }


def _load_model(opts: RunOptions, plan: Plan, device: torch.device, writer: bool) -> TracedModel:
    """Load, swap the scheduler, trace and check the model against the plan."""
    pipe = load_pipeline(plan.model.source, plan.model.dtype, device)
    if opts.scheduler:
        use_scheduler(pipe, opts.scheduler)
    traced = trace_pipeline(pipe, plan.graph.refined)
    if traced.fingerprint != plan.graph.fingerprint:
        raise HybridiffError(
            f"plan fingerprint {plan.graph.fingerprint} does not match the model's graph "
            f"({traced.fingerprint}): the model changed since the plan was compiled; recompile it"
        )
    check_plan_graph(plan, traced.graph)
    if writer:
        warn_truncated_prompts(pipe, opts)
    pipe.set_progress_bar_config(disable=None if writer else True, leave=False)
    return traced


def _generate_share(
    opts: RunOptions,
    plan: Plan,
    traced: TracedModel,
    transport: DistTransport | None,
    spans: Spans,
    rank: int,
    report: RunReport | None,
    steps: int,
    guidance: float,
    device: torch.device,
) -> list[Call]:
    """Generate this process's share of the images, writing each call's images as it ends."""
    work = _work(opts, plan, rank)
    show = report is not None and len(opts.requests) > 1
    # A decoder on rank 0's machine writes its images itself; one elsewhere hands them over.
    writes_here = opts.mode != "hybrid" or os.environ.get("GROUP_RANK", "0") == "0"
    calls: list[Call] = []
    total = sum(len(c) for _, share in work for c in share)
    with tqdm(total=total, desc="images", unit="img", disable=None if show else True) as bar:
        for replica, share in work:
            if opts.mode == "serial":
                proxy: Any = ObservedDenoiser(traced.denoiser, traced.attr, spans)
            else:
                local = transport or LocalTransport(plan.mesh.replica_ranks(replica), spans)
                proxy = HybridDenoiser(traced, plan, local, replica)
            decoder = opts.mode != "hybrid" or proxy.ranks[0] == rank  # a replica's first rank decodes
            for index, chosen in enumerate(share):
                call = _run_call(traced.pipe, proxy, opts, plan, replica, index, chosen, steps, guidance, decoder, device)
                if writes_here:
                    for i, png in call.pngs.items():
                        write_atomic(opts.out / f"image-{i}.png", png)
                    call.pngs = {}
                if report is not None:
                    report.add(call)
                calls.append(call)
                bar.update(len(chosen))
    return calls


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
        timeout_s=watchdog.timeout_s(),
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
) -> Call:
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
    return Call(replica, index, chosen, latencies, record, comm, pngs)


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
        watchdog.advance()
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
_Share = tuple[list[Call], dict[str, dict[str, Any]]]


def _gather(share: _Share, mode: Mode) -> list[_Share]:
    """Every process's share on rank 0, in rank order."""
    if mode != "hybrid":
        return [share]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(share, gathered, dst=0)
    return gathered or []
