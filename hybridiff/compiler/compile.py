"""model -> traced graph -> costed graph -> partition -> Plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from diffusers import UNet2DConditionModel
from torch import fx, nn

import hybridiff
from hybridiff import device as devices
from hybridiff.compiler import schedule as sched
from hybridiff.compiler.cost import DeviceModel, NodeMeasure, device_of, forward_time, profile_nodes
from hybridiff.compiler.adapters import UNetAdapter
from hybridiff.compiler.balance import balance
from hybridiff.compiler.partition import Partition, best_partition, dependency_graph, replicated_needed
from hybridiff.compiler.refine import apply_refinements
from hybridiff.compiler.trace import Leaf, capture_denoiser_call, graph_fingerprint, trace_module
from hybridiff.errors import HybridiffError
from hybridiff.models import load_pipeline, resolve_source
from hybridiff.models.arch import build_on_device
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


def trace_pipeline(pipe: Any, refined: Iterable[str] = ()) -> TracedModel:
    adapter = UNetAdapter(pipe.unet)
    graph = apply_refinements(adapter.trace(), refined)
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
    _check_gpus(gpus)
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
    _, cond = branch_inputs(both)
    return compile_graph(
        traced.graph,
        latent=traced.adapter.latent,
        branch_inputs=cond,
        serial_step_s=forward_time(traced.graph, both, repeats),
        model=ModelRef(source=source, denoiser="unet", height=height, width=width, dtype=dtype),
        gpus=gpus,
        schedule=schedule,
        link_gbps=link_gbps,
        repeats=repeats,
        cost=cost,
        device=devices.describe(device),
    )


def compile_module(
    model: nn.Module,
    example_inputs: tuple | dict[str, Any],
    gpus: int = 2,
    *,
    leaves: Iterable[Leaf] | None = None,
    latent: str | None = None,
    schedule: Schedule = sched.DEFAULT_SCHEDULE,
    link_gbps: float = DEFAULT_LINK_GBPS,
    repeats: int = 5,
    cost: str = "time",
) -> Plan:
    """Compile any denoiser ``nn.Module`` from one branch's example inputs (the Python API).

    ``latent`` names the forward argument carrying the noisy sample (default: the first one);
    ``leaves`` lists submodules (objects, qualified names or classes) to keep opaque.
    """
    _check_gpus(gpus)
    traced = trace_module(model, example_inputs, leaves)
    graph, inputs = traced.graph, traced.inputs
    latent = latent or traced.latent or next(iter(inputs))
    if latent not in inputs:
        raise HybridiffError(f"latent={latent!r} is not one of the traced inputs {sorted(inputs)}")
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), "float32")
    return compile_graph(
        graph,
        latent=latent,
        branch_inputs=inputs,
        serial_step_s=None,
        model=ModelRef(source=f"python:{type(model).__module__}.{type(model).__qualname__}", denoiser="custom", dtype=dtype),
        gpus=gpus,
        schedule=schedule,
        link_gbps=link_gbps,
        repeats=repeats,
        cost=cost,
        device=devices.describe(device_of(inputs)),
    )


def compile_arch(
    arch: str,
    resolution: int,
    gpus: int = 2,
    schedule: Schedule = sched.DEFAULT_SCHEDULE,
    link_gbps: float = DEFAULT_LINK_GBPS,
    dtype: str = "float16",
    device_model: DeviceModel | None = None,
    profile: bool = False,
    repeats: int = 10,
) -> Plan:
    """Compile a published architecture at ``resolution`` pixels.

    By default the model is built on the meta device and costed by the roofline model: no
    memory is allocated for weights or activations, so real-size plans compile on any machine.
    With ``profile`` the model gets random weights on this process's device and every node is
    timed there (median of ``repeats``): the plan then reflects the real device.
    """
    _check_gpus(gpus)
    if resolution % 64:
        raise HybridiffError(f"--resolution {resolution} must be a multiple of 64 (latent multiple of 8)")
    device = devices.worker_device(0) if profile else torch.device("meta")
    model = build_on_device(arch, device, getattr(torch, dtype))
    latent = resolution // 8
    config = model.config
    device_model = device_model or DeviceModel()

    def call(batch: int) -> dict[str, Any]:
        """Keyword arguments of one denoiser call, as the model's pipeline makes it."""
        gen = torch.Generator().manual_seed(batch)

        def meta(*shape: int, dt: torch.dtype = model.dtype) -> torch.Tensor:
            if device.type == "meta":
                return torch.empty(batch, *shape, device=device, dtype=dt)
            return torch.randn(batch, *shape, generator=gen).to(device, dt)

        if isinstance(model, UNet2DConditionModel):
            kwargs: dict[str, Any] = {
                "sample": meta(config.in_channels, latent, latent),
                "timestep": meta(dt=torch.float32),
                "encoder_hidden_states": meta(77, config.cross_attention_dim),
            }
            if config.addition_embed_type == "text_time":
                text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                kwargs["added_cond_kwargs"] = {"text_embeds": meta(text), "time_ids": meta(6)}
            return kwargs
        return {  # SD3: 77 + 77 CLIP tokens and 256 T5 tokens, as the SD3 pipeline builds them
            "hidden_states": meta(config.in_channels, latent, latent),
            "encoder_hidden_states": meta(333, config.joint_attention_dim),
            "pooled_projections": meta(config.pooled_projection_dim),
            "timestep": meta(dt=torch.float32),
        }

    traced, both = trace_module(model, call(1)), trace_module(model, call(2)).inputs
    if profile:
        serial = forward_time(traced.graph, both, repeats)
    else:
        serial = sum(m.cost_s for m in profile_nodes(traced.graph, both, 1, "roofline", device_model).values())
    return compile_graph(
        traced.graph,
        latent=traced.latent,
        branch_inputs=traced.inputs,
        serial_step_s=serial,
        model=ModelRef(
            source=f"arch:{arch}",
            denoiser="unet" if isinstance(model, UNet2DConditionModel) else "sd3-transformer",
            height=resolution,
            width=resolution,
            dtype=dtype,
        ),
        gpus=gpus,
        schedule=schedule,
        link_gbps=link_gbps,
        repeats=repeats if profile else 1,
        cost="time" if profile else "roofline",
        device=devices.describe(device) if profile else device_model.name,
        device_model=device_model,
    )


def compile_graph(
    graph: fx.GraphModule,
    *,
    latent: str,
    branch_inputs: dict[str, Any],
    serial_step_s: float | None,
    model: ModelRef,
    gpus: int,
    schedule: Schedule,
    link_gbps: float,
    repeats: int,
    cost: str,
    device: str,
    device_model: DeviceModel | None = None,
) -> Plan:
    """Cost and partition a traced graph given one guidance branch's inputs.

    ``serial_step_s`` is the cost of one step on one device with both branches batched;
    without it (custom models) the estimate assumes twice the batch-1 forward.
    """
    link_bytes_per_s = link_gbps * 1e9 / 8

    def costed_split(gm: fx.GraphModule) -> tuple[dict[str, NodeMeasure], Partition]:
        measures = profile_nodes(gm, branch_inputs, repeats, cost, device_model)
        return measures, best_partition(gm, measures, gpus, link_bytes_per_s, latent)

    graph, refined, measures, partition = balance(graph, costed_split)
    prediction_bytes = partition.output_bytes
    if cost == "roofline":
        forward = sum(m.cost_s for m in measures.values())
    else:
        forward = forward_time(graph, branch_inputs, repeats)
    branch_step = forward + prediction_bytes * (gpus - 1) / link_bytes_per_s
    serial_step = serial_step_s if serial_step_s is not None else 2 * forward
    hybrid = sched.hybrid_latency(schedule, branch_step, partition.window_step_s)
    cut_bytes = sum(c.bytes * len(c.consumers) for c in partition.cuts)
    estimates = Estimates(
        device=device,
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
        model=model,
        graph=GraphInfo(
            fingerprint=graph_fingerprint(graph),
            num_nodes=len(graph.graph.nodes),
            latent=latent,
            refined=refined,
            replicated=list(partition.replicated),
        ),
        mesh=Mesh(
            world_size=gpus,
            ranks=[RankRole(rank=r, branch="uncond" if r < gpus // 2 else "cond") for r in range(gpus)],
        ),
        stages=_stages(graph, partition),
        cut_tensors=[
            CutTensor(
                node=c.node,
                producer=c.producer,
                consumers=list(c.consumers),
                shape=list(measures[c.node].shape or ()),
                dtype=measures[c.node].dtype or "constant",
                bytes=c.bytes,
                constant=list(c.constant) if isinstance(c.constant, tuple) else c.constant,
            )
            for c in partition.cuts
        ],
        schedule=schedule,
        estimates=estimates,
    )


def _check_gpus(gpus: int) -> None:
    if gpus < 2 or gpus % 2:
        raise HybridiffError(
            f"--gpus {gpus}: plans need an even number of at least 2 devices (one group per guidance branch)"
        )


def _stages(gm: fx.GraphModule, partition: Partition) -> list[Stage]:
    g = dependency_graph(gm)
    rep = set(partition.replicated)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    stages = []
    for index, (nodes, cost, sent) in enumerate(zip(partition.stages, partition.stage_costs, partition.stage_sent_bytes)):
        recompute = sorted(replicated_needed(g, rep, set(nodes)), key=order.__getitem__)
        stages.append(Stage(index=index, rank=index, nodes=list(nodes), recompute=recompute, cost_s=cost, send_bytes=sent))
    return stages
