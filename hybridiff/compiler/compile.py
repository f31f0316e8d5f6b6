"""model -> traced graph -> costed graph -> partition -> Plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

import hybridiff
from hybridiff import device as devices
from hybridiff.compiler import schedule as sched
from hybridiff.compiler.cost import forward_time, profile_nodes
from hybridiff.compiler.partition import Partition, dependency_graph, replicated_needed, split_contiguous
from hybridiff.compiler.trace import UNetAdapter, capture_denoiser_call, graph_fingerprint
from hybridiff.errors import HybridiffError
from hybridiff.execution import GraphRunner
from hybridiff.models import load_pipeline, resolve_source
from hybridiff.plan import CutTensor, Estimates, GraphInfo, Mesh, ModelRef, Plan, RankRole, Schedule, Stage

#: Default link bandwidth: PCIe 3.0 x16 moves ~15.75 GB/s raw, ~100 Gbit/s in practice.
DEFAULT_LINK_GBPS = 100.0


@dataclass(frozen=True)
class TracedModel:
    """A loaded pipeline with its traced denoiser: what both compiler and runtime start from."""

    pipe: Any
    adapter: UNetAdapter
    graph: fx.GraphModule
    fingerprint: str


def trace_pipeline(pipe: Any) -> TracedModel:
    adapter = UNetAdapter(pipe.unet)
    graph = adapter.trace()
    return TracedModel(pipe, adapter, graph, graph_fingerprint(graph))


def branch_inputs(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a CFG-batched call into its (uncond, cond) halves, diffusers' batch order."""
    halves = {name: value.chunk(2) for name, value in inputs.items()}
    return {n: h[0] for n, h in halves.items()}, {n: h[1] for n, h in halves.items()}


def compile_model(
    model: str,
    gpus: int = 2,
    schedule: Schedule = sched.DEFAULT_SCHEDULE,
    height: int | None = None,
    width: int | None = None,
    link_gbps: float = DEFAULT_LINK_GBPS,
    repeats: int = 10,
    threads: int | None = None,
    dtype: str = "float32",
    cost: str = "time",
) -> Plan:
    """Compile ``model`` (``builtin:NAME`` or a diffusers folder) into a plan for ``gpus`` devices."""
    if gpus != 2:
        raise HybridiffError(f"--gpus {gpus} is not supported yet; this version builds 2-device plans")
    source = resolve_source(model)
    device = devices.worker_device(0)
    torch.set_num_threads(threads or devices.default_threads(gpus))
    traced = trace_pipeline(load_pipeline(source, dtype, device))
    pipe = traced.pipe
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    args, kwargs = capture_denoiser_call(pipe, height, width, schedule.guidance_scale)
    both = traced.adapter.inputs_from_call(*args, **kwargs)
    uncond, cond = branch_inputs(both)

    measures = profile_nodes(traced.graph, cond, repeats, cost)
    link_bytes_per_s = link_gbps * 1e9 / 8
    partition = split_contiguous(traced.graph, measures, gpus, link_bytes_per_s)
    ranks = [RankRole(rank=0, branch="uncond"), RankRole(rank=1, branch="cond")]
    prediction_bytes = partition.output_bytes
    branch_step = forward_time(traced.graph, cond, repeats) + prediction_bytes * (gpus - 1) / link_bytes_per_s
    serial_step = forward_time(traced.graph, both, repeats)
    hybrid = sched.hybrid_latency(schedule, branch_step, partition.window_step_s)
    cut_bytes = sum(c.bytes * len(c.consumers) for c in partition.cuts)
    estimates = Estimates(
        device=devices.describe(device),
        threads=torch.get_num_threads(),
        link_gbps=link_gbps,
        serial_step_s=serial_step,
        branch_step_s=branch_step,
        window_step_s=partition.window_step_s,
        window_comm_bytes_per_step=partition.window_comm_bytes_per_step,
        comm_bytes_per_image=sched.comm_bytes_per_image(schedule, gpus, prediction_bytes, cut_bytes, partition.output_bytes),
        expected_tau1=sched.expected_tau1(schedule),
        speedup_bound=schedule.steps * serial_step / hybrid,
    )
    return Plan(
        hybridiff_version=hybridiff.__version__,
        model=ModelRef(source=source, height=height, width=width, dtype=dtype),
        graph=GraphInfo(fingerprint=traced.fingerprint, num_nodes=len(traced.graph.graph.nodes), replicated=list(partition.replicated)),
        mesh=Mesh(world_size=gpus, ranks=ranks),
        stages=_stages(traced.graph, partition),
        cut_tensors=[
            CutTensor(
                node=c.node,
                producer=c.producer,
                consumers=list(c.consumers),
                shape=list(measures[c.node].shape),
                dtype=measures[c.node].dtype,
                bytes=c.bytes,
            )
            for c in partition.cuts
        ],
        schedule=schedule,
        estimates=estimates,
    )


def _stages(gm: fx.GraphModule, partition: Partition) -> list[Stage]:
    g = dependency_graph(gm)
    rep = set(partition.replicated)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    stages = []
    for index, (nodes, cost) in enumerate(zip(partition.stages, partition.stage_costs)):
        recompute = sorted(replicated_needed(g, rep, set(nodes)), key=order.__getitem__)
        stages.append(Stage(index=index, rank=index, nodes=list(nodes), recompute=recompute, cost_s=cost))
    return stages


def chain_stages(gm: fx.GraphModule, plan: Plan, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the plan's stages one after another in one process with fresh (not stale) values.

    Equal to the model's forward when the partition is correct: every value a stage needs
    is either recomputed by it, an input, or a cut tensor an earlier stage produced.
    """
    runner = GraphRunner(gm)
    env = dict(inputs)
    out = None
    for stage in plan.stages:
        sends = [c.node for c in plan.cut_tensors if c.producer == stage.index]
        values = runner.run(runner.program(stage.recompute + stage.nodes, keep=sends), env)
        env.update({k: v for k, v in values.items() if k in sends})
        out = values.get("output", out)
    return out
