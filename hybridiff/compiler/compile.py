"""model -> traced graph -> costed graph -> partition -> Plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Callable, Iterable

import torch
from diffusers import UNet2DConditionModel
from torch import fx, nn

import hybridiff
from hybridiff import device as devices
from hybridiff.compiler.balance import balance
from hybridiff.compiler.cost import DeviceModel, NodeMeasure, device_of, forward_time, forward_times, profile_nodes
from hybridiff.compiler.mesh import candidate_meshes, parse_mesh
from hybridiff.compiler.options import CompileOptions
from hybridiff.compiler.partition import CutValue, Partition, best_partition, dependency_graph, replicated_needed
from hybridiff.compiler.patches import patch_split
from hybridiff.compiler.strategies import default_warmup, strategy_meshes, strategy_schedule
from hybridiff.compiler.tokens import token_split
from hybridiff.errors import HybridiffError
from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.pipeline import trace_pipeline
from hybridiff.graph.trace import Leaf, adapter_for, capture_denoiser_call, graph_fingerprint, trace_module
from hybridiff.models import load_pipeline, model_card, resolve_source
from hybridiff.models.arch import build_on_device
from hybridiff.plan import CutTensor, Estimates, GraphInfo, Mesh, ModelRef, PatchSplit, Plan, Schedule, Stage, StepCosts, TokenSplit
from hybridiff.simulate import Workload, forward_by_rows, serial_latency, simulate, step_seconds, window_step

#: Measures a 2-device plan's per-step costs on this machine (``hybridiff.calibrate``).
Calibrate = Callable[[Plan], StepCosts]


def branch_inputs(inputs: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a CFG-batched call into its (uncond, cond) halves, diffusers' batch order."""
    halves = {name: value.chunk(2) for name, value in inputs.items()}
    return {n: h[0] for n, h in halves.items()}, {n: h[1] for n, h in halves.items()}


def cost_model(
    model: str,
    options: CompileOptions,
    *,
    height: int | None = None,
    width: int | None = None,
    dtype: str = "float32",
    calibrate: Calibrate | None = None,
) -> CostedModel:
    """Load, trace and cost ``model`` (``builtin:NAME`` or a diffusers folder) for ``gpus``
    devices and ``batch`` images, ready for ``plan_for``.

    ``calibrate`` measures what a step costs besides compute on this machine (see
    ``hybridiff.calibrate``); without it plans assume nothing."""
    _check_gpus(options.gpus)
    source = resolve_source(model)
    device = devices.worker_device(0)
    torch.set_num_threads(options.threads or devices.default_threads(options.gpus))
    traced = trace_pipeline(load_pipeline(source, dtype, device))
    pipe = traced.pipe
    scale = pipe.vae_scale_factor
    height = height or traced.denoiser.config.sample_size * scale
    width = width or traced.denoiser.config.sample_size * scale
    # A guided call gives one row per branch and the two-row (serial CFG) batch to time.
    pipeline_kwargs = model_card(source).get("pipeline_kwargs", {})
    args, kwargs = capture_denoiser_call(pipe, height, width, guidance_scale=5.0, **pipeline_kwargs)
    both = traced.adapter.inputs_from_call(*args, **kwargs)
    _, cond = branch_inputs(both)
    rows = sorted({1, 2, options.batch, 2 * options.batch})
    timed = {r: both if r == 2 else _repeat_rows(cond, r) for r in rows}
    costed = cost_graph(
        traced.graph,
        options,
        latent=traced.adapter.latent,
        branch_inputs=cond,
        forward_rows_s=forward_times(traced.graph, timed, options.repeats),
        model=ModelRef(
            source=source,
            denoiser="unet" if traced.attr == "unet" else "sd3-transformer",
            height=height,
            width=width,
            dtype=dtype,
            pipeline_kwargs=pipeline_kwargs,
        ),
        device=devices.describe(device),
    )
    if calibrate is not None and options.gpus > 1:
        calibrate_steps(costed, options.schedule, calibrate)
    return costed


def compile_model(
    model: str,
    options: CompileOptions | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    dtype: str = "float32",
    calibrate: Calibrate | None = None,
    **changes: Any,
) -> Plan:
    """Compile ``model`` (``builtin:NAME`` or a diffusers folder) into a plan: ``cost_model``,
    then ``plan_for``. ``changes`` are ``CompileOptions`` fields to change, e.g. ``gpus=4``."""
    options = (options or CompileOptions()).but(**changes)
    costed = cost_model(model, options, height=height, width=width, dtype=dtype, calibrate=calibrate)
    return plan_for(costed, options)


def compile_module(
    model: nn.Module,
    example_inputs: tuple | dict[str, Any],
    options: CompileOptions | None = None,
    *,
    leaves: Iterable[Leaf] | None = None,
    latent: str | None = None,
    **changes: Any,
) -> Plan:
    """Compile any denoiser ``nn.Module`` from one branch's example inputs (the Python API).

    ``latent`` names the forward argument carrying the noisy sample (default: the first one);
    ``leaves`` lists submodules (objects, qualified names or classes) to keep opaque;
    ``changes`` are ``CompileOptions`` fields to change, e.g. ``gpus=4, cost="flops"``.
    """
    options = (options or CompileOptions(repeats=5)).but(**changes)
    _check_gpus(options.gpus)
    traced = trace_module(model, example_inputs, leaves)
    graph, inputs = traced.graph, traced.inputs
    latent = latent or traced.latent or next(iter(inputs))
    if latent not in inputs:
        raise HybridiffError(f"latent={latent!r} is not one of the traced inputs {sorted(inputs)}")
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters()), "float32")
    source = f"python:{type(model).__module__}.{type(model).__qualname__}"
    return compile_graph(
        graph,
        options,
        latent=latent,
        branch_inputs=inputs,
        forward_rows_s=None,
        model=ModelRef(source=source, denoiser="custom", dtype=dtype),
        device=devices.describe(device_of(inputs)),
    )


def cost_arch(
    arch: str,
    resolution: int,
    options: CompileOptions | None = None,
    *,
    dtype: str = "float16",
    device_model: DeviceModel | None = None,
    profile: bool = False,
) -> CostedModel:
    """Build and cost a published architecture at ``resolution`` pixels, ready for ``plan_for``.

    By default the model is built on the meta device and costed by the roofline model: no
    memory is allocated for weights or activations, so real-size plans compile on any machine.
    With ``profile`` the model gets random weights on this process's device and every node is
    timed there (median of ``repeats``): the plan then reflects the real device.
    """
    if resolution % 64:
        raise HybridiffError(f"--resolution {resolution} must be a multiple of 64 (latent multiple of 8)")
    options = options or CompileOptions()
    device = devices.worker_device(0) if profile else torch.device("meta")
    model = build_on_device(arch, device, getattr(torch, dtype))
    device_model = device_model or DeviceModel()
    call = partial(adapter_for(model).example_call, resolution // 8)
    traced, both = trace_module(model, call(1)), trace_module(model, call(2)).inputs
    if profile:
        serial = forward_time(traced.graph, both, options.repeats)
    else:
        serial = sum(m.cost_s for m in profile_nodes(traced.graph, both, 1, "roofline", device_model).values())
    return cost_graph(
        traced.graph,
        options.but(repeats=options.repeats if profile else 1, cost="time" if profile else "roofline"),
        latent=traced.latent,
        branch_inputs=traced.inputs,
        forward_rows_s={2: serial},
        model=ModelRef(
            source=f"arch:{arch}",
            denoiser="unet" if isinstance(model, UNet2DConditionModel) else "sd3-transformer",
            height=resolution,
            width=resolution,
            dtype=dtype,
        ),
        device=devices.describe(device) if profile else device_model.name,
        device_model=device_model,
    )


@dataclass
class CostedModel:
    """A graph's costs and what a plan says about its model, with its balanced partitions by
    stage count (made on first use): everything plans for any mesh and schedule are made from.
    ``hybridiff bench`` plans every strategy from one of these, so the model is costed once."""

    graph: fx.GraphModule
    latent: str
    branch_inputs: dict[str, Any]
    forward_s: float
    #: Whole forwards by row count, two rows (the serial CFG step) at least.
    forward_rows_s: dict[int, float]
    model: ModelRef
    link_gbps: float
    device: str
    repeats: int
    cost: str
    device_model: DeviceModel | None
    step_costs: StepCosts = field(default_factory=StepCosts)
    splits: dict[int, tuple[fx.GraphModule, list[str], dict[str, NodeMeasure], Partition]] = field(default_factory=dict)
    #: Node measures by graph fingerprint: partitions into different stage counts open the
    #: same blocks, and costing a graph is the slow part of planning.
    measures: dict[str, dict[str, NodeMeasure]] = field(default_factory=dict)

    def measure(self, gm: fx.GraphModule) -> dict[str, NodeMeasure]:
        """The measures of every node of ``gm`` (the graph or a refinement of it)."""
        key = graph_fingerprint(gm)
        if key not in self.measures:
            self.measures[key] = profile_nodes(gm, self.branch_inputs, self.repeats, self.cost, self.device_model)
        return self.measures[key]

    def split(self, stages: int) -> tuple[fx.GraphModule, list[str], dict[str, NodeMeasure], Partition]:
        """The balanced partition into ``stages`` (ValueError if the graph has too few blocks)."""
        if stages not in self.splits:

            def costed_split(gm: fx.GraphModule) -> tuple[dict[str, NodeMeasure], Partition]:
                measures = self.measure(gm)
                return measures, best_partition(gm, measures, stages, self.link_gbps * 1e9 / 8, self.latent)

            self.splits[stages] = balance(self.graph, costed_split)
        return self.splits[stages]

    def workload(self, stages: int, sp: int = 1) -> Workload:
        """What the simulator needs for ``stages`` stages; with ``sp > 1`` also what the shard
        peers exchange (a UNet's bands are recorded only when asked for)."""
        partition = self.split(stages)[3]
        return Workload(
            forward_by_rows=forward_by_rows(self.forward_s, self.forward_rows_s[2], self.forward_rows_s),
            stage_costs=partition.stage_costs,
            links=tuple((c.producer, to, c.bytes) for c in partition.cuts if c.constant is None for to in c.consumers),
            output_stage=next(i for i, nodes in enumerate(partition.stages) if "output" in nodes),
            prediction_bytes=partition.output_bytes,
            link_bytes_per_s=self.link_gbps * 1e9 / 8,
            step_costs=self.step_costs,
            tokens=self.tokens if sp > 1 else None,
            patches=self.patches if sp > 1 else None,
        )

    @cached_property
    def tokens(self) -> TokenSplit | None:
        """The graph's image tokens, where sequence parallelism can split them."""
        return token_split(self.graph, self.branch_inputs)

    @cached_property
    def patches(self) -> PatchSplit | None:
        """What a UNet's row bands exchange, where patch parallelism can split them."""
        return None if self.tokens is not None else patch_split(self.graph, self.branch_inputs, self.latent)

    def sp_allows(self, patches: bool) -> Callable[[int], bool] | None:
        """Which ``sp`` the graph allows (UNet bands only with ``patches``), or None."""
        split = self.tokens or (self.patches if patches else None)
        return split.allows if split is not None else None


def cost_graph(
    graph: fx.GraphModule,
    options: CompileOptions,
    *,
    latent: str,
    branch_inputs: dict[str, Any],
    forward_rows_s: dict[int, float] | None,
    model: ModelRef,
    device: str,
    device_model: DeviceModel | None = None,
) -> CostedModel:
    """Cost a traced graph given one guidance branch's inputs (one row).

    ``forward_rows_s`` holds whole forwards timed together by row count, two rows (the serial
    CFG step) at least; without it (custom models) the estimate assumes that rows cost in
    proportion. Without one row in it, one row is timed here."""
    if forward_rows_s and 1 in forward_rows_s:
        forward = forward_rows_s[1]
    elif options.cost == "roofline":
        forward = sum(m.cost_s for m in profile_nodes(graph, branch_inputs, 1, options.cost, device_model).values())
    else:
        forward = forward_time(graph, branch_inputs, options.repeats)
    return CostedModel(
        graph, latent, branch_inputs, forward, forward_rows_s or {2: 2 * forward},
        model, options.link_gbps, device, options.repeats, options.cost, device_model,
    )


def calibrate_steps(costed: CostedModel, schedule: Schedule, calibrate: Calibrate) -> None:
    """Measure what a step costs besides compute with a 2-device plan, for every later plan."""
    guided = schedule.guided
    probe = Mesh(world_size=2, dp=1, cfg=2 if guided else 1, pp=1 if guided else 2)
    costed.step_costs = calibrate(_assemble(costed, probe, costed.workload(2), {}, schedule=schedule))


def plan_for(costed: CostedModel, options: CompileOptions) -> Plan:
    """The plan for ``options.gpus`` devices and ``options.batch`` images.

    Every candidate mesh (or the one ``mesh`` names, or those ``strategy`` allows: see
    ``hybridiff.compiler.strategies``) is simulated for ``batch`` images and the fastest becomes
    the plan; one device alone is a candidate too, so a plan is never slower than not splitting
    the work. ``warmup`` is the pipeline strategy's (default: AsyncDiff's for the family)."""
    gpus, schedule, mesh, batch, strategy = options.gpus, options.schedule, options.mesh, options.batch, options.strategy
    # A UNet's bands are stale, so only a forced mesh or patch_parallel asks for them.
    splits = costed.sp_allows(patches=options.patch_parallel or mesh is not None)
    _check_gpus(gpus)
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
            work = costed.workload(candidate.replica_size, candidate.sp)
        except ValueError as e:
            if mesh or strategy:
                raise HybridiffError(f"--mesh {candidate.label}: {e}; use fewer pipeline stages") from None
            continue
        simulated[candidate.label] = (simulate(candidate, work, schedule, batch).latency_s, candidate, work)
    if not any(m.world_size == gpus for _, m, _ in simulated.values()) and strategy != "serial":
        raise HybridiffError(f"--gpus {gpus}: the graph has too few blocks to mesh {gpus} devices; use fewer devices")
    # Fastest first; on a tie, fewer idle devices, then split guidance branches (cfg = 2).
    _, chosen, work = min(simulated.values(), key=lambda v: (round(v[0], 9), len(v[1].idle_ranks), -v[1].cfg, v[1].dp))
    plan = _assemble(costed, chosen, work, {label: v[0] for label, v in simulated.items()}, schedule=schedule)
    return plan.model_copy(update={"strategy": strategy}) if strategy else plan


def compile_graph(
    graph: fx.GraphModule, options: CompileOptions, *, calibrate: Calibrate | None = None, **described: Any
) -> Plan:
    """Cost and partition a traced graph into a plan (``described``: what ``cost_graph`` needs
    besides the options); ``calibrate`` measures the per-step costs of a 2-device plan before
    meshes are compared."""
    costed = cost_graph(graph, options, **described)
    if calibrate is not None and options.gpus > 1:
        calibrate_steps(costed, options.schedule, calibrate)
    return plan_for(costed, options)


def _candidates(gpus: int, guided: bool, batch: int, splits: Callable[[int], bool] | None) -> list[Mesh]:
    """Every mesh for ``gpus`` devices, and one device alone (a plan that uses fewer)."""
    meshes = candidate_meshes(gpus, guided, batch, splits)
    return meshes + [Mesh(world_size=1, dp=1, cfg=1, pp=1, batch=batch)] if gpus > 1 else meshes


def _tokens_in(graph: fx.GraphModule, tokens: TokenSplit | None) -> TokenSplit | None:
    """The model's token split, where the (refined) graph kept its two nodes."""
    names = {n.name for n in graph.graph.nodes}
    return tokens if tokens and {tokens.shard_after, tokens.gather_after} <= names else None


def _assemble(costed: CostedModel, chosen: Mesh, work: Workload, alternatives: dict[str, float], *, schedule: Schedule) -> Plan:
    """The plan for ``chosen``, with its estimates."""
    graph, refined, measures, partition = costed.split(chosen.replica_size)
    batch = chosen.batch
    latency = simulate(chosen, work, schedule, batch).latency_s
    one = simulate(chosen.model_copy(update={"batch": 1}), work, schedule, 1)
    # One mid-window step of one image: its time and the bytes it moves come from one place.
    window = window_step(chosen, work, schedule.rows(1), schedule.window_guidance)
    serial = serial_latency(work, schedule, batch)
    doubled = _two_row_values(graph, costed.branch_inputs, [c.node for c in partition.cuts])
    estimates = Estimates(
        device=costed.device,
        threads=torch.get_num_threads(),
        link_gbps=costed.link_gbps,
        forward_s=costed.forward_s,
        forward_batch2_s=costed.forward_rows_s[2],
        forward_rows_s={r: t for r, t in costed.forward_rows_s.items() if r > 2},
        prediction_bytes=partition.output_bytes,
        window_step_s=step_seconds(window),
        window_comm_bytes_per_step=window[2],
        comm_bytes_per_image=one.comm_bytes,
        expected_tau1=schedule.expected_tau1,
        latency_s=latency,
        serial_latency_s=serial,
        speedup=serial / latency,
        alternatives=alternatives or {chosen.label: latency},
        step_costs=work.step_costs,
    )
    return Plan(
        hybridiff_version=hybridiff.__version__,
        model=costed.model,
        graph=GraphInfo(
            fingerprint=graph_fingerprint(graph),
            num_nodes=len(graph.graph.nodes),
            latent=costed.latent,
            refined=refined,
            replicated=list(partition.replicated),
            tokens=_tokens_in(graph, costed.tokens),
            patches=costed.patches if chosen.sp > 1 and costed.tokens is None else None,
        ),
        mesh=chosen,
        stages=_stages(graph, partition),
        cut_tensors=[_cut_tensor(c, measures[c.node], doubled.get(c.node)) for c in partition.cuts],
        schedule=schedule,
        estimates=estimates,
    )


def _repeat_rows(inputs: dict[str, Any], times: int) -> dict[str, Any]:
    """``inputs`` with every batched tensor repeated ``times`` along its batch (first) dimension."""
    return {k: torch.cat([v] * times) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in inputs.items()}


def _two_row_values(graph: fx.GraphModule, one_row: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The values of ``names`` when the graph runs two rows: shows how each grows with rows.

    Empty when the graph cannot run two rows (torch.export graphs are specialised to their
    example shapes): the plan then records no batch dimension and runs one row per stage."""
    two = _repeat_rows(one_row, 2)
    runner = GraphRunner(graph)
    program = runner.program([n.name for n in graph.graph.nodes if n.op != "placeholder"], keep=names)
    try:
        with torch.inference_mode():
            return runner.run(program, two)
    except Exception:  # noqa: BLE001 - any failure means the same: rows cannot grow
        return {}


def _cut_tensor(cut: CutValue, one: NodeMeasure, two: Any) -> CutTensor:
    """A plan entry for ``cut`` from its one-row measure and its two-row value (None: unknown)."""
    batch_dim = per_row = None
    if isinstance(two, torch.Tensor):
        grown = [d for d, (a, b) in enumerate(zip(one.shape or (), two.shape)) if a != b]
        if len(grown) == 1 and two.shape[grown[0]] == 2 * one.shape[grown[0]]:
            batch_dim = grown[0]
    elif cut.constant is not None and two is not None and two != cut.constant:
        if isinstance(two, tuple) and isinstance(cut.constant, tuple) and len(two) == len(cut.constant):
            per_row = [b - a for a, b in zip(cut.constant, two)]
        elif isinstance(two, (int, float)):
            per_row = two - cut.constant
    return CutTensor(
        node=cut.node,
        producer=cut.producer,
        consumers=list(cut.consumers),
        shape=list(one.shape or ()),
        dtype=one.dtype or "constant",
        bytes=cut.bytes,
        batch_dim=batch_dim,
        constant=list(cut.constant) if isinstance(cut.constant, tuple) else cut.constant,
        constant_per_row=per_row,
    )


def _check_gpus(gpus: int) -> None:
    if gpus < 1:
        raise HybridiffError(f"--gpus {gpus}: a plan needs at least one device")


def _stages(gm: fx.GraphModule, partition: Partition) -> list[Stage]:
    g = dependency_graph(gm)
    rep = set(partition.replicated)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    stages = []
    for index, (nodes, cost, sent) in enumerate(zip(partition.stages, partition.stage_costs, partition.stage_sent_bytes)):
        recompute = sorted(replicated_needed(g, rep, set(nodes)), key=order.__getitem__)
        stages.append(Stage(index=index, nodes=list(nodes), recompute=recompute, cost_s=cost, send_bytes=sent))
    return stages
