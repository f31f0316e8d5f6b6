"""A loaded diffusers pipeline with its denoiser traced: what both compiler and runtime start from."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterable

from torch import fx, nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.families import ModuleAdapter
from hybridiff.graph.guidance import Guidance, guidance_of
from hybridiff.graph.refine import apply_refinements
from hybridiff.graph.trace import (
    Call,
    adapter_for,
    capture_denoiser_calls,
    denoiser_attr,
    graph_fingerprint,
    registered_adapter,
    trace_module,
)


@dataclass(frozen=True)
class TracedModel:
    """A loaded pipeline with its traced denoiser."""

    pipe: Any
    #: The pipeline attribute holding the denoiser: "unet" or "transformer".
    attr: str
    adapter: Any
    graph: fx.GraphModule
    fingerprint: str
    #: How the pipeline guides its denoiser (scale argument, one call or two per step).
    guidance: Guidance

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.attr)


def default_image_size(pipe: Any) -> int:
    """The pipeline's own default image side in pixels (its denoiser's sample size, or the
    pipeline's ``default_sample_size``, in latent pixels times the VAE's factor)."""
    config = getattr(pipe, denoiser_attr(pipe)).config
    latent = config.get("sample_size") or getattr(pipe, "default_sample_size", None)
    if latent is None:
        raise HybridiffError(f"{type(pipe).__name__} has no default image size; give --height and --width")
    scale = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial  # video pipelines: per frame
    return int(latent) * scale


#: Longer than any pipeline's text: each truncates it to the most text a call can bring.
LONGEST_PROMPT = "an example prompt " * 80


def example_call(pipe: Any, height: int, width: int, **pipeline_kwargs: Any) -> Call:
    """One unguided denoiser call of ``pipe`` at ``height`` x ``width``: what a family's graph is
    traced on (its shapes settle the forward's Python decisions, not its row count). Its prompt
    fills the text to the pipeline's limit, which Qwen-Image's text, trimmed to each prompt's
    tokens, is then padded to on every call (``Family.masks``)."""
    guidance = guidance_of(pipe)
    kwargs = {**pipeline_kwargs, **guidance.example(False)}
    return capture_denoiser_calls(pipe, height, width, prompt=LONGEST_PROMPT, **kwargs)[0]


def trace_pipeline(pipe: Any, refined: Iterable[str] = (), call: Callable[[], Call] | None = None) -> TracedModel:
    """Trace ``pipe``'s denoiser and re-open the blocks a plan lists (``refined``), so the
    graph, its node names and its fingerprint are the compiler's. Families traced by value
    (``graph.families``) are traced on ``call()``, an example denoiser call."""
    attr = denoiser_attr(pipe)
    adapter = adapter_for(getattr(pipe, attr))
    if getattr(adapter, "traced_on_call", False):
        if call is None:
            raise HybridiffError(f"{type(adapter.model).__name__} is traced on an example call; give the image size")
        graph = adapter.trace(call())
    else:
        graph = adapter.trace()
    graph = apply_refinements(graph, refined)
    return TracedModel(pipe, attr, adapter, graph, graph_fingerprint(graph), guidance_of(pipe))


def trace_module_call(
    module: nn.Module, call: Call, latent: str, guidance: Guidance, refined: Iterable[str] = (), leaves: Any = None
) -> TracedModel:
    """A denoiser module of the user's own loop traced on one of its calls, as ``hybridiff.compile``
    traced it (same ``leaves``), with the blocks a plan opened re-opened."""
    adapter = registered_adapter(module)
    if adapter is not None:
        graph = adapter.trace(call) if getattr(adapter, "traced_on_call", False) else adapter.trace()
    else:
        named = inspect.signature(module.forward).bind(*call[0], **call[1]).arguments
        graph = trace_module(module, dict(named), leaves).graph
        adapter = ModuleAdapter(module, graph, latent)
    graph = apply_refinements(graph, refined)
    return TracedModel(SimpleNamespace(denoiser=module), "denoiser", adapter, graph, graph_fingerprint(graph), guidance)
