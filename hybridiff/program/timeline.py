"""When a call's steps switch phases, and which step program each step runs.

The window opens after tau1, the first full step ``i > L`` where the denoising discrepancy
``M_i = mean|eps_c - eps_u| / mean|eps_u|`` (paper Eq. 1) has flattened: its slope over ``L``
steps, ``G_i = (M_{i-L} - M_i) / L``, lies in ``[0, g_slope)``; never later than ``tau_cap``.
It lasts ``k`` steps (tau2 = tau1 + k) and the rest runs fully connected. The runtime feeds
the curve it measures; the simulator fixes tau1 at the expected step. Both then ask
``CallSchedule`` for each step's program, so they run and cost the same sequence.
"""

from __future__ import annotations

from typing import Sequence

from hybridiff.plan import Phase, Schedule
from hybridiff.program.actions import StepProgram
from hybridiff.program.build import ProgramBuilder


def tau1_fires(curve: Sequence[float | None], L: int, g_slope: float, tau_cap: int) -> bool:
    """Whether the window starts after the last step of ``curve`` (M for steps 0..i)."""
    i = len(curve) - 1
    if i >= tau_cap:
        return True
    if i <= L or curve[i] is None or curve[i - L] is None:
        return False
    slope = (curve[i - L] - curve[i]) / L
    return 0 <= slope < g_slope


def detect_tau1(curve: Sequence[float], L: int, g_slope: float, tau_cap: int) -> int | None:
    """The step the rule picks on a whole discrepancy curve (None if it never fires)."""
    for i in range(len(curve)):
        if tau1_fires(curve[: i + 1], L, g_slope, tau_cap):
            return i
    return None


class CallSchedule:
    """The steps of one pipeline call of ``rows`` rows and ``steps`` steps: their phases as the
    window is decided, and the program of each."""

    def __init__(self, builder: ProgramBuilder, schedule: Schedule, steps: int, rows: int) -> None:
        self.builder, self.schedule, self.steps, self.rows = builder, schedule, steps, rows
        self.curve: list[float | None] = []
        self.phases: list[Phase] = []
        self.tau1: int | None = None
        self.tau2: int | None = None
        self.full_steps = 0

    def phase(self, step: int) -> Phase:
        if self.tau1 is None or step <= self.tau1:
            return Phase.WARM_UP
        return Phase.WINDOW if step <= self.tau2 else Phase.FULLY_CONNECTING

    def program(self, step: int) -> StepProgram:
        """The program of ``step`` (steps are visited once each, in order)."""
        assert step == len(self.phases), "steps must be visited in order"
        phase = self.phase(step)
        self.phases.append(phase)
        if phase is Phase.WINDOW:
            self.curve.append(None)
            return self.builder.window_step(
                self.rows, first=step == self.tau1 + 1, last=step == self.tau2, next_is_last=step + 1 == self.tau2
            )
        split = self.builder.layout.split
        exact = split is None or split.exact(self.full_steps, step, self.tau2)
        self.full_steps += 1
        return self.builder.full_step(self.rows, phase, exact=exact, check=step == 0)

    def observe(self, step: int, discrepancy: float | None) -> StepProgram | None:
        """After full step ``step``: record its discrepancy (None without guidance) and apply
        the rule; returns the hand-off program when the window opens next."""
        self.curve.append(discrepancy)
        s = self.schedule
        if self.tau1 is None and s.k > 0 and tau1_fires(self.curve, s.L, s.g_slope, s.tau_cap):
            k = s.window_steps(step, self.steps)
            if k > 0:
                self.tau1, self.tau2 = step, step + k
                return self.builder.hand_off(self.rows, next_is_last=k == 1)
        return None
