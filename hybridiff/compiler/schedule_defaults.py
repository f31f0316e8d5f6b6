"""Phase-switching defaults: the paper's, then the model card's, then the user's.

Defaults are the paper's SDXL settings for 50 steps (L=12, g_slope=4e-4, tau_cap=15, k=5).
Where predictions put the window is the schedule's own (``Schedule.expected_tau1``).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from hybridiff.errors import HybridiffError
from hybridiff.plan import Schedule

DEFAULT_SCHEDULE = Schedule(steps=50, guidance_scale=5.0, L=12, g_slope=4e-4, tau_cap=15, k=5)


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
