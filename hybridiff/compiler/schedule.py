"""Phase-switching defaults and where the window falls when the rule is not known in advance.

Defaults are the paper's SDXL settings for 50 steps (L=12, g_slope=4e-4, tau_cap=15, k=5).
Predictions (``hybridiff.simulate``) assume the window starts at the latest step the rule
allows (tau_cap); where it starts does not change a step's cost, only how many window steps
fit before the last step.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from hybridiff.errors import HybridiffError
from hybridiff.plan import Schedule

DEFAULT_SCHEDULE = Schedule(steps=50, guidance_scale=5.0, L=12, g_slope=4e-4, tau_cap=15, k=5)


def window_steps(schedule: Schedule, tau1: int) -> int:
    """How many window steps follow ``tau1`` before the last step (the runtime clips the same way)."""
    return max(0, min(schedule.k, schedule.steps - 1 - tau1))


def expected_tau1(schedule: Schedule) -> int:
    return min(schedule.tau_cap, schedule.steps - 1)


def model_schedule(model: str | None, given: dict[str, Any], window_guidance: str = "mixed") -> Schedule:
    """The paper's defaults, then the model's own (its card), then what the user ``given``
    (None: not given); a bad value is a one-line error."""
    from hybridiff.models import model_card

    card = model_card(model).get("schedule", {}) if model else {}
    fields = {**DEFAULT_SCHEDULE.model_dump(), **card, **{n: v for n, v in given.items() if v is not None}}
    try:
        return Schedule(**{**fields, "window_guidance": window_guidance})
    except ValidationError as e:
        err = e.errors()[0]
        raise HybridiffError(f"bad schedule option {err['loc'][0]}: {err['msg']}") from None
