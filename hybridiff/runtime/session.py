"""One run of a plan on this process: load, validate, generate, report.

The same code serves the three modes, which differ only in what stands in for the UNet:
``serial`` keeps the stock UNet (the baseline, observed for its discrepancy curve),
``emulate`` runs every rank's share of the hybrid schedule in this process, and ``hybrid``
runs this process's rank under torch.distributed. Only rank 0 decodes and writes outputs.
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

from hybridiff import device as devices
from hybridiff.compiler.compile import trace_pipeline
from hybridiff.errors import HybridiffError
from hybridiff.models import load_pipeline
from hybridiff.plan import Plan, load_plan, write_atomic
from hybridiff.runtime.denoiser import HybridDenoiser, ObservedUNet
from hybridiff.runtime.transport import DistTransport, LocalTransport, Transport

Mode = Literal["hybrid", "emulate", "serial"]

#: How long a collective may wait for a peer before the run fails instead of hanging.
TIMEOUT_S = int(os.environ.get("HYBRIDIFF_TIMEOUT_S", "300"))


@dataclass(frozen=True)
class RunOptions:
    plan: Path
    prompt: str
    out: Path
    mode: Mode = "hybrid"
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    threads: int | None = None
    repeats: int = 1
    window_guidance: Literal["mixed", "cached"] | None = None


def _init_distributed(plan: Plan) -> tuple[int, int]:
    """Join the process group torchrun/elastic set up; returns (rank, local_rank)."""
    if "RANK" not in os.environ:
        raise HybridiffError("hybrid mode needs launched workers; use `hybridiff run` or torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = devices.worker_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))
    if dist.get_world_size() != plan.mesh.world_size:
        raise HybridiffError(
            f"the plan is for {plan.mesh.world_size} devices but {dist.get_world_size()} workers were "
            f"launched; launch {plan.mesh.world_size} or recompile with --gpus {dist.get_world_size()}"
        )
    return dist.get_rank(), local_rank


def execute(opts: RunOptions) -> dict[str, Any] | None:
    """Run the plan; returns the report on the rank that writes outputs, else None."""
    plan = load_plan(opts.plan)
    if opts.window_guidance is not None:  # the user's explicit override of the plan's choice
        schedule = plan.schedule.model_copy(update={"window_guidance": opts.window_guidance})
        plan = plan.model_copy(update={"schedule": schedule})
    compile_only = plan.model.source.startswith(("arch:", "python:"))
    if compile_only or plan.model.denoiser != "unet":
        raise HybridiffError(
            f"{opts.plan} is a plan for {plan.model.source}, which is compile-only here: this runtime "
            "executes plans of UNet pipelines (builtin:NAME or a pipeline folder)"
        )
    rank, local_rank = _init_distributed(plan) if opts.mode == "hybrid" else (0, 0)
    local_workers = int(os.environ.get("LOCAL_WORLD_SIZE", plan.mesh.world_size))
    torch.set_num_threads(opts.threads or devices.default_threads(local_workers))
    device = devices.worker_device(local_rank)

    pipe = load_pipeline(plan.model.source, plan.model.dtype, device)
    traced = trace_pipeline(pipe, plan.graph.refined)
    if traced.fingerprint != plan.graph.fingerprint:
        raise HybridiffError(
            f"plan fingerprint {plan.graph.fingerprint} does not match the model's graph "
            f"({traced.fingerprint}): the model changed since the plan was compiled; recompile it"
        )
    transport: Transport | None = None
    if opts.mode == "serial":
        proxy: ObservedUNet | HybridDenoiser = ObservedUNet(pipe.unet)
    else:
        transport = LocalTransport(plan.mesh.world_size) if opts.mode == "emulate" else DistTransport()
        proxy = HybridDenoiser(traced, plan, transport)

    steps = opts.steps or plan.schedule.steps
    guidance = opts.guidance_scale if opts.guidance_scale is not None else plan.schedule.guidance_scale
    writer = rank == 0
    latencies, image, comm = [], None, {}
    for _ in range(opts.repeats):
        latency, image = _generate(pipe, proxy, opts, plan, steps, guidance, decode=writer, device=device)
        latencies.append(latency)
        if transport is not None:
            comm = transport.total_bytes_sent()  # per image: counts restart each repeat
            transport.reset_counts()
    report = _write_outputs(opts, plan, proxy, image, latencies, comm, steps, guidance, device) if writer else None
    if opts.mode == "hybrid":
        # Leave together and cleanly: a rank that exits while its peer still holds the gloo
        # group open can abort at teardown, which leaves a torchrun peer waiting at its exit.
        dist.barrier()
        dist.destroy_process_group()
    return report


def _write_outputs(
    opts: RunOptions,
    plan: Plan,
    proxy: Any,
    image: Any,
    latencies: list[float],
    comm: dict[str, int],
    steps: int,
    guidance: float,
    device: torch.device,
) -> dict[str, Any]:
    """Write ``image-0.png`` and ``report.json`` atomically; returns the report."""
    controller = getattr(proxy, "controller", None)
    report = {
        "mode": opts.mode,
        "world_size": 1 if opts.mode == "serial" else plan.mesh.world_size,
        "plan_fingerprint": plan.graph.fingerprint,
        "model": plan.model.source,
        "prompt": opts.prompt,
        "negative_prompt": opts.negative_prompt,
        "seed": opts.seed,
        "steps": steps,
        "guidance_scale": guidance,
        "threads": torch.get_num_threads(),
        "device": devices.describe(device),
        "latency_s": sorted(latencies)[len(latencies) // 2],
        "latency_runs_s": latencies,
        "tau1": controller.tau1 if controller else None,
        "tau2": controller.tau2 if controller else None,
        "discrepancy": proxy.discrepancy,
        "phases": [p.value for p in controller.phases] if controller else ["serial"] * steps,
        "window_guidance": plan.schedule.window_guidance,
        "comm_bytes": sum(comm.values()),
        "comm_bytes_by_phase": comm,
        "image": "image-0.png",
    }
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_atomic(opts.out / "image-0.png", buffer.getvalue())
    write_atomic(opts.out / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def _generate(
    pipe: Any,
    proxy: Any,
    opts: RunOptions,
    plan: Plan,
    steps: int,
    guidance: float,
    decode: bool,
    device: torch.device,
) -> tuple[float, Any]:
    """One image through the stock pipeline; returns (denoising-loop seconds, image or None)."""
    ends: list[float] = []

    def clock(_pipe: Any, _step: int, _t: Any, kwargs: dict) -> dict:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ends.append(time.perf_counter())
        return kwargs

    proxy.begin_image(steps)
    with proxy.installed(pipe), torch.inference_mode():
        result = pipe(
            prompt=opts.prompt,
            negative_prompt=opts.negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=plan.model.height,
            width=plan.model.width,
            generator=torch.Generator("cpu").manual_seed(opts.seed),
            output_type="pil" if decode else "latent",
            callback_on_step_end=clock,
        )
    return ends[-1] - proxy.loop_start, result.images[0] if decode else None
