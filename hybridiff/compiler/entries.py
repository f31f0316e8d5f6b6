"""The compiler's entry points: model -> traced graph -> costed graph (``costing``) -> mesh
search (``search``) -> Plan (``emit``), for built-in and diffusers models, published
architectures and any ``nn.Module``."""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Iterable

import torch
from diffusers import UNet2DConditionModel
from torch import fx, nn

from hybridiff import device as devices
from hybridiff import load
from hybridiff.compiler.cost import DeviceModel, device_of, forward_time, forward_times, profile_nodes
from hybridiff.compiler.costing import CostedModel, cost_graph
from hybridiff.compiler.options import CompileOptions
from hybridiff.compiler.search import Calibrate, calibrate_steps, check_gpus, plan_for
from hybridiff.compiler.sizing import ForwardSize, available_bytes, size_forward, to_meta, traced_on_meta
from hybridiff.errors import HybridiffError, one_line
from hybridiff.graph.guidance import CallPattern, batch_branches
from hybridiff.graph.pipeline import TracedModel, default_image_size, example_call, trace_pipeline
from hybridiff.graph.rows import branch_inputs, repeat_rows
from hybridiff.graph.trace import Leaf, adapter_for, capture_denoiser_calls, denoiser_attr, trace_module
from hybridiff.models import load_pipeline, model_card, resolve_source
from hybridiff.models.arch import build_on_device
from hybridiff.plan import ModelRef, Plan


def guided_inputs(traced: TracedModel, height: int, width: int, pipeline_kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The graph inputs of one guided step, ``[uncond; cond]``: the pipeline's batched call, or
    its two calls (conditional, then unconditional) stacked."""
    guidance = traced.guidance
    calls = 2 if guidance.calls == "two-calls" else 1
    captured = capture_denoiser_calls(traced.pipe, height, width, calls, **{**pipeline_kwargs, **guidance.example(True)})
    inputs = [traced.adapter.inputs_from_call(*args, **kwargs) for args, kwargs in captured]
    return inputs[0] if calls == 1 else batch_branches(inputs[1], inputs[0], traced.adapter.latent)


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
    check_gpus(options.gpus)
    source = resolve_source(model)
    device = devices.worker_device(0)
    torch.set_num_threads(options.threads or devices.default_threads(options.gpus))
    busy = _background_load(options, device)
    pipe = load_pipeline(source, dtype, device)
    height, width = height or default_image_size(pipe), width or default_image_size(pipe)
    pipeline_kwargs = model_card(source).get("pipeline_kwargs", {})
    traced, cond, forwards, rate = _forwards(pipe, options, height, width, pipeline_kwargs)
    costed = cost_graph(
        traced.graph,
        options,
        latent=traced.adapter.latent,
        branch_inputs=cond,
        forward_rows_s=forwards,
        seconds_per_flop=rate,
        model=ModelRef(
            source=source,
            denoiser=traced.adapter.name,
            height=height,
            width=width,
            dtype=dtype,
            pipeline_kwargs=pipeline_kwargs,
            guidance_calls=traced.guidance.calls,
        ),
        device=devices.describe(device),
    )
    costed.background_busy_cores = busy
    if calibrate is not None and options.gpus > 1:
        calibrate_steps(costed, options.schedule, calibrate)
    return costed


#: ``--cost flops`` prices a forward predicted to take longer than this instead of running it.
RUN_LIMIT_S = 5.0
#: ``--cost time`` refuses a forward predicted to take longer than this: timing every node of it
#: ``repeats`` times would take hours.
TIME_LIMIT_S = 300.0


def _forwards(
    pipe: Any, options: CompileOptions, height: int, width: int, pipeline_kwargs: dict[str, Any]
) -> tuple[TracedModel, dict[str, Any], dict[int, float], float | None]:
    """The traced denoiser and one branch's inputs to cost, whole forwards by row count, and the
    seconds per FLOP its nodes are priced at. The model is sized on a meta copy first; where a
    forward is too big to run here (``_priced_rate``) that copy is what is costed, its forwards
    priced from their FLOPs."""
    call = partial(example_call, pipe, height, width, **pipeline_kwargs)
    rows = sorted({1, 2, options.batch, 2 * options.batch})
    try:
        sized = traced_on_meta(pipe, call)
        # the pipeline's calls, captured once: a graph traced on meta takes the same inputs
        both = guided_inputs(sized, height, width, pipeline_kwargs)
        _, meta_cond = branch_inputs(to_meta(both), sized.adapter.latent)
        size = size_forward(sized.graph, meta_cond)
    except ValueError as e:  # the model's own limit, e.g. SD3's pos_embed_max_size
        model = type(getattr(pipe, denoiser_attr(pipe))).__name__
        raise HybridiffError(f"{model} refuses {width}x{height} images ({one_line(e)}); give a size it takes") from None
    rate = _priced_rate(pipe, size, max(rows), options, (height, width), pipeline_kwargs)
    if rate is not None:
        return sized, meta_cond, {r: r * size.flops * rate for r in rows}, rate
    traced = trace_pipeline(pipe, call=call)
    # A guided call gives one row per branch and the two-row (serial CFG) batch to time.
    _, cond = branch_inputs(both, traced.adapter.latent)
    timed = {r: both if r == 2 else repeat_rows(cond, r) for r in rows}
    return traced, cond, forward_times(traced.graph, timed, options.repeats, options.execution), None


def _priced_rate(
    pipe: Any, size: ForwardSize, rows: int, options: CompileOptions, pixels: tuple[int, int], pipeline_kwargs: dict[str, Any]
) -> float | None:
    """Seconds per FLOP (measured at the model's default size) to price forwards too big to
    run here, or None where they run: they fit in free memory and take seconds. ``--cost time``
    refuses what does not."""
    free, need = available_bytes(pipe.device), size.needs_bytes(rows)
    fits = free is None or need <= free
    side = default_image_size(pipe)
    if fits and pixels[0] * pixels[1] <= side * side:
        return None
    rate = _seconds_per_flop(pipe, side, pipeline_kwargs, options)
    predicted = size.flops * rate
    if fits and predicted <= (TIME_LIMIT_S if options.cost == "time" else RUN_LIMIT_S):
        return None
    room = f"{free / 1e9:.1f} GB free" if free is not None else "free memory unknown"
    what = (
        f"one forward at {pixels[1]}x{pixels[0]} is {size.flops / 1e12:.3g} TFLOP (about {_duration(predicted)} here) and "
        f"needs at least {need / 1e9:.2g} GB for {rows} row(s) ({room})"
    )
    if options.cost == "time":
        raise HybridiffError(f"{what}: too big to time here; --cost flops prices it without running it, or give a smaller size")
    print(f"note: {what}: priced without running it, at {1e-9 / rate:.3g} GFLOP/s measured at {side}x{side}", file=sys.stderr)
    return rate


def _seconds_per_flop(pipe: Any, side: int, pipeline_kwargs: dict[str, Any], options: CompileOptions) -> float:
    """This machine's seconds per FLOP on ``pipe``'s denoiser forward at ``side`` x ``side`` pixels."""
    call = partial(example_call, pipe, side, side, **pipeline_kwargs)
    traced = trace_pipeline(pipe, call=call)
    _, cond = branch_inputs(guided_inputs(traced, side, side, pipeline_kwargs), traced.adapter.latent)
    flops = size_forward(traced_on_meta(pipe, call).graph, to_meta(cond)).flops
    return forward_time(traced.graph, cond, options.repeats, options.execution) / max(flops, 1.0)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.0f} h"


def _background_load(options: CompileOptions, device: torch.device) -> float | None:
    """Before timing on CPU: how busy other work keeps the cores, warning where the calibration's
    workers (``gpus`` of ``threads`` each) would not find enough of them free."""
    if options.cost != "time" or device.type != "cpu":
        return None
    busy = load.busy_cores()
    warning = load.load_warning(busy, options.gpus * torch.get_num_threads(), "this compile's timing")
    if warning:
        print(warning, file=sys.stderr)
    return busy


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
    guidance: CallPattern = "batched",
    **changes: Any,
) -> Plan:
    """Compile any denoiser ``nn.Module`` from one branch's example inputs (the Python API).

    ``latent`` names the forward argument carrying the noisy sample (default: the first one);
    ``guidance`` says how the sampling loop guides it (``"batched"`` ``[uncond; cond]`` rows in
    one call, or ``"two-calls"``, conditional first), which the serial baseline's cost follows;
    ``leaves`` lists submodules (objects, qualified names or classes) to keep opaque;
    ``changes`` are ``CompileOptions`` fields to change, e.g. ``gpus=4, cost="flops"``.
    """
    options = (options or CompileOptions(repeats=5)).but(**changes)
    check_gpus(options.gpus)
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
        model=ModelRef(source=source, denoiser="custom", dtype=dtype, guidance_calls=guidance),
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
        serial = forward_time(traced.graph, both, options.repeats, options.execution)
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
