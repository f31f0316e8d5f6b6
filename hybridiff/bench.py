"""Serial vs hybrid denoising time measured side by side, next to the plan's prediction.

Both modes generate the same images (a prompts file, or the plan's batch: seeds 0..B-1 of one
prompt) with the same threads per device, each call ``repeats`` times, each in freshly
launched workers (one for the serial baseline). The hybrid run's images
and report go to the output folder, the serial run's to ``serial/`` inside it. The modes alternate for ``rounds`` rounds, so a slow
spell of a shared machine falls on both; the median of all runs counts. Every run is traced
(``hybridiff.runtime.spans``, about a microsecond per span), which gives the per-step
breakdown printed under the table. The result is a ratio from one run on one machine; it is
never asserted in a test.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from hybridiff.plan import Plan, load_plan, write_atomic
from hybridiff.runtime.launch import launch_local
from hybridiff.runtime.requests import ImageRequest
from hybridiff.runtime.session import RunOptions
from hybridiff.runtime.spans import CATEGORIES
from hybridiff.simulate import Workload, serial_latency, simulate

MODES = ("serial", "hybrid")


def run_bench(
    plan_path: Path, requests: tuple[ImageRequest, ...], steps: int | None, repeats: int, rounds: int, threads: int, out: Path
) -> tuple[str, dict[str, Any]]:
    """Measure and write ``out/bench.json``; returns the tables to print and the result."""
    plan = load_plan(plan_path)
    folders = {"serial": out / "serial", "hybrid": out}
    runs: dict[str, list[float]] = {mode: [] for mode in MODES}
    reports: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for mode in MODES:
            opts = RunOptions(
                plan=plan_path, requests=requests, out=folders[mode], mode=mode, steps=steps, threads=threads,
                repeats=repeats, trace=folders[mode] / "trace",
            )
            # each mode in fresh worker processes, so neither inherits the other's threads
            launch_local(opts, plan.mesh.world_size if mode == "hybrid" else 1)
            reports[mode] = json.loads((folders[mode] / "report.json").read_text())
            runs[mode] += _denoise_runs(reports[mode])
    result = _summarise(plan, runs, reports)
    write_atomic(out / "bench.json", json.dumps(result, indent=2) + "\n")
    return render(plan_path, plan, result, threads), result


def _denoise_runs(report: dict[str, Any]) -> list[float]:
    """Each repeat's denoising time: per replica its calls of that repeat summed, the slowest
    replica counting (as ``totals.denoise_s`` does with medians)."""
    calls = {(image["replica"], image["call"]): image["latency_runs_s"] for image in report["images"]}
    per_replica: dict[int, list[float]] = {}
    for (replica, _), call_runs in calls.items():
        summed = per_replica.setdefault(replica, [0.0] * len(call_runs))
        per_replica[replica] = [a + b for a, b in zip(summed, call_runs)]
    return [max(column) for column in zip(*per_replica.values())]


def _predict(plan: Plan, images: int, steps: int) -> dict[str, float]:
    """The simulator's latency for ``images`` in each mode (serial: the plan's batch per call)."""
    schedule = plan.schedule.model_copy(update={"steps": steps})
    work = Workload.from_plan(plan)
    calls = [min(plan.mesh.batch, images - i) for i in range(0, images, plan.mesh.batch)]
    return {
        "serial": sum(serial_latency(work, schedule, n) for n in calls),
        "hybrid": simulate(plan.mesh, work, schedule, images).latency_s,
    }


def _summarise(plan: Plan, runs: dict[str, list[float]], reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    images = len(reports["hybrid"]["images"])
    predicted = _predict(plan, images, reports["hybrid"]["steps"])
    measured = {mode: statistics.median(times) for mode, times in runs.items()}
    speedup = measured["serial"] / measured["hybrid"]
    predicted_speedup = predicted["serial"] / predicted["hybrid"]
    return {
        "plan": plan.model.source,
        "mesh": plan.mesh.label,
        "images": images,
        "steps": reports["hybrid"]["steps"],
        "tau1": reports["hybrid"]["images"][0]["tau1"],
        "modes": {
            mode: {
                "denoise_s": measured[mode],
                "images_per_s": images / measured[mode],
                "predicted_s": predicted[mode],
                "error": predicted[mode] / measured[mode] - 1,
                "runs_s": runs[mode],
            }
            for mode in MODES
        },
        "speedup": speedup,
        "predicted_speedup": predicted_speedup,
        "speedup_error": predicted_speedup / speedup - 1,
        "comm_bytes_per_image": reports["hybrid"]["totals"]["comm_bytes"] / images,
        "profile_ms": {mode: reports[mode]["profile_ms"] for mode in MODES},
    }


def render(plan_path: Path, plan: Plan, result: dict[str, Any], threads: int) -> str:
    """The measured-vs-predicted table and the per-step breakdown, as markdown."""
    lines = [
        f"plan {plan_path} ({result['plan']}, mesh {result['mesh']}, {plan.mesh.world_size} workers x {threads} thread(s), "
        f"{result['images']} image(s), {result['steps']} steps, k={plan.schedule.k}, tau1={result['tau1']})",
        "| mode | denoising s (median) | images/s | predicted s | prediction error | runs s |",
        "|---|---|---|---|---|---|",
    ]
    for mode, m in result["modes"].items():
        lines.append(
            f"| {mode} | {m['denoise_s']:.3f} | {m['images_per_s']:.3f} | {m['predicted_s']:.3f} | {m['error']:+.1%} | "
            f"{', '.join(f'{x:.3f}' for x in m['runs_s'])} |"
        )
    lines += [
        f"speed-up {result['speedup']:.2f}x measured, {result['predicted_speedup']:.2f}x predicted "
        f"(error {result['speedup_error']:+.1%}), {result['comm_bytes_per_image'] / 1e6:.2f} MB sent per image",
        "",
        "per-step breakdown, ms (each category: median step; totals: median and mean step)",
        f"| run | rank | phase | steps | {' | '.join(CATEGORIES)} | total median | total mean |",
        "|---|---|---|---|" + "---|" * (len(CATEGORIES) + 2),
    ]
    for mode, ranks in result["profile_ms"].items():
        for rank, phases in ranks.items():
            for phase, stats in phases.items():
                cells = " | ".join(f"{stats['median'][c]:.2f}" for c in CATEGORIES)
                lines.append(
                    f"| {mode} | {rank} | {phase} | {stats['steps']} | {cells} | "
                    f"{stats['median']['total']:.2f} | {stats['mean']['total']:.2f} |"
                )
    serial, hybrid = result["modes"]["serial"], result["modes"]["hybrid"]
    lines += [
        "",
        f"serial {serial['denoise_s']:.3f} s | hybrid {hybrid['denoise_s']:.3f} s on {plan.mesh.world_size} workers | "
        f"speed-up {result['speedup']:.2f}x (the plan predicted {result['predicted_speedup']:.2f}x)",
    ]
    return "\n".join(lines)
