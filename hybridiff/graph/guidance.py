"""How a pipeline (or a user's loop) applies classifier-free guidance to its denoiser.

Two call patterns exist. SD, SDXL, SD3, PixArt and Sana batch both branches into one denoiser
call (``[uncond; cond]`` rows, ``"batched"``). Flux, Qwen-Image and Wan ("true CFG") call the
denoiser twice per step, conditional first, then unconditional (``"two-calls"``). Condition
partitioning needs both branches of a step at once, so the runtime pairs the two calls of a
step into one step of ``[uncond; cond]`` rows (``batch_branches``), which is what the plan,
the step programs and the simulator count in either pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from hybridiff.errors import HybridiffError

CallPattern = Literal["batched", "two-calls"]


@dataclass(frozen=True)
class Guidance:
    """A pipeline's guidance: the call argument holding its scale, how it calls the denoiser,
    and the arguments of which one must be given for it to guide at all (true CFG needs a
    negative prompt)."""

    scale: str = "guidance_scale"
    calls: CallPattern = "batched"
    negatives: tuple[str, ...] = ()

    def guided(self, argument: Callable[[str, Any], Any]) -> bool:
        """Whether a call guides; ``argument(name, otherwise)`` reads the call's arguments."""
        if not argument(self.scale, 1.0) > 1:
            return False
        return not self.negatives or any(argument(n, None) is not None for n in self.negatives)

    def example(self, guided: bool) -> dict[str, Any]:
        """Arguments making an example call of the pipeline guide (or not)."""
        if not guided:
            return {self.scale: 1.0}
        return {self.scale: 5.0, **({self.negatives[0]: ""} if self.negatives else {})}


#: Pipelines whose guidance differs from the SD default, by class name (no import needed).
_PIPELINES: dict[str, Guidance] = {
    "FluxPipeline": Guidance("true_cfg_scale", "two-calls", ("negative_prompt", "negative_prompt_embeds")),
    "WanPipeline": Guidance("guidance_scale", "two-calls"),
    "QwenImagePipeline": Guidance("true_cfg_scale", "two-calls", ("negative_prompt", "negative_prompt_embeds")),
}


def guidance_of(pipe: Any) -> Guidance:
    """``pipe``'s guidance, found by its class or a base class."""
    return next((_PIPELINES[c.__name__] for c in type(pipe).__mro__ if c.__name__ in _PIPELINES), Guidance())


def batch_branches(uncond: dict[str, Any], cond: dict[str, Any], latent: str) -> dict[str, Any]:
    """One step's graph inputs as ``[uncond; cond]`` rows from the two calls' inputs.

    An input with a row per image (its first dimension is the latent's rows) is stacked;
    any other (rotary position ids, a shared timestep) must be the same in both calls."""
    rows = cond[latent].shape[0]
    out: dict[str, Any] = {}
    for name, c in cond.items():
        u = uncond.get(name)
        if isinstance(c, torch.Tensor) and c.dim() and c.shape[0] == rows:
            if not isinstance(u, torch.Tensor) or u.shape != c.shape:
                raise HybridiffError(
                    f"the two guidance calls of a step give {name} of shapes {_shape(u)} and {_shape(c)}; "
                    "both branches must have the same shapes (pad prompts to the same length)"
                )
            out[name] = torch.cat([u, c])
        elif isinstance(c, torch.Tensor) and not (isinstance(u, torch.Tensor) and torch.equal(u, c)):
            raise HybridiffError(f"the two guidance calls of a step differ in {name}, which has no row per image")
        else:
            out[name] = c
    return out


def _shape(value: Any) -> str:
    return str(list(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__
