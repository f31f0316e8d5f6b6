"""Where a traced transformer denoiser keeps its image tokens as one sequence: the compiler's
reading of a graph for sequence parallelism (``plan.TokenSplit``).

The SD3 adapter's restated forward (``adapters._SD3Forward``) calls ``model.pos_embed`` (patch
embedding: image -> tokens) and, after the blocks, ``model.proj_out`` (the last per-token
layer before the tokens are unpatchified). Between them, only the blocks' attentions mix
tokens. A graph without those nodes (UNets, custom models) has no token split.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from hybridiff.plan import TokenSplit

SHARD_AFTER, GATHER_AFTER = "model.pos_embed", "model.proj_out"


def token_split(graph: fx.GraphModule, branch_inputs: dict[str, Any]) -> TokenSplit | None:
    """The token split of ``graph`` (traced at block level, so its attention modules are
    whole) for one row of ``branch_inputs``, or None."""
    from diffusers.models.attention_processor import Attention

    found = {n.target: n.name for n in graph.graph.nodes if n.op == "call_module" and n.target in (SHARD_AFTER, GATHER_AFTER)}
    if len(found) != 2:
        return None
    embed = graph.get_submodule(SHARD_AFTER)
    latent = branch_inputs["hidden_states"]
    tokens = (latent.shape[-2] // embed.patch_size) * (latent.shape[-1] // embed.patch_size)
    attentions = [
        m for name, m in graph.named_modules() if isinstance(m, Attention) and name.rsplit(".", 1)[-1] in ("attn", "attn2")
    ]
    if not attentions:
        return None
    size = latent.element_size()
    return TokenSplit(
        shard_after=found[SHARD_AFTER],
        gather_after=found[GATHER_AFTER],
        tokens=tokens,
        text_tokens=branch_inputs["encoder_hidden_states"].shape[1] if "encoder_hidden_states" in branch_inputs else 0,
        attentions=len(attentions),
        kv_bytes_per_row=sum(2 * tokens * a.inner_dim * size for a in attentions),
    )
