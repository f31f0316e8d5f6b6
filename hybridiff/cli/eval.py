"""``hybridiff eval``: score the images a run generated (accuracy, fid, fidelity).

Kept apart from ``hybridiff.cli`` and light to import: each command loads its metrics
(torchmetrics, the digit classifier) only when it runs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import typer

from hybridiff.errors import HybridiffError, report_and_exit
from hybridiff.files import strict_json

eval_app = typer.Typer(help="Score the images a run generated.", no_args_is_help=True)
RUN_FOLDER = "the -o folder of a `hybridiff run` (report.json and images)"


def _digit_score(score: Callable[[Path], dict[str, Any]], folder: Path, digits: bool, what: str, as_json: bool) -> dict[str, Any]:
    """Run a digit-model score on ``folder``; with ``--json`` print it. Only digit scores exist."""
    if not digits:
        report_and_exit(HybridiffError(f"only --digits {what} exists: pass --digits (images of the digit models)"))
    try:
        result = score(folder)
    except HybridiffError as e:
        report_and_exit(e)
    if as_json:
        typer.echo(strict_json(result), nl=False)
    return result


@eval_app.command("accuracy")
def accuracy_command(
    folder: Path = typer.Argument(..., help=RUN_FOLDER),
    digits: bool = typer.Option(False, "--digits", help="score digit prompts with the shipped digit classifier"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Fraction of generated images recognised as what their prompt asked for."""
    from hybridiff.zoo.evaluate import digit_accuracy

    result = _digit_score(digit_accuracy, folder, digits, "accuracy", as_json)
    if not as_json:
        typer.echo(f"accuracy {result['accuracy']:.3f} over {result['images']} image(s)")
        typer.echo("per digit  " + ", ".join(f"{k} {v:.2f}" for k, v in result["per_digit"].items()))


@eval_app.command("fid")
def fid_command(
    folder: Path = typer.Argument(..., help=RUN_FOLDER),
    digits: bool = typer.Option(False, "--digits", help="compare with the held-out real digits on the digit classifier's features"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Domain FID of the run's images against real digits (not Inception FID: not comparable with published FIDs)."""
    from hybridiff.zoo.evaluate import digit_fid

    result = _digit_score(digit_fid, folder, digits, "FID", as_json)
    if not as_json:
        typer.echo(
            f"FID {result['fid']:.2f}: {result['images']} image(s) against {result['real_images']} held-out real digits "
            f"({result['images']} real training digits score {result['real_fid']:.2f}); features: {result['features']}"
        )


@eval_app.command("fidelity")
def fidelity_command(
    run: Path = typer.Argument(..., help=RUN_FOLDER),
    reference: Path = typer.Argument(..., help="the run to compare with, e.g. the --serial run of the same prompts and seeds"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON (an identical image's PSNR is null)"),
) -> None:
    """PSNR and SSIM (LPIPS where installed) of each image of RUN against the same index in REFERENCE."""
    from hybridiff.fidelity import as_json as to_json
    from hybridiff.fidelity import compare_runs

    try:
        result = compare_runs(run, reference)
    except HybridiffError as e:
        report_and_exit(e)
    typer.echo(to_json(result) if as_json else _fidelity_text(result))


def _fidelity_text(result: dict[str, Any]) -> str:
    """One line per image, then the means; an identical image shows 'identical' for its PSNR."""
    lpips = "lpips" in result["per_image"][0]
    lines = ["image  PSNR dB    SSIM" + ("      LPIPS" if lpips else "")]
    for s in result["per_image"]:
        psnr = "identical" if s["identical"] else f"{s['psnr']:.2f}"
        lines.append(f"{s['index']:<6} {psnr:<10} {s['ssim']:.6f}" + (f"  {s['lpips']:.6f}" if lpips else ""))
    n, identical = result["images"], result["identical"]
    if math.isinf(result["psnr_mean"]):
        psnr_mean = f"PSNR inf: all {n} image(s) identical"
    else:
        psnr_mean = f"PSNR mean {result['psnr_mean']:.2f} dB over {n - identical} differing image(s) ({identical} of {n} identical)"
    lpips_mean = result["lpips_mean"] if isinstance(result["lpips_mean"], str) else f"mean {result['lpips_mean']:.6f}"
    lines.append(f"{psnr_mean}; SSIM mean {result['ssim_mean']:.6f}; LPIPS {lpips_mean}")
    return "\n".join(lines)
