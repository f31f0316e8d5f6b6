"""When a run switches phases, and the names of the phases everywhere (report, traces, simulator)."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import Field

from hybridiff.plan.strict import Strict


class Phase(str, Enum):
    """The phase a denoising step belongs to (the paper's three, and the baseline's one). The
    report's ``phases`` and ``comm_bytes_by_phase``, the traces, ``profile_ms`` and
    ``hybridiff simulate`` all use these names."""

    #: Steps up to tau1 (every step when no window opens): condition partitioning.
    WARM_UP = "warm-up"
    #: Steps tau1+1 .. tau2: the pipeline window. The tau1 hand-off that fills it is its traffic.
    WINDOW = "window"
    #: Steps after tau2: condition partitioning again.
    FULLY_CONNECTING = "fully-connecting"
    #: The stock pipeline on one device (the baseline): no plan, no phases.
    SERIAL = "serial"


#: The phases of a plan's run, in order: what traffic and time are counted under.
RUN_PHASES = (Phase.WARM_UP, Phase.WINDOW, Phase.FULLY_CONNECTING)


class Schedule(Strict):
    """When to switch phases (paper Eq. 1 rule): see ``hybridiff.program.timeline``."""

    steps: int = Field(gt=0)
    guidance_scale: float = Field(ge=0, description="> 1 enables classifier-free guidance")
    L: int = Field(ge=1, description="slope window, steps")
    g_slope: float = Field(ge=0, description="0: the rule never fires and the window starts at tau_cap (a fixed warm-up)")
    tau_cap: int = Field(ge=0, description="latest step at which the window may start")
    k: int = Field(ge=0, description="window length in steps; 0 disables the window")
    #: Inside the window: "mixed" (the paper: each stage uses its rank's branch, guidance off)
    #: or "cached" (all stages conditional, tau1's eps_c - eps_u added back: guidance kept).
    window_guidance: Literal["mixed", "cached"] = "mixed"

    @property
    def guided(self) -> bool:
        """Whether the pipeline runs classifier-free guidance (diffusers: scale > 1)."""
        return self.guidance_scale > 1

    @property
    def expected_tau1(self) -> int:
        """Where predictions put the window's start: the latest step the rule allows. Where it
        starts does not change a step's cost, only how many window steps fit."""
        return min(self.tau_cap, self.steps - 1)

    def rows(self, images: int) -> int:
        """Rows of a denoiser call for ``images`` images: both CFG branches when guided."""
        return images * (2 if self.guided else 1)

    def short_call(self, steps: int) -> str | None:
        """Why a guided call of ``steps`` steps may run no window, or None: its last window
        start (``steps - 2``) comes before ``tau_cap``, so only the rule can open it."""
        if self.k == 0 or self.tau_cap <= steps - 2:
            return None
        rule_can_fire = self.g_slope > 0 and self.L + 1 <= steps - 2
        rule = f"the rule can still open it after step {self.L}" if rule_can_fire else "so no window runs"
        return (
            f"the call's {steps} steps end before the plan's tau_cap {self.tau_cap}: the window is not sure to open "
            f"({rule}); call with at least {self.tau_cap + 2} steps or recompile with --tau-cap {max(0, steps - 2)}"
        )

    def for_stages(self, stages: int) -> Schedule:
        """This schedule on a mesh of ``stages`` stages per replica: one stage has no window
        (nothing runs beside it to overlap), so its ``k`` is 0 and every step is a full one;
        a window there would only be reported, never run."""
        return self if stages > 1 or self.k == 0 else self.model_copy(update={"k": 0})

    def window_steps(self, tau1: int, steps: int | None = None) -> int:
        """How many window steps follow ``tau1`` before the last of ``steps`` (default: the
        plan's): the window never reaches past the run's last step."""
        return max(0, min(self.k, (steps or self.steps) - 1 - tau1))


class StepCosts(Strict):
    """What a denoising step costs besides the denoiser's compute, measured on the machine
    that compiled the plan (``hybridiff.calibrate``); zero where nothing was measured.

    The cost model needs them: on short forwards they are a large part of a step, and a plan
    that leaves them out predicts a speed-up it does not deliver."""

    measured_on: str = Field(default="not measured", description="what ran to measure them")
    pipeline_s: float = Field(default=0.0, ge=0, description="the stock pipeline's own work per step: scheduler, guidance, callbacks")
    full_sync_s: float = Field(
        default=0.0,
        ge=0,
        description="per full step of a 2-device replica, besides compute: exchanging predictions, waiting "
        "for the slower peer, glue",
    )
    window_sync_s: float = Field(default=0.0, ge=0, description="per window step of a 2-device replica, besides compute")
