"""Two denoiser calls per step (true CFG: conditional, then unconditional) made into one step.

Condition partitioning runs both branches of a step at once on different ranks, but a
pipeline like Flux's asks for the conditional prediction before it even passes the
unconditional inputs. ``BranchPairing`` answers the first call with a tensor that is not yet
filled in, runs the step when the second call arrives (on ``[uncond; cond]`` rows, as for a
batched pipeline) and fills the first call's tensor in place before answering the second.
Stock pipelines combine the two predictions only after both calls, so they read it filled.
"""

from __future__ import annotations

from typing import Any

import torch

from hybridiff.errors import HybridiffError
from hybridiff.graph.guidance import batch_branches


class BranchPairing:
    """Pairs one step's conditional and unconditional calls; ``latent`` and ``timestep`` name
    the graph inputs that must be the same in both."""

    def __init__(self, latent: str, timestep: str) -> None:
        self.latent, self.timestep = latent, timestep
        self._cond: dict[str, Any] | None = None
        #: The conditional call's answer until the unconditional call fills it in.
        self.pending_prediction: torch.Tensor | None = None

    def add(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """Take one call's inputs: None after a step's first (conditional) call, the step's
        ``[uncond; cond]`` inputs after its second."""
        if self._cond is None:
            self._cond = inputs
            self.pending_prediction = torch.empty_like(inputs[self.latent])
            return None
        cond, self._cond = self._cond, None
        for name in (self.timestep, self.latent):
            if name in cond and not torch.equal(cond[name], inputs[name]):
                raise HybridiffError(
                    f"two consecutive denoiser calls differ in {name}: the pipeline called its denoiser once in a step, "
                    "but this plan's pipeline guides with two calls per step (conditional, then unconditional)"
                )
        return batch_branches(inputs, cond, self.latent)

    def complete(self, predictions: torch.Tensor) -> torch.Tensor:
        """The unconditional prediction; the conditional one goes into the first call's tensor."""
        uncond, cond = predictions.chunk(2)
        if cond.shape != self.pending_prediction.shape:
            raise HybridiffError(
                f"the denoiser's prediction is {list(cond.shape)}, not shaped as its latent "
                f"{list(self.pending_prediction.shape)}; two-call guidance needs predictions shaped as the latent"
            )
        self.pending_prediction.copy_(cond)
        return uncond

    def check_done(self) -> None:
        """At the end of a pipeline call: no step may be left half made."""
        if self._cond is not None:
            self._cond = None
            raise HybridiffError(
                "the pipeline's last denoiser call had no unconditional partner: this plan's pipeline guides with "
                "two calls per step (conditional, then unconditional)"
            )
