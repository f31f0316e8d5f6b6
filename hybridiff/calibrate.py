"""What a denoising step costs on this machine besides the denoiser's compute.

Per-node costs miss it, and on short forwards it decides whether splitting pays (issue #9:
a plan predicted 1.19x where 2 workers ran at 0.80x of one). So ``compile`` runs the model
briefly, the way ``run`` would, before choosing a mesh: a few short calls on 2 launched
workers under a 2-device plan whose window opens early. Their step traces
(``hybridiff.runtime.spans``) give, as means per step:

- ``pipeline_s``: the stock pipeline's own work between denoiser calls (the same on one
  device: guidance, the scheduler step, callbacks);
- ``full_sync_s``: what a 2-worker full step spends besides compute and the pipeline's work:
  issuing and waiting for the exchange, waiting for the slower worker, hybridiff's glue;
- ``window_sync_s``: the same for a window step.

A forward slowed by a busy neighbour is not priced: on the machine this was built on it was
smaller than the noise of measuring it.

This sits above the compiler and the runtime (like ``bench``): the compiler only receives the
numbers, and the runtime never learns it was measured.
"""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable

from hybridiff.plan import Phase, Plan, StepCosts
from hybridiff.runtime.launch.launcher import launch_local
from hybridiff.runtime.run.requests import ImageRequest
from hybridiff.runtime.run.session import RunOptions

#: The calibration call: enough full steps to average over, a window of a few steps.
STEPS, WINDOW_START, WINDOW_STEPS, REPEATS = 24, 4, 4, 4


def measure_step_costs(plan: Plan, threads: int | None = None) -> StepCosts:
    """Run ``plan`` (2 devices) briefly on 2 launched workers and read the step costs."""
    schedule = plan.schedule.model_copy(
        update={"steps": STEPS, "L": 1, "tau_cap": WINDOW_START, "k": WINDOW_STEPS, "g_slope": 1e-12}
    )
    with tempfile.TemporaryDirectory(prefix="hybridiff-calibrate-") as tmp:
        root = Path(tmp)
        plan.model_copy(update={"schedule": schedule}).save(root / "plan.json")
        opts = RunOptions(
            plan=root / "plan.json",
            requests=(ImageRequest("calibration", None, 0),),
            out=root / "out",
            threads=threads,
            repeats=REPEATS,
            trace=root / "trace",
        )
        launch_local(opts, 2)
        profile = json.loads((root / "out" / "report.json").read_text())["profile_ms"]
    return _step_costs(profile, f"{plan.mesh.label}, {threads or 'default'} thread(s) per worker")


#: Full steps are read from the warm-up, which every calibration call runs (its first steps).
FULL = Phase.WARM_UP.value


def _step_costs(profile: dict[str, Any], setup: str) -> StepCosts:
    """Step costs from the ranks' milliseconds per step, read directly from the categories
    the runtime measured (the pipeline's work, waiting, sending and receiving, glue) rather
    than as a difference from a forward timed at another moment: a shared machine's speed
    drifts by more than these costs. Means leave out the slowest tenth of the steps, so a
    burst of other load during the short calibration is not priced into every step.

    On a full step both workers run the same forward, so the worker that waits longer shows
    what the step costs (the other's slower core included). In the window the stages differ
    by design and the simulator prices that; the worker that waits least shows the cost."""
    ranks = list(profile.values())

    def overhead_ms(phase: str) -> list[float]:
        return [sum(r[phase]["trimmed"][c] for c in ("wait", "send-recv", "glue")) for r in ranks if phase in r]

    return StepCosts(
        measured_on=f"{setup}: {STEPS}-step calls, {REPEATS} repeats",
        pipeline_s=min(r[FULL]["trimmed"]["pipeline"] for r in ranks) / 1e3,
        full_sync_s=max(overhead_ms(FULL)) / 1e3,
        window_sync_s=min(overhead_ms(Phase.WINDOW.value)) / 1e3,
    )


def calibration(enabled: bool, threads: int | None) -> Callable[[Plan], StepCosts] | None:
    """What ``compile`` and ``bench`` hand the compiler: this measurement with ``threads`` per
    worker, or None to assume no per-step costs."""
    return partial(measure_step_costs, threads=threads) if enabled else None
