"""A loaded diffusers pipeline with its denoiser traced: what both compiler and runtime start from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from torch import fx, nn

from hybridiff.graph.refine import apply_refinements
from hybridiff.graph.trace import adapter_for, denoiser_attr, graph_fingerprint


@dataclass(frozen=True)
class TracedModel:
    """A loaded pipeline with its traced denoiser."""

    pipe: Any
    #: The pipeline attribute holding the denoiser: "unet" or "transformer".
    attr: str
    adapter: Any
    graph: fx.GraphModule
    fingerprint: str

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.attr)


def trace_pipeline(pipe: Any, refined: Iterable[str] = ()) -> TracedModel:
    """Trace ``pipe``'s denoiser and re-open the blocks a plan lists (``refined``), so the
    graph, its node names and its fingerprint are the compiler's."""
    attr = denoiser_attr(pipe)
    adapter = adapter_for(getattr(pipe, attr))
    graph = apply_refinements(adapter.trace(), refined)
    return TracedModel(pipe, attr, adapter, graph, graph_fingerprint(graph))
