"""What a denoising step costs on this machine besides the denoiser's compute.

Per-node costs miss it, and on short forwards it decides whether splitting pays (issue #9:
a plan predicted 1.19x where 2 workers ran at 0.80x of one). So ``compile`` runs the model
briefly, the way ``run`` would, before choosing a mesh: a short call of the stock pipeline on
one device, and the same call on 2 launched workers under a 2-device plan whose window opens
early. Their step traces (``hybridiff.runtime.spans``) give, as means per step:

- ``pipeline_s``: the stock pipeline's own work between denoiser calls (serial run);
- ``concurrency``: a worker's forward next to a busy peer, over the forward measured alone;
- ``full_sync_s`` / ``window_sync_s``: the rest of a 2-worker full / window step beyond the
  slowest worker's compute and the pipeline's work: issuing and waiting for the exchange,
  and hybridiff's glue.

This sits above the compiler and the runtime (like ``bench``): the compiler only receives the
numbers, and the runtime never learns it was measured.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hybridiff.plan import Plan, StepCosts
from hybridiff.runtime.launch import launch_local
from hybridiff.runtime.requests import ImageRequest
from hybridiff.runtime.session import RunOptions, execute

#: The calibration call: enough full steps to average over, a window of a few steps.
STEPS, WINDOW_START, WINDOW_STEPS, REPEATS = 24, 4, 4, 4


def measure_step_costs(plan: Plan, threads: int | None = None) -> StepCosts:
    """Run ``plan`` (2 devices) briefly, serially and on 2 workers; read the step costs."""
    schedule = plan.schedule.model_copy(
        update={"steps": STEPS, "L": 1, "tau_cap": WINDOW_START, "k": WINDOW_STEPS, "g_slope": 1e-12}
    )
    short = plan.model_copy(update={"schedule": schedule})
    with tempfile.TemporaryDirectory(prefix="hybridiff-calibrate-") as tmp:
        root = Path(tmp)
        short.save(root / "plan.json")
        profiles = {}
        for mode in ("serial", "hybrid"):
            opts = RunOptions(
                plan=root / "plan.json",
                requests=(ImageRequest("calibration", None, 0),),
                out=root / mode,
                mode=mode,
                threads=threads,
                repeats=REPEATS,
                trace=root / mode / "trace",
            )
            launch_local(opts, 2) if mode == "hybrid" else execute(opts)
            profiles[mode] = json.loads((root / mode / "report.json").read_text())["profile_ms"]
    # One row's forward alone, at the time of the calibration (a machine's speed drifts): the
    # serial run's forward (two rows when guided) scaled by the compile-time ratio.
    est = plan.estimates
    serial_s = profiles["serial"]["0"]["serial"]["median"]["compute"] / 1e3
    alone_s = serial_s * est.forward_s / est.forward_batch2_s if schedule.guided else serial_s
    return _step_costs(profiles, alone_s, f"{plan.mesh.label}, {threads or 'default'} thread(s) per worker")


def _step_costs(profiles: dict[str, Any], alone_s: float, setup: str) -> StepCosts:
    """Step costs from the serial run's and the hybrid ranks' milliseconds per step.

    Compute is taken as the slowest rank's median, as the simulator prices it; everything
    else a step takes on average (waiting for whichever rank was slow, exchanging, glue) is
    the sync, so the simulator's step adds up to the measured mean step. Means leave out the
    slowest tenth of the steps: a short calibration that catches a burst of other load on a
    shared machine would otherwise price that burst into every step."""
    pipeline_ms = profiles["serial"]["0"]["serial"]["trimmed"]["pipeline"]
    ranks = list(profiles["hybrid"].values())

    def sync_ms(phase: str) -> float:
        stats = [r[phase] for r in ranks if phase in r]
        slowest = max(s["median"]["compute"] for s in stats)
        total = max(s["trimmed"]["total"] for s in stats)
        return max(0.0, total - slowest - min(s["trimmed"]["pipeline"] for s in stats))

    concurrent_ms = max(r["cond-partition"]["median"]["compute"] for r in ranks)
    return StepCosts(
        measured_on=f"{setup}: {STEPS}-step calls, {REPEATS} repeats",
        pipeline_s=pipeline_ms / 1e3,
        full_sync_s=sync_ms("cond-partition") / 1e3,
        window_sync_s=sync_ms("pipeline") / 1e3,
        concurrency=max(1.0, concurrent_ms / 1e3 / alone_s),
    )
