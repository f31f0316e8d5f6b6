"""The ``run`` command: ``hybridiff run``, and under torchrun ``python -m hybridiff run``.

Under torchrun (RANK set in the environment) the command executes this process's rank; from a
plain shell, hybrid mode launches one local worker per device of the plan, and ``--emulate``
or ``--serial`` run in this process. Multi-node: run the module under torchrun on every node.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from hybridiff.cli.options import (
    ExecutionMode,
    GuidanceScale,
    ImagesPerPrompt,
    PlanFile,
    Prompt,
    Prompts,
    Repeats,
    Steps,
    Threads,
    WindowGuidance,
    execution_mode,
)
from hybridiff.errors import HybridiffError, Interrupted, report_and_exit
from hybridiff.files import check_output_folder

if TYPE_CHECKING:
    from hybridiff.runtime.run.options import RunOptions


def run_command(
    plan: PlanFile,
    prompt: Prompt = None,
    prompts: Prompts = None,
    num_images_per_prompt: ImagesPerPrompt = None,
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt (the uncond branch)"),
    seed: int = typer.Option(0, help="seed of the initial latent"),
    steps: Steps = None,
    guidance_scale: GuidanceScale = None,
    scheduler: Optional[str] = typer.Option(None, help="ddim, euler, euler-a, dpm++ or flow-euler (default: the model's)"),
    out: Path = typer.Option(Path("out"), "-o", "--out", help="folder for image-<i>.png and report.json"),
    emulate: bool = typer.Option(False, "--emulate", help="run the hybrid schedule of all ranks in one process"),
    serial: bool = typer.Option(False, "--serial", help="run the stock pipeline in one process (baseline)"),
    threads: Threads = None,
    repeats: Repeats = 1,
    window_guidance: WindowGuidance = None,
    trace: Optional[Path] = typer.Option(
        None, help="write a per-step trace per rank to this folder (rank-<r>.json: open in Perfetto or chrome://tracing)"
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace a previous run's images and report in --out (refused without it)"
    ),
    device: Optional[str] = typer.Option(
        None, help="cpu, cuda or auto: what the workers compute on (default: $HYBRIDIFF_DEVICE, else auto: CUDA where it exists)"
    ),
    execution: ExecutionMode = None,
) -> None:
    """Generate images with a compiled plan."""
    if emulate and serial:
        report_and_exit(HybridiffError("--emulate and --serial exclude each other; pick one"))
    if window_guidance not in (None, "mixed", "cached"):
        report_and_exit(HybridiffError(f"--window-guidance {window_guidance!r}: use 'mixed' or 'cached'"))
    if (prompt is None) == (prompts is None):
        report_and_exit(HybridiffError("give either --prompt TEXT or --prompts FILE"))
    mode = "emulate" if emulate else "serial" if serial else "hybrid"
    from hybridiff import device as devices  # heavy: torch
    from hybridiff.runtime.run.options import RunOptions
    from hybridiff.runtime.run.requests import ImageRequest, expand, read_prompts

    if device is not None:
        os.environ[devices.DEVICE_ENV] = device  # the launched workers inherit it
    try:
        given = read_prompts(prompts, seed, negative_prompt) if prompts else [ImageRequest(prompt, negative_prompt, seed)]
        execution = execution_mode(execution)
    except HybridiffError as e:
        report_and_exit(e)
    opts = RunOptions(
        plan=plan, requests=tuple(expand(given, num_images_per_prompt or 1)), out=out, mode=mode, steps=steps,
        guidance_scale=guidance_scale, threads=threads, repeats=repeats, window_guidance=window_guidance,
        scheduler=scheduler, trace=trace, execution=execution,
    )
    _run_to_one_line(opts, overwrite)
    if mode != "hybrid" or os.environ.get("RANK", "0") == "0":
        count = len(opts.requests)
        typer.echo(f"wrote {count} image{'s' if count > 1 else ''} (image-0.png ...) and report.json to {out}")
        _say_compilation(out)


def _say_compilation(out: Path) -> None:
    """Compiled runs: what compiling cost, apart from the latency in the report."""
    import json

    compiled = json.loads((out / "report.json").read_text()).get("compilation")
    if compiled:
        typer.echo(
            f"compiled: warm-up call(s) {compiled['warmup_s']:.1f} s (compilation included), "
            f"{compiled['recompilations']} recompilation(s) in timed calls; kernels cached in {compiled['cache_dir']}"
        )


def _run_to_one_line(opts: "RunOptions", overwrite: bool) -> None:
    """Run, and end any failure with one line: 2 for user errors and failed workers, 1 for a
    fault in this process (its traceback in a log), 128 + the signal when interrupted."""
    try:
        _start(opts, overwrite)
    except HybridiffError as e:
        report_and_exit(e)
    except Interrupted as e:
        written = len(list(opts.out.glob("image-*.png")))
        where = f"; {written} image(s) and report.json ('interrupted') in {opts.out}" if (opts.out / "report.json").exists() else ""
        typer.echo(f"error: interrupted by {e}{where}", err=True)
        raise SystemExit(e.exit_code) from None
    except Exception as e:  # noqa: BLE001 - a fault in this process: one line, the traceback in a log
        from hybridiff.runtime.launch.worker import failure_line

        typer.echo(f"error: {failure_line(e, int(os.environ.get('RANK', '0')), opts.out)}", err=True)
        raise SystemExit(1) from None


def _start(opts: "RunOptions", overwrite: bool) -> None:
    """Check everything that can be checked without the model, then run: hybrid mode from a
    shell launches one local worker per device of the plan; otherwise this process runs its part."""
    from hybridiff import device as devices
    from hybridiff.runtime import watchdog
    from hybridiff.runtime.run.report import prepare_run_folder, start_report
    from hybridiff.runtime.run.session import execute, load_run_plan

    plan = load_run_plan(opts)
    watchdog.timeout_s()
    launching = opts.mode == "hybrid" and "RANK" not in os.environ
    if launching:
        devices.check_fits(plan.mesh.world_size)
    if os.environ.get("RANK", "0") == "0":
        prepare_run_folder(opts.out, overwrite)
        start_report(opts.out, {"mode": opts.mode, "model": plan.model.source, "requested_images": len(opts.requests)})
        if opts.trace is not None:
            check_output_folder(opts.trace, "--trace")
    if launching:
        from hybridiff.runtime.launch.launcher import launch_local

        launch_local(opts, plan.mesh.world_size)
    else:
        execute(opts)
