"""The denoising discrepancy the window rule reads (paper Eq. 1); the rule itself is
``hybridiff.program.timeline``, which the simulator shares."""

from __future__ import annotations

import torch

EPS = 1e-12


def discrepancy(eps_uncond: torch.Tensor, eps_cond: torch.Tensor) -> float:
    """Relative mean absolute discrepancy between the two guidance branches."""
    num = (eps_cond.double() - eps_uncond.double()).abs().mean()
    return float(num / (eps_uncond.double().abs().mean() + EPS))
