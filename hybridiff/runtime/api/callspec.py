"""A pipeline call's arguments as ``ParallelPipeline`` runs them: bound to the pipeline's
signature, completed with the plan's defaults and checked against the plan and the denoiser
the plan was checked on, so a call that cannot run stops before any rank starts it."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from hybridiff.errors import HybridiffError
from hybridiff.graph.pipeline import TracedModel
from hybridiff.plan import Plan
from hybridiff.runtime.api import calls


class CallSpec:
    """How calls of ``pipe`` are read and checked for ``plan``; ``check_rows`` refuses a row
    count the plan's stages cannot run (None for the serial baseline)."""

    def __init__(self, traced: TracedModel, plan: Plan, replicas: int, check_rows: Callable[[int], None] | None) -> None:
        self.pipe, self.plan, self.attr, self.replicas, self.check_rows = traced.pipe, plan, traced.attr, replicas, check_rows
        self.guidance = traced.guidance
        self.signature = inspect.signature(self.pipe.__call__)  # what the pipeline's calls accept
        self.denoiser = traced.denoiser
        self._module_ids = [id(m) for m in self.denoiser.modules()]

    def argument(self, call: dict[str, Any], name: str, otherwise: Any) -> Any:
        """``name``'s value in ``call``, else the pipeline's default."""
        if name in call:
            return call[name]
        parameter = self.signature.parameters.get(name)
        return otherwise if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    def guided(self, call: dict[str, Any]) -> bool:
        return self.guidance.guided(lambda name, otherwise: self.argument(call, name, otherwise))

    def prepare(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments, with the plan's defaults where the call gives none, checked."""
        call = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        call.update(call.pop("kwargs", {}))
        schedule = self.plan.schedule
        planned = {"num_inference_steps": schedule.steps, self.guidance.scale: schedule.guidance_scale}
        for key, value in {**self.plan.model.pipeline_kwargs, **planned}.items():
            if key in self.signature.parameters:  # what the plan was tuned for, where the call says nothing
                call.setdefault(key, value)
        self._check_size(call)
        guided = self.guided(call)
        self.plan.mesh.check_guided(guided)
        images, per_prompt = calls.image_count(call)
        calls.check_arguments(call, images)
        most = calls.replica_images(images, self.replicas)[0]
        if self.replicas > 1:  # refuse what cannot be shared out here, where every rank hears of it
            calls.split(call, most, per_prompt, images)
        if self.check_rows is not None:
            self.check_rows(len(most) * (2 if guided else 1))
        self._check_denoiser()
        return call

    def _check_size(self, call: dict[str, Any]) -> None:
        for name in ("height", "width"):
            planned = getattr(self.plan.model, name)
            if call.get(name) is None:
                call[name] = planned
            elif call[name] != planned:
                raise HybridiffError(
                    f"the plan was compiled for {self.plan.model.height}x{self.plan.model.width} images but this call "
                    f"asks {name}={call[name]}; call with that size or compile a plan for it (--height/--width)"
                )

    def _check_denoiser(self) -> None:
        current = getattr(self.pipe, self.attr)
        if current is not self.denoiser or [id(m) for m in current.modules()] != self._module_ids:
            raise HybridiffError(
                f"pipe.{self.attr} changed since hybridiff.parallelize (a module was replaced, e.g. by unfused LoRA "
                "adapters), so the traced graph would not run it; fuse them (pipe.fuse_lora(); "
                "pipe.unload_lora_weights()) or call hybridiff.parallelize again"
            )
