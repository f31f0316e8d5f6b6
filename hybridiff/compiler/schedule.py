"""Phase-switching defaults and the plan's analytic latency model.

Defaults are the paper's SDXL settings for 50 steps (L=12, g_slope=4e-4, tau_cap=15, k=5).
The bound assumes the window starts at the latest step the rule allows (tau_cap); where it
starts does not change the cost, only how many window steps fit before the last step does.
"""

from __future__ import annotations

from hybridiff.plan import Schedule

DEFAULT_SCHEDULE = Schedule(steps=50, guidance_scale=5.0, L=12, g_slope=4e-4, tau_cap=15, k=5)


def window_steps(schedule: Schedule, tau1: int) -> int:
    """How many window steps follow ``tau1`` before the last step (the runtime clips the same way)."""
    return max(0, min(schedule.k, schedule.steps - 1 - tau1))


def expected_tau1(schedule: Schedule) -> int:
    return min(schedule.tau_cap, schedule.steps - 1)


def hybrid_latency(schedule: Schedule, branch_step_s: float, window_step_s: float) -> float:
    k = window_steps(schedule, expected_tau1(schedule))
    return (schedule.steps - k) * branch_step_s + k * window_step_s


def comm_bytes_per_image(
    schedule: Schedule, world_size: int, prediction_bytes: int, cut_bytes: int, output_bytes: int
) -> int:
    """Bytes all ranks send for one image: on full steps each branch leader broadcasts its
    prediction to every other rank; then one cut hand-off per window step (the first from
    tau1's full forward) and the window's output broadcasts."""
    k = window_steps(schedule, expected_tau1(schedule))
    full = (schedule.steps - k) * 2 * (world_size - 1) * prediction_bytes
    return full + k * cut_bytes + k * output_bytes * (world_size - 1)
