"""Serial vs hybrid latency measured side by side in one invocation.

Both modes run the same plan, prompt and seed with the same threads per device, ``repeats``
images each, and the median denoising-loop time counts. The result is a ratio from one run on
one machine, printed next to the plan's analytic bound; it is never asserted in a test.
"""

from __future__ import annotations

import json
from pathlib import Path

from hybridiff.plan import load_plan
from hybridiff.runtime.launch import launch_local
from hybridiff.runtime.session import RunOptions, execute


def run_bench(plan_path: Path, prompt: str, steps: int | None, repeats: int, threads: int, out: Path) -> str:
    plan = load_plan(plan_path)
    reports = {}
    for mode in ("serial", "hybrid"):
        opts = RunOptions(plan=plan_path, prompt=prompt, out=out / mode, mode=mode, steps=steps, threads=threads, repeats=repeats)
        if mode == "hybrid":
            launch_local(opts, plan.mesh.world_size)
        else:
            execute(opts)
        reports[mode] = json.loads((out / mode / "report.json").read_text())
    serial, hybrid = reports["serial"], reports["hybrid"]
    speedup = serial["latency_s"] / hybrid["latency_s"]
    return "\n".join(
        [
            f"plan {plan_path} ({plan.model.source}, {plan.mesh.world_size} workers x {threads} thread(s), "
            f"{hybrid['steps']} steps, k={plan.schedule.k}, tau1={hybrid['tau1']})",
            "| mode | median latency s | runs s |",
            "|---|---|---|",
            *(
                f"| {m} | {r['latency_s']:.3f} | {', '.join(f'{x:.3f}' for x in r['latency_runs_s'])} |"
                for m, r in reports.items()
            ),
            f"speed-up {speedup:.2f}x (plan bound {plan.estimates.speedup_bound:.2f}x), "
            f"{hybrid['comm_bytes'] / 1e6:.2f} MB sent per image",
        ]
    )
