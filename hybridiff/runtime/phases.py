"""When to enter and leave the pipeline window: the denoising-discrepancy rule.

At each fully-connected step the two branch predictions give the relative discrepancy
``M_i = mean|eps_c - eps_u| / mean|eps_u|`` (paper Eq. 1). Its slope over ``L`` steps,
``G_i = (M_{i-L} - M_i) / L``, is positive while guidance still reshapes the image. The window
starts after the first step ``i > L`` with ``0 <= G_i < g_slope`` (the curve has flattened),
and never later than ``tau_cap``; it lasts ``k`` steps and the rest runs fully connected.
The rule runs online on every rank from the predictions every rank already holds, so all ranks
reach the same decision without exchanging anything.
"""

from __future__ import annotations

from enum import Enum
from typing import Sequence

import torch

from hybridiff.plan import Schedule

EPS = 1e-12


class Phase(str, Enum):
    COND_PARTITION = "cond-partition"
    PIPELINE = "pipeline"


def discrepancy(eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> float:
    """Relative mean absolute discrepancy between the two guidance branches."""
    num = (eps_cond.double() - eps_uncond.double()).abs().mean()
    return float(num / (eps_uncond.double().abs().mean() + EPS))


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


class PhaseController:
    """Tracks one image's discrepancy curve and decides each step's phase."""

    def __init__(self, schedule: Schedule, num_steps: int) -> None:
        self.schedule = schedule
        self.num_steps = num_steps
        self.discrepancy: list[float | None] = []
        self.phases: list[Phase] = []
        self.tau1: int | None = None
        self.tau2: int | None = None

    def phase(self, step: int) -> Phase:
        """The phase of ``step``; call once per step, in order."""
        assert step == len(self.phases), "steps must be visited in order"
        inside = self.tau1 is not None and self.tau1 < step <= self.tau2
        self.phases.append(Phase.PIPELINE if inside else Phase.COND_PARTITION)
        if inside:
            self.discrepancy.append(None)
        return self.phases[-1]

    def observe(self, eps_uncond: torch.Tensor | None, eps_cond: torch.Tensor | None) -> None:
        """Record the current fully-connected step's discrepancy and apply the rule. Without
        guidance there is no discrepancy (None) and the window starts at ``tau_cap``."""
        self.discrepancy.append(None if eps_cond is None else discrepancy(eps_uncond, eps_cond))
        step = len(self.discrepancy) - 1
        s = self.schedule
        if self.tau1 is None and s.k > 0 and tau1_fires(self.discrepancy, s.L, s.g_slope, s.tau_cap):
            k = s.window_steps(step, self.num_steps)
            if k > 0:
                self.tau1, self.tau2 = step, step + k

    def window_follows(self, step: int) -> bool:
        """Whether ``step`` is tau1: the last full step before the window."""
        return self.tau1 == step

    def is_last_window_step(self, step: int) -> bool:
        return self.tau2 == step
