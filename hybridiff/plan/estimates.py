"""What the compiler predicted for a plan, and the one conversion of a link's speed."""

from __future__ import annotations

from pydantic import Field

from hybridiff.plan.schedule import StepCosts
from hybridiff.plan.strict import Strict


def link_bytes_per_s(gbps: float) -> float:
    """A link of ``gbps`` Gbit/s in bytes per second: the compiler, the partitioner and the
    simulator all convert here."""
    return gbps * 1e9 / 8


class Estimates(Strict):
    """Cost-model predictions (see ``hybridiff.simulate``), seconds unless named otherwise."""

    device: str
    threads: int
    link_gbps: float
    forward_s: float = Field(description="one forward of one row (one image, one branch)")
    forward_batch2_s: float = Field(description="one forward of two rows: the serial CFG step")
    #: Forwards measured at the row counts of the plan's batch (``B`` and ``2B`` rows): how
    #: compute grows with rows beyond two, which a straight line from one and two misses.
    forward_rows_s: dict[int, float] = Field(default_factory=dict)
    prediction_bytes: int = Field(ge=0, description="the denoiser output of one row")
    window_step_s: float = Field(description="one window step for one image per replica")
    window_comm_bytes_per_step: int
    comm_bytes_per_image: int = Field(description="expected bytes sent by all ranks for one image")
    expected_tau1: int
    latency_s: float = Field(description="predicted denoising time of the plan's batch")
    serial_latency_s: float = Field(description="the same batch on one device, stock pipeline")
    speedup: float
    #: Predicted latency of every mesh the compiler considered, by label.
    alternatives: dict[str, float] = Field(default_factory=dict)
    step_costs: StepCosts = Field(default_factory=StepCosts)
    #: Cores other processes kept busy when the costs were timed on CPU (``hybridiff.load``):
    #: where it is near the cores the workers need, the timings and the mesh chosen are suspect.
    background_busy_cores: float | None = None

    @property
    def link_bytes_per_s(self) -> float:
        return link_bytes_per_s(self.link_gbps)
