"""Where a transformer denoiser keeps its image tokens as one sequence that only attention
mixes, declared per family (``TokenLayout``), and how such a graph falls into the three
programs sequence parallelism runs (``token_segments``).

A declaration names modules of the model, not nodes: the family's adapter attaches it to the
graph it traces (``declare_tokens``), and the compiler reads it from there into the plan's
``TokenSplit`` (node names, token counts), which is all the runtime reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import fx

_META_KEY = "hybridiff.tokens"


@dataclass(frozen=True)
class TokenTable:
    """A module output indexed by image token besides the tokens themselves (a rotary
    embedding table): each shard peer keeps its rows."""

    #: The module's path in the model (``pos_embed``).
    module: str
    #: The dimension that runs over tokens.
    dim: int
    #: In a tuple output, the element indexed by image token (None: every element).
    element: int | None = None


@dataclass(frozen=True)
class TokenLayout:
    """A family's image-token sequence, as data: where it starts and ends, and what else is
    indexed by its tokens."""

    #: The module turning the latent into tokens; the cut is after it, or after the reshapes
    #: that follow it, at the first value shaped ``[rows, image tokens, dim]``.
    embed: str
    #: The last per-token module before the tokens are unpatchified: the tokens join after it.
    out: str = "proj_out"
    #: Values indexed per token that the blocks read (rotary tables).
    tables: tuple[TokenTable, ...] = ()
    #: Where the text tokens are: in one sequence with the image, "after" it (SD3) or "before"
    #: it (Flux, Qwen-Image), so every peer computes them whole; or "apart", read only by
    #: cross-attention (Wan).
    text: Literal["after", "before", "apart"] = "after"


def declare_tokens(graph: fx.GraphModule, layout: TokenLayout | None) -> fx.GraphModule:
    """``graph`` carrying its model's token layout (None: the model declares none)."""
    if layout is not None:
        graph.meta[_META_KEY] = layout
    return graph


def declared_tokens(graph: fx.GraphModule) -> TokenLayout | None:
    """The token layout the graph's adapter declared, if any."""
    return graph.meta.get(_META_KEY)


def token_segments(graph: fx.GraphModule, cuts: list[str], gather_after: str) -> list[list[str]]:
    """The graph's compute nodes as three programs: before the token cut (everything that does
    not read a token-indexed value), the token-parallel middle (up to ``gather_after``), and
    what follows the join. ``cuts`` are the nodes whose values each peer narrows to its tokens.

    ValueError when a node after the join reads a token-parallel value other than the joined
    one: a peer holds only its share of it."""
    compute = [n for n in graph.graph.nodes if n.op != "placeholder"]
    after_cut = _descendants(compute, set(cuts))
    after_join = _descendants(compute, {gather_after})
    middle = {n for n in after_cut if n not in after_join} | {gather_after}
    last = after_join - {gather_after}
    for node in compute:
        if node.name in last:
            leaked = {p.name for p in node.all_input_nodes} & (middle - {gather_after})
            if leaked:
                raise ValueError(f"{node.name} reads the token-parallel {sorted(leaked)} after the tokens join")
    first = [n.name for n in compute if n.name not in middle and n.name not in last]
    return [first, [n.name for n in compute if n.name in middle], [n.name for n in compute if n.name in last]]


def _descendants(compute: list[fx.Node], roots: set[str]) -> set[str]:
    """Names of the nodes reading (directly or not) any of ``roots``, in graph order."""
    found: set[str] = set()
    for node in compute:
        if any(p.name in roots or p.name in found for p in node.all_input_nodes):
            found.add(node.name)
    return found
