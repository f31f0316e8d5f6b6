"""What one forward needs before anything runs at full size: FLOPs, weights and the activations
alive at once, found on the meta device (shapes only, no memory, no compute), and whether this
machine can time it.

``compile builtin:digits-sdxl --height 8192 --width 8192`` used to run every node at that size
to cost it: 1840 TFLOP per forward, more than 39 minutes at 6.7 GB before it was killed. Here
the same forward is sized in half a second; the compile then prices it without running it
(``--cost flops``), or refuses in one line to time what this machine cannot hold.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from hybridiff.compiler.cost import _bytes, _flop_counter
from hybridiff.graph.guidance import guidance_of
from hybridiff.graph.pipeline import TracedModel
from hybridiff.graph.trace import Call, adapter_for, denoiser_attr, graph_fingerprint


@dataclass(frozen=True)
class ForwardSize:
    """One forward of a traced graph on given inputs."""

    flops: float
    weights_bytes: int
    #: The most bytes of graph values alive at once (inputs included). Values inside an opaque
    #: block are not seen, so this is a lower bound of what the forward needs.
    activation_bytes: int

    def needs_bytes(self, rows: int) -> int:
        """Memory for a forward of ``rows`` rows (sized on one): weights once, activations in
        proportion to rows."""
        return self.weights_bytes + self.activation_bytes * rows


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the meta device: it shares no data and its weights take no
    memory (no grad: the flop counter's module tracker cannot hook a leaf that requires one)."""
    memo: dict[int, Any] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        meta = tensor.to("meta")
        memo[id(tensor)] = nn.Parameter(meta, requires_grad=False) if isinstance(tensor, nn.Parameter) else meta
    return deepcopy(module, memo)


def to_meta(values: Any) -> Any:
    """``values`` (a call's arguments, a graph's inputs) with every tensor on the meta device."""
    return pytree.tree_map(lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v, values)


def traced_on_meta(pipe: Any, call: Callable[[], Call]) -> TracedModel:
    """``pipe``'s denoiser traced as ``trace_pipeline`` traces it, on a meta copy: a family traced
    by value evaluates its example ``call()`` on shapes only, at any size, in a second."""
    attr = denoiser_attr(pipe)
    adapter = adapter_for(meta_copy(getattr(pipe, attr)))
    graph = adapter.trace(to_meta(call())) if getattr(adapter, "traced_on_call", False) else adapter.trace()
    return TracedModel(pipe, attr, adapter, graph, graph_fingerprint(graph), guidance_of(pipe))


def size_forward(gm: fx.GraphModule, inputs: dict[str, Any]) -> ForwardSize:
    """FLOPs, weights and peak live activations of one forward of ``gm`` on ``inputs`` (on the
    meta device: ``traced_on_meta``, ``to_meta``)."""
    values: dict[fx.Node, Any] = {}
    interp = fx.Interpreter(gm, garbage_collect_values=False)
    interp.args_iter = iter([inputs.get(n.name, n.args[0] if n.args else None) for n in gm.graph.nodes if n.op == "placeholder"])
    with torch.inference_mode(), _flop_counter() as counter:
        for node in gm.graph.nodes:
            if node.op != "output":
                values[node] = interp.env[node] = interp.run_node(node)
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    live = peak = 0
    freed_at: dict[int, int] = {}
    for i, node in enumerate(nodes):
        size = _bytes(values.get(node))
        last = max((position[u] for u in node.users), default=i)
        live += size
        freed_at[last] = freed_at.get(last, 0) + size
        peak = max(peak, live)
        live -= freed_at.pop(i, 0)
    weights = sum(t.numel() * t.element_size() for t in [*gm.parameters(), *gm.buffers()])
    return ForwardSize(float(counter.get_total_flops()), weights, peak)


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a forward on ``device`` now (None where the system does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
