"""The tau1 rule (paper Eq. 1 slope test) on synthetic discrepancy curves."""

import torch

from hybridiff.plan import Mesh, Phase, Schedule
from hybridiff.program.build import ProgramBuilder
from hybridiff.program.layout import Layout
from hybridiff.program.timeline import CallSchedule, detect_tau1
from hybridiff.runtime.execution.phases import discrepancy


def test_falls_then_flattens():
    curve = [1.0 - 0.05 * i for i in range(11)] + [0.5] * 39  # flat from step 10 on
    # G_13 = (M_10 - M_13) / 3 = 0 is the first slope in [0, g_slope)
    assert detect_tau1(curve, L=3, g_slope=1e-3, tau_cap=40) == 13


def test_never_flattens_falls_back_to_tau_cap():
    curve = [1.0 - 0.01 * i for i in range(50)]
    assert detect_tau1(curve, L=12, g_slope=4e-4, tau_cap=15) == 15


def test_noisy_curve_ignores_rising_stretches():
    curve = [1.0, 0.8, 0.6, 0.5, 0.55, 0.62, 0.58, 0.57, 0.575, 0.57]
    # i=5 and i=6 have slopes below g_slope but negative (M rising): they must not fire;
    # i=7: (0.62 - 0.57) / 2 = 0.025 is too steep; i=8: (0.58 - 0.575) / 2 = 0.0025 fires.
    assert detect_tau1(curve, L=2, g_slope=0.01, tau_cap=40) == 8


def test_needs_more_than_L_steps_of_history():
    assert detect_tau1([0.5] * 10, L=3, g_slope=1e-3, tau_cap=40) == 4


def test_discrepancy_is_relative_mean_absolute_difference():
    u = torch.tensor([1.0, -1.0, 2.0, -2.0])
    c = u + torch.tensor([0.3, -0.3, 0.3, 0.3])
    assert abs(discrepancy(u, c) - 0.3 / 1.5) < 1e-6


def _run(schedule: Schedule, curve: list[float]) -> CallSchedule:
    """A 2-stage call fed ``curve`` as its discrepancy; returns the schedule it ran."""
    layout = Layout(mesh=Mesh(world_size=2, dp=1, cfg=1, pp=2), window_guidance="mixed", links=(), output_stage=1, prediction_bytes=4)
    ctl = CallSchedule(ProgramBuilder(layout), schedule, schedule.steps, rows=2)
    for step in range(schedule.steps):
        if ctl.program(step).returns == "predictions":
            u = torch.ones(4)
            ctl.observe(step, discrepancy(u, u * (1 + curve[step])))
    return ctl


def test_controller_runs_three_phases():
    s = Schedule(steps=20, guidance_scale=5, L=3, g_slope=1e-3, tau_cap=8, k=4)
    ctl = _run(s, [1.0 - 0.1 * i for i in range(20)])
    assert (ctl.tau1, ctl.tau2) == (8, 12)
    assert [p.value for p in ctl.phases] == ["warm-up"] * 9 + ["window"] * 4 + ["fully-connecting"] * 7
    assert ctl.curve[9:13] == [None] * 4 and None not in ctl.curve[13:]


def test_window_is_clipped_before_the_last_step_and_k0_disables_it():
    s = Schedule(steps=10, guidance_scale=5, L=3, g_slope=1e-3, tau_cap=8, k=5)
    ctl = _run(s, [1.0 - 0.1 * i for i in range(10)])
    assert (ctl.tau1, ctl.tau2) == (8, 9)
    no_window = _run(s.model_copy(update={"k": 0}), [1.0 - 0.1 * i for i in range(10)])
    assert no_window.tau1 is None and set(no_window.phases) == {Phase.WARM_UP}


def test_a_zero_slope_threshold_is_a_fixed_warm_up():
    """The pipeline strategy's schedule: the rule never fires on a flat curve, the window opens
    right after step tau_cap and, clipped, runs to the last step."""
    schedule = Schedule(steps=10, guidance_scale=5.0, L=1, g_slope=0.0, tau_cap=0, k=9)
    ctl = _run(schedule, [0.5] * 10)
    assert (ctl.tau1, ctl.tau2) == (0, 9)
    assert ctl.phases == [Phase.WARM_UP] + [Phase.WINDOW] * 9
    late = _run(schedule.model_copy(update={"tau_cap": 4, "k": 5}), [0.5] * 10)
    assert late.tau1 == 4 and late.phases.count(Phase.WINDOW) == 5


def test_a_call_too_short_for_the_cap_says_whether_the_rule_can_still_open_the_window():
    ruled = Schedule(steps=20, guidance_scale=5.0, L=3, g_slope=4e-4, tau_cap=15, k=5)
    assert ruled.short_call(17) is None  # the cap (15) is a window start before the last step (16)
    assert "the rule can still open it after step 3" in ruled.short_call(10)
    assert "so no window runs" in ruled.model_copy(update={"g_slope": 0.0}).short_call(10)
    assert "so no window runs" in ruled.short_call(5)  # the rule reads L + 1 steps first
    assert ruled.model_copy(update={"k": 0}).short_call(5) is None  # no window asked for
