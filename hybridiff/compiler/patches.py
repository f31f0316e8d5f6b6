"""What patch parallelism needs to know about a UNet graph (``plan.PatchSplit``): the compiler
runs one forward of one row under a recording mode and notes every operation that reads
across rows of the feature map (``runtime.patches`` exchanges exactly these).

- A convolution with a kernel taller than one row reads ``padding`` rows of each neighbour
  band (a halo above and below).
- A group norm reads statistics over the whole map: two numbers per group.
- A self-attention (as many keys as queries) reads every band's keys and values.

Everything else a UNet does (1x1 convolutions, nearest upsampling, cross-attention to text,
per-token layers, embeddings) stays within a band.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx
from torch.overrides import TorchFunctionMode

from hybridiff.graph.execution import GraphRunner
from hybridiff.plan import PatchSplit


class _Recorder(TorchFunctionMode):
    """Counts what crosses band boundaries, in bytes per row of a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.halo_bytes = self.kv_bytes = self.stats_bytes = self.exchanges = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.conv2d:
            x, weight = args[0], args[1]
            if weight.shape[2] > 1:
                self.halo_bytes += 2 * _padding(args, kwargs) * x.shape[1] * x.shape[3] * x.element_size()
                self.exchanges += 1
        elif func is F.group_norm:
            self.stats_bytes += 2 * (args[1] if len(args) > 1 else kwargs["num_groups"]) * 8
            self.exchanges += 1
        elif func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]
            if key.shape[-2] == query.shape[-2]:
                self.kv_bytes += 2 * key[0].numel() * key.element_size()
                self.exchanges += 1
        return out


def _padding(args: tuple, kwargs: dict) -> int:
    padding = args[4] if len(args) > 4 else kwargs.get("padding", 0)
    return padding[0] if isinstance(padding, (tuple, list)) else int(padding)


def patch_split(graph: fx.GraphModule, branch_inputs: dict[str, Any], latent: str) -> PatchSplit | None:
    """The patch split of a UNet ``graph`` for one row of ``branch_inputs`` (any device, the
    meta device included), or None for a graph whose latent is not a 4D feature map."""
    sample = branch_inputs.get(latent)
    if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
        return None
    runner = GraphRunner(graph)
    everything = runner.program([n.name for n in graph.graph.nodes if n.op != "placeholder"])
    recorder = _Recorder()
    with torch.inference_mode(), recorder:
        runner.run(everything, {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in branch_inputs.items()})
    if not recorder.exchanges:
        return None
    return PatchSplit(
        latent=latent,
        height=sample.shape[2],
        factor=_total_factor(graph),
        halo_bytes_per_row=recorder.halo_bytes,
        kv_bytes_per_row=recorder.kv_bytes,
        stats_bytes_per_row=recorder.stats_bytes,
        exchanges=recorder.exchanges,
    )


def _total_factor(graph: fx.GraphModule) -> int:
    """How many times the UNet halves the map: every band must hold a whole number of rows at
    the smallest resolution."""
    halvings = sum(1 for _, m in graph.named_modules() if type(m).__name__ == "Downsample2D")
    return 2**halvings
