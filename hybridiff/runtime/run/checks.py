"""What a run checks before it costs anything: the request and the plan's model.
``check_run`` runs in the launching command before any worker starts, and again in every
worker (torchrun starts workers without that command), so a bad input is one line, never a
traceback or a gloo abort from inside a worker."""

from __future__ import annotations

import math
import sys
from typing import Any

from hybridiff.errors import HybridiffError
from hybridiff.models import resolve_source
from hybridiff.plan import Plan
from hybridiff.runtime.run.options import RunOptions
from hybridiff.runtime.run.samplers import sampler_class

#: torch generators take 64-bit unsigned seeds.
MAX_SEED = 2**64 - 1
#: Denoisers trained with flow matching (their schedulers are flow schedulers).
FLOW_MATCHING = ("sd3-transformer", "flux", "qwen-image", "sana", "wan")
#: Denoisers of videos, which ``run`` (writing images) does not drive.
VIDEO = ("wan",)
#: Schedulers are configured with 1000 training timesteps; more inference steps than that fail.
MAX_STEPS = 1000


def check_run(opts: RunOptions, plan: Plan) -> None:
    """Every problem of ``opts`` that can be found without loading the model, in one line."""
    if plan.model.source.startswith("arch:"):
        raise HybridiffError(
            f"{opts.plan} is a plan for {plan.model.source}, which is compile-only: the runtime executes plans "
            "of pipelines it can load (builtin:NAME or a diffusers pipeline folder)"
        )
    if plan.model.source.startswith("python:"):
        raise HybridiffError(
            f"{opts.plan} is a plan for your module {plan.model.source[7:]}: run it in your own loop with "
            "hybridiff.parallelize(module, plan) (docs/api.md); `run` drives diffusers pipelines"
        )
    if plan.model.denoiser in VIDEO:
        raise HybridiffError(
            f"{opts.plan} is a plan for a video model ({plan.model.denoiser}); `run` writes images: generate videos "
            "with hybridiff.parallelize(pipe, plan) (docs/api.md)"
        )
    resolve_source(plan.model.source)
    if not opts.requests:
        raise HybridiffError("nothing to generate: give --prompt or --prompts FILE")
    for i, request in enumerate(opts.requests):
        if not 0 <= request.seed <= MAX_SEED:
            raise HybridiffError(f"image {i} has seed {request.seed}, outside 0..2**64-1; choose a smaller seed")
    if opts.guidance_scale is not None and not math.isfinite(opts.guidance_scale):
        raise HybridiffError(f"--guidance-scale {opts.guidance_scale}: give a finite number, e.g. 5")
    guidance = opts.guidance_scale if opts.guidance_scale is not None else plan.schedule.guidance_scale
    if opts.mode != "serial":
        plan.mesh.check_guided(guidance > 1)
    if opts.steps is not None and not 1 <= opts.steps <= MAX_STEPS:
        raise HybridiffError(f"--steps {opts.steps}: give 1 to {MAX_STEPS} steps")
    if opts.scheduler is not None:
        sampler_class(opts.scheduler, flow=plan.model.denoiser in FLOW_MATCHING)


def warn_truncated_prompts(pipe: Any, opts: RunOptions) -> None:
    """One line per prompt longer than the text encoder reads (diffusers cuts it silently here)."""
    tokenizer = getattr(pipe, "tokenizer", None)
    limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit > 100_000:
        return
    seen: set[str] = set()
    for i, request in enumerate(opts.requests):
        for text in (request.prompt, request.negative_prompt):
            if text and text not in seen:
                seen.add(text)
                count = len(tokenizer(text, truncation=False).input_ids)
                if count > limit:
                    print(
                        f"warning: the prompt of image {i} is {count} tokens long; the text encoder reads the first "
                        f"{limit} and ignores the rest: {text[:40]!r}...",
                        file=sys.stderr,
                    )
