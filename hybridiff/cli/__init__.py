"""The ``hybridiff`` command line: compile, run, bench, save-model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperGroup

try:  # typer 0.2x carries its own copy of click; older releases use the click package
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from hybridiff import quiet_libraries
from hybridiff.cli.options import (
    AsJson,
    Batch,
    BenchExecution,
    Calibrate,
    ExecutionMode,
    Gpus,
    GuidanceScale,
    ImagesPerPrompt,
    PlanFile,
    Prompt,
    Prompts,
    Repeats,
    Steps,
    TauCap,
    Threads,
    Warmup,
    WindowGuidance,
    WindowLengths,
    execution_mode,
    window_lengths,
)
from hybridiff.cli.run import run_command
from hybridiff.errors import HybridiffError, report_and_exit, run_cli, stop_promptly
from hybridiff.files import check_output_file
from hybridiff.plan import load_plan

if TYPE_CHECKING:
    from hybridiff.compiler.options import CompileOptions
    from hybridiff.plan import Plan


class OneLineUsageErrors(TyperGroup):
    """A mistyped option (``--gpus 0``, ``--steps x``) ends like every other refusal: one line
    ``error: ...`` and status 2, instead of the multi-line Rich panel typer draws by default."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as e:
            e.show()
            raise SystemExit(e.exit_code) from None
        except click_errors.UsageError as e:
            command = e.ctx.command_path if e.ctx else "hybridiff"
            report_and_exit(HybridiffError(f"{e.format_message()} (see `{command} --help`)"))
        except typer.Abort:
            raise SystemExit(1) from None
        raise SystemExit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineUsageErrors, add_completion=False, no_args_is_help=True, help=__doc__)
app.command("run")(run_command)


@app.command("compile")
def compile_command(
    model: Optional[str] = typer.Argument(None, help="builtin:tiny-sdxl or a local diffusers pipeline folder"),
    arch: Optional[str] = typer.Option(None, help="instead of MODEL: sd15, sd2, sdxl, sd3-medium, sd35-large (no weights)"),
    resolution: int = typer.Option(1024, help="with --arch: image size in pixels"),
    device_tflops: float = typer.Option(150.0, help="with --arch: effective device TFLOP/s (default ~A100 fp16)"),
    device_mem_gbps: float = typer.Option(1500.0, help="with --arch: device memory bandwidth, GB/s"),
    profile: bool = typer.Option(False, "--profile", help="with --arch: random weights on this device, time every node"),
    gpus: Gpus = 2,
    batch: Batch = None,
    mesh: Optional[str] = typer.Option(None, help="force a mesh, e.g. dp=1,cfg=2,pp=2 or dp=1,cfg=2,pp=4,sp=4 (default: fastest)"),
    out: Path = typer.Option(Path("plan.json"), "-o", "--out", help="where to write the plan"),
    steps: Steps = None,
    guidance_scale: GuidanceScale = None,
    L: Optional[int] = typer.Option(None, "--L", min=1, help="discrepancy slope window, steps (default: 12)"),
    g_slope: Optional[float] = typer.Option(None, help="slope threshold that starts the window (default: 4e-4)"),
    tau_cap: TauCap = None,
    k: WindowLengths = "",
    window_guidance: WindowGuidance = None,
    dtype: str = typer.Option("float32", help="MODEL weights: float32, float16 or bfloat16 (half precision needs a GPU)"),
    height: Optional[int] = typer.Option(None, help="image height (default: the model's)"),
    width: Optional[int] = typer.Option(None, help="image width (default: the model's)"),
    link_gbps: float = typer.Option(100.0, help="device link bandwidth, Gbit/s (default ~PCIe 3 x16)"),
    cost: str = typer.Option("time", help="node costs: 'time' (measured) or 'flops' (counted, reproducible)"),
    repeats: int = typer.Option(10, min=1, help="timing repeats per node (median)"),
    threads: Threads = None,
    calibrate: Calibrate = True,
    strategy: Optional[str] = typer.Option(
        None, help="a peer strategy as a plan: serial, cfg-parallel, pipeline (AsyncDiff), hybrid, hybrid-cached"
    ),
    warmup: Warmup = None,
    patch_parallel: bool = typer.Option(False, "--patch-parallel", help="UNets: consider sp row bands (one step stale)"),
    execution: ExecutionMode = None,
) -> None:
    """Trace, profile and partition MODEL (or a published --arch) into an execution plan."""
    from hybridiff.compiler.options import CompileOptions
    from hybridiff.compiler.schedule_defaults import model_schedule

    try:
        given = {"steps": steps, "guidance_scale": guidance_scale, "L": L, "g_slope": g_slope, "tau_cap": tau_cap}
        given["k"] = next(iter(window_lengths(k, one=True)), None)
        _check_compile_options(model, arch, dtype, cost, strategy)
        _check_sizes(height, width, resolution if arch else None)
        check_output_file(out, "-o")
        options = CompileOptions(
            gpus=gpus, schedule=model_schedule(model, given, window_guidance or "mixed"), batch=batch or 1, mesh=mesh, strategy=strategy,
            warmup=warmup, link_gbps=link_gbps, repeats=repeats, threads=threads, cost=cost, patch_parallel=patch_parallel,
            execution=execution_mode(execution) or "eager",
        )
        with stop_promptly():  # Ctrl-C ends a compile within seconds, even inside a long attention call
            if arch is not None:
                plan = _compile_arch(arch, resolution, options, device_tflops, device_mem_gbps, profile)
            else:
                plan = _compile_model(model, options, calibrate, height=height, width=width, dtype=dtype)
        plan.save(out)
    except HybridiffError as e:
        report_and_exit(e)
    _report_plan(plan, out, gpus)


def _check_compile_options(model: str | None, arch: str | None, dtype: str, cost: str, strategy: str | None) -> None:
    """Refuse option values ``compile`` has no use for before anything is loaded."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise HybridiffError(f"--dtype {dtype!r}: use float32, float16 or bfloat16")
    if cost not in ("time", "flops"):
        raise HybridiffError(f"--cost {cost!r} is not a cost method; use 'time' or 'flops'")
    if (model is None) == (arch is None):
        raise HybridiffError("give either MODEL or --arch NAME (not both, not neither)")
    if strategy is not None:
        from hybridiff.compiler.strategies import parse_strategies

        parse_strategies(strategy, "--strategy")


def _check_sizes(*pixels: int | None) -> None:
    """Image sizes the models accept: latents are 1/8 of the image, and SD3 patches pairs of them."""
    for size in pixels:
        if size is not None and (size <= 0 or size % 16 or size > 8192):
            raise HybridiffError(f"image size {size}: give a multiple of 16 from 16 to 8192 pixels, e.g. {max(16, round(size / 16) * 16)}")


def _compile_model(model: str, options: "CompileOptions", calibrate: bool, **size: Any) -> Plan:
    """``compile MODEL``: traced, costed (and calibrated where it is timed) on this machine."""
    from hybridiff.calibrate import calibration
    from hybridiff.compiler.entries import compile_model

    measure = calibration(calibrate and options.cost == "time", options.threads)
    return compile_model(model, options, calibrate=measure, **size)


def _compile_arch(arch: str, resolution: int, options: "CompileOptions", tflops: float, mem_gbps: float, profile: bool) -> Plan:
    """``compile --arch``: a published architecture, roofline-costed unless ``profile``."""
    import torch

    from hybridiff.compiler.cost import DeviceModel
    from hybridiff.compiler.entries import cost_arch
    from hybridiff.compiler.search import plan_for

    device = DeviceModel(f"{tflops:g} TFLOP/s, {mem_gbps:g} GB/s (roofline)", tflops, mem_gbps)
    dtype = "float16" if torch.cuda.is_available() or not profile else "float32"
    return plan_for(cost_arch(arch, resolution, options, dtype=dtype, device_model=device, profile=profile), options)


def _report_plan(plan: "Plan", out: Path, gpus: int) -> None:
    """What ``compile`` says about the plan it wrote: warnings first, then one summary line."""
    est = plan.estimates
    costs = est.step_costs
    if costs.measured_on != "not measured":
        typer.echo(
            f"measured per step ({costs.measured_on}): pipeline {costs.pipeline_s * 1e3:.2f} ms, "
            f"full-step sync {costs.full_sync_s * 1e3:.2f} ms, window sync {costs.window_sync_s * 1e3:.2f} ms",
            err=True,
        )
    if gpus > 1 and plan.mesh.world_size == 1 and plan.strategy is None:
        best = min((t, label) for label, t in est.alternatives.items() if label != plan.mesh.label)
        typer.echo(
            f"warning: wrote a 1-DEVICE plan although --gpus is {gpus}: no multi-device plan pays for "
            f"{plan.mesh.batch} image(s) (the best, {best[1]}, is predicted {best[0]:.3f} s against "
            f"{est.latency_s:.3f} s on one device; on a busy machine the calibration may say so wrongly). "
            f"--mesh {best[1]} forces it; a larger --batch gives devices more to share",
            err=True,
        )
    if plan.mesh.idle_ranks:
        typer.echo(
            f"warning: mesh {plan.mesh.label} leaves rank(s) {plan.mesh.idle_ranks} idle; "
            f"--guidance-scale 1 or --mesh with cfg=1 would use every device",
            err=True,
        )
    typer.echo(
        f"wrote {out}: mesh {plan.mesh.label}, {len(plan.stages)} stage(s), "
        f"{f'window of {plan.schedule.k} steps' if plan.schedule.k else 'no window'}, imbalance {plan.imbalance:.3f}, "
        f"predicted {est.latency_s:.3f} s for {plan.mesh.batch} image(s) vs {est.serial_latency_s:.3f} s serial "
        f"({est.speedup:.2f}x){', costed compiled' if plan.execution == 'compiled' else ''}"
    )


def _plan_and_plot(plan: Path, plot: Path | None) -> "Plan":
    """The plan a reading command works on, and its --plot path checked before any work."""
    try:
        loaded = load_plan(plan)
        if plot is not None:
            check_output_file(plot, "--plot")
    except HybridiffError as e:
        report_and_exit(e)
    return loaded


@app.command("inspect")
def inspect_command(
    plan: PlanFile,
    as_json: AsJson = False,
    plot: Optional[Path] = typer.Option(None, help="also draw the partition to this PNG"),
) -> None:
    """Summarise a plan: mesh, stages, cut tensors, schedule, estimates."""
    import json

    from hybridiff.summary import plot as draw
    from hybridiff.summary import render_text, summary

    loaded = _plan_and_plot(plan, plot)
    typer.echo(json.dumps(summary(loaded), indent=2) if as_json else render_text(loaded))
    if plot is not None:
        draw(loaded, plot)


@app.command("simulate")
def simulate_command(
    plan: PlanFile,
    batch: Batch = None,
    plot: Optional[Path] = typer.Option(None, help="draw the per-rank timeline to this PNG"),
    as_json: AsJson = False,
    program: bool = typer.Option(False, "--program", help="print the step programs of the plan's first call instead"),
) -> None:
    """Predict latency per phase, bytes moved and per-rank busy time from the plan's costs."""
    import json

    from hybridiff.simulate import Workload, plot_timeline, simulate

    loaded = _plan_and_plot(plan, plot)
    images = batch or loaded.mesh.batch
    if program:
        typer.echo(_programs_text(loaded, images))
        return
    sim = simulate(loaded.mesh, Workload.from_plan(loaded), loaded.schedule, images)
    if as_json:
        typer.echo(json.dumps(sim.as_dict(), indent=2))
    else:
        d = sim.as_dict()
        typer.echo(f"{loaded.model.source}, mesh {sim.mesh} on {loaded.mesh.world_size} device(s), {images} image(s)")
        typer.echo(f"latency    {sim.latency_s:.4f} s ({d['images_per_s']:.3f} images/s)")
        typer.echo("phases     " + ", ".join(f"{p} {t:.4f} s" for p, t in sim.phase_s.items()))
        by_phase = ", ".join(f"{p} {n / 1e6:.3f} MB" for p, n in sim.comm_bytes_by_phase.items())
        typer.echo(f"traffic    {sim.comm_bytes / 1e6:.3f} MB: {by_phase}")
        typer.echo("busy       " + ", ".join(f"rank {r} {t:.4f} s" for r, t in sorted(sim.busy_s.items())))
    if plot is not None:
        plot_timeline(sim, plot, loaded.model.source)


def _programs_text(plan: "Plan", images: int) -> str:
    """The step programs replica 0's first call of ``images`` runs, as ``simulate`` costs them."""
    from hybridiff.program.build import ProgramBuilder
    from hybridiff.program.layout import Layout
    from hybridiff.program.render import call_programs, render

    first_call = plan.mesh.replica_images(images)[0][0]
    rows = plan.schedule.rows(len(first_call))
    ranks = plan.mesh.replica_ranks(0)
    head = f"{plan.model.source}, mesh {plan.mesh.label}: replica 0 (ranks {ranks[0]}-{ranks[-1]}), {rows} row(s) per step"
    programs = call_programs(ProgramBuilder(Layout.of(plan)), plan.schedule, rows)
    return "\n\n".join([head] + [render(program, when) for when, program in programs])


from hybridiff.cli.eval import eval_app  # noqa: E402 - the eval commands live in their own module

app.add_typer(eval_app, name="eval")


@app.command("save-model")
def save_model_command(
    model: str = typer.Argument(..., help="builtin:NAME"),
    folder: Path = typer.Argument(..., help="folder to write (diffusers save_pretrained layout)"),
) -> None:
    """Write a model as a local diffusers pipeline folder, loadable by compile and run."""
    import json

    from hybridiff.models import CARD, load_pipeline, model_card

    try:
        load_pipeline(model).save_pretrained(folder)
        card = model_card(model)
        if card:  # schedule defaults and call arguments travel with the weights
            (folder / CARD).write_text(json.dumps(card, indent=2) + "\n")
    except HybridiffError as e:
        report_and_exit(e)
    typer.echo(f"wrote {folder}")


@app.command("bench")
def bench_command(
    target: str = typer.Argument(..., help="plan.json (it against serial), or MODEL (every --strategies entry against serial)"),
    gpus: Gpus = 2,
    strategies: str = typer.Option(
        "serial,cfg-parallel,pipeline,hybrid,hybrid-cached", help="with MODEL: the strategies to compare (serial always runs)"
    ),
    peers: str = typer.Option(
        "", help="peers run by their own projects' code on the same workers: diffusers-ulysses (diffusers' context parallelism)"
    ),
    k: WindowLengths = "",
    warmup: Warmup = None,
    tau_cap: TauCap = None,
    batch: Batch = None,
    calibrate: Calibrate = True,
    prompt: Prompt = "a red cube on a table",
    prompts: Prompts = None,
    num_images_per_prompt: ImagesPerPrompt = None,
    steps: Steps = None,
    repeats: Repeats = 1,
    rounds: int = typer.Option(2, min=1, help="rounds alternating the entries, so machine noise hits all of them"),
    threads: Threads = None,
    plot: bool = typer.Option(False, "--plot", help="also draw OUT/speed-quality.png and the image grid OUT/images.png"),
    grid: Optional[Path] = typer.Option(None, help="draw the image grid (a row per image, a column per entry) to this PNG"),
    as_json: AsJson = False,
    out: Path = typer.Option(Path("out-bench"), "-o", "--out", help="bench.json, plots, and a folder of images per entry"),
    execution: BenchExecution = None,
) -> None:
    """Strategies side by side: latency, speed-up, bytes and fidelity vs serial, against each plan's
    prediction. MODEL: every strategy planned for --gpus devices and --batch images per call."""
    import json

    from hybridiff import bench
    from hybridiff import device as devices
    from hybridiff.bench_report import render
    from hybridiff.compiler.schedule_defaults import model_schedule
    from hybridiff.compiler.strategies import parse_strategies

    try:
        is_plan = Path(target).is_file()
        source = load_plan(target).model.source if is_plan else target
        digits = bench.is_digit_model(source)
        per_call = load_plan(target).mesh.batch if is_plan else batch or 1
        threads = threads or devices.default_threads(load_plan(target).mesh.world_size if is_plan else gpus)
        requests = bench.requests_for(source, prompt, prompts, num_images_per_prompt, per_call)
        peer_names = bench.parse_peers(peers)
        executions = bench.executions_of(execution)
        if is_plan:
            entries = bench.plan_entries(Path(target), out, executions)
        else:
            names, schedule = parse_strategies(strategies), model_schedule(target, {"steps": steps, "tau_cap": tau_cap})
            entries = bench.model_entries(
                target, gpus, schedule, names, window_lengths(k), per_call, warmup, threads, calibrate, out, executions
            )
        entries = bench.peer_entries(peer_names, entries, load_plan(target).mesh.world_size if is_plan else gpus, out)
        result = bench.run_bench(entries, bench.BenchOptions(requests, steps if is_plan else None, repeats, rounds, threads, digits), out)
        workers = max(e.workers for e in entries)
        _draw_bench(result, out, plot, grid, f"{source}, {workers} workers")
    except HybridiffError as e:
        report_and_exit(e)
    typer.echo(json.dumps(result, indent=2) if as_json else render(result, workers))


def _draw_bench(result: dict, out: Path, plot: bool, grid: Optional[Path], title: str) -> None:
    """``bench --plot`` (speed against quality, and the image grid) and ``--grid PATH``."""
    from hybridiff.bench_report import image_grid, plot_speed_quality

    if plot:
        plot_speed_quality(result, out / "speed-quality.png", title)
    if plot or grid:
        image_grid(result, grid or out / "images.png")


def main() -> None:
    quiet_libraries()
    run_cli(app)
