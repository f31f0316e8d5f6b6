"""The compiler's reading of a traced transformer for sequence parallelism: the token layout
its family declared (``graph.tokens.TokenLayout``), resolved on one row into the plan's
``TokenSplit`` (node names, token counts, the keys and values an exact split exchanges).

A graph whose adapter declared no layout (UNets, custom models, Sana, whose mix-FFN
convolution mixes neighbouring tokens) has no token split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.tokens import TokenLayout, declared_tokens, token_segments
from hybridiff.plan import TokenSplit, TokenTableRef

#: Node kinds a token cut may follow the embedding through (its flatten, transpose, ...).
_RESHAPES = ("call_method", "call_function")


def token_split(graph: fx.GraphModule, branch_inputs: dict[str, Any]) -> TokenSplit | None:
    """The token split of ``graph`` (traced at block level, so its attention modules are
    whole) for one row of ``branch_inputs``, or None."""
    layout = declared_tokens(graph)
    if layout is None:
        return None
    by_module = {n.target: n for n in graph.graph.nodes if n.op == "call_module"}
    wanted = [layout.embed, layout.out, *(t.module for t in layout.tables)]
    if not all(m in by_module for m in wanted):
        return None
    chain = _embedding_chain(by_module[layout.embed])
    runner = GraphRunner(graph)
    names = [n.name for n in graph.graph.nodes if n.op != "placeholder"]
    with torch.inference_mode():
        values = runner.run(runner.program(names, keep=[n.name for n in chain] + [by_module[m].name for m in wanted]), branch_inputs)
    shaped = [n for n in chain if _is_tokens(values[n.name])]
    if not shaped:
        return None
    embedded = values[shaped[-1].name]
    tokens = embedded.shape[1]
    text = branch_inputs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in branch_inputs else 0
    tables = [TokenTableRef(node=by_module[t.module].name, dim=t.dim, element=t.element) for t in layout.tables]
    if not all(_indexes_tokens(values[t.node], t, tokens, text) for t in tables):
        return None
    try:
        token_segments(graph, [shaped[-1].name, *(t.node for t in tables)], by_module[layout.out].name)
    except ValueError:
        return None
    return _split(graph, layout, shaped[-1].name, by_module[layout.out].name, tables, tokens, text, embedded.element_size())


def _split(
    graph: fx.GraphModule, layout: TokenLayout, cut: str, join: str, tables: list[TokenTableRef], tokens: int, text: int, size: int
) -> TokenSplit | None:
    """The plan entry, with the attentions over the image tokens (those attending to the text
    only are computed by each peer on its own tokens)."""
    attentions = [m for m in graph.modules() if _is_attention(m)]
    joint = [m for m in attentions if not getattr(m, "is_cross_attention", False)]
    if not joint:
        return None
    return TokenSplit(
        shard_after=cut,
        gather_after=join,
        tokens=tokens,
        text_tokens=0 if layout.text == "apart" else text,
        attentions=len(joint),
        kv_bytes_per_row=sum(2 * tokens * m.to_k.out_features * size for m in joint),
        tables=tables,
        text_first=layout.text == "before",
        cross_keys=text if len(joint) < len(attentions) else 0,
    )


def _embedding_chain(embed: fx.Node) -> list[fx.Node]:
    """The embedding and the reshapes that follow it alone, up to the first block."""
    chain = [embed]
    while len(chain[-1].users) == 1:
        (user,) = chain[-1].users
        if user.op not in _RESHAPES or user.args[:1] != (chain[-1],):
            break
        chain.append(user)
    return chain


def _is_tokens(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[0] == 1


def _indexes_tokens(value: Any, table: TokenTableRef, tokens: int, text: int) -> bool:
    """Whether the table's value(s) run over the image tokens (after the text, if any) along its dim."""
    if table.element is not None:
        parts = [value[table.element]]
    else:
        parts = value if isinstance(value, (tuple, list)) else [value]
    return all(isinstance(p, torch.Tensor) and p.shape[table.dim] in (tokens, tokens + text) for p in parts)


def _is_attention(module: nn.Module) -> bool:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return isinstance(module, (Attention, AttentionModuleMixin)) and isinstance(getattr(module, "to_k", None), nn.Linear)
