"""Swap a pipeline's scheduler by name, keeping the model's noise schedule configuration.

Every rank builds the same scheduler from the same config and draws any noise from the run's
seeded generator, so stochastic samplers (Euler ancestral) stay identical on every rank.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from hybridiff.errors import HybridiffError

#: Samplers for noise-prediction models (SD1.x/2.x/XL) and for flow-matching models (SD3).
EPSILON = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}
FLOW = {"flow-euler": FlowMatchEulerDiscreteScheduler}


def sampler_class(name: str, flow: bool) -> type:
    """The sampler ``name`` for a flow-matching (``flow``) or noise-prediction model, or a
    one-line error naming those that fit."""
    allowed = FLOW if flow else EPSILON
    if name not in allowed:
        kind = "flow-matching" if flow else "noise-prediction"
        raise HybridiffError(f"--scheduler {name!r} does not fit this {kind} model; use one of {', '.join(allowed)}")
    return allowed[name]


def use_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` with the sampler ``name`` built from its config."""
    flow = isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    pipe.scheduler = sampler_class(name, flow).from_config(pipe.scheduler.config)
