"""Serial vs hybrid denoising time measured side by side in one invocation.

Both modes generate the plan's batch (seeds 0..B-1 of one prompt) with the same threads per
device, each call ``repeats`` times, and the median per call counts. The result is a ratio
from one run on one machine, printed next to the simulator's prediction; it is never asserted
in a test.
"""

from __future__ import annotations

import json
from pathlib import Path

from hybridiff.plan import load_plan
from hybridiff.runtime.launch import launch_local
from hybridiff.runtime.requests import ImageRequest
from hybridiff.runtime.session import RunOptions, execute


def run_bench(plan_path: Path, prompt: str, steps: int | None, repeats: int, threads: int, out: Path) -> str:
    plan = load_plan(plan_path)
    requests = tuple(ImageRequest(prompt, None, seed) for seed in range(plan.mesh.batch))
    reports = {}
    for mode in ("serial", "hybrid"):
        opts = RunOptions(plan=plan_path, requests=requests, out=out / mode, mode=mode, steps=steps, threads=threads, repeats=repeats)
        if mode == "hybrid":
            launch_local(opts, plan.mesh.world_size)
        else:
            execute(opts)
        reports[mode] = json.loads((out / mode / "report.json").read_text())
    serial, hybrid = reports["serial"]["totals"], reports["hybrid"]["totals"]
    speedup = serial["denoise_s"] / hybrid["denoise_s"]
    first = reports["hybrid"]["images"][0]
    return "\n".join(
        [
            f"plan {plan_path} ({plan.model.source}, mesh {plan.mesh.label}, {plan.mesh.world_size} workers x "
            f"{threads} thread(s), {plan.mesh.batch} image(s), {reports['hybrid']['steps']} steps, "
            f"k={plan.schedule.k}, tau1={first['tau1']})",
            "| mode | denoising s (median per call, summed) | images/s | runs s (first call) |",
            "|---|---|---|---|",
            *(
                f"| {m} | {r['totals']['denoise_s']:.3f} | {r['totals']['images_per_s']:.3f} | "
                f"{', '.join(f'{x:.3f}' for x in r['images'][0]['latency_runs_s'])} |"
                for m, r in reports.items()
            ),
            f"speed-up {speedup:.2f}x (plan predicts {plan.estimates.speedup:.2f}x: {plan.estimates.latency_s:.3f} s "
            f"vs {plan.estimates.serial_latency_s:.3f} s), {hybrid['comm_bytes'] / 1e6 / plan.mesh.batch:.2f} MB sent per image",
        ]
    )
