"""Displaced patch parallelism on full steps (UNets, DistriFusion's method): ``sp`` shard peers
each run the whole UNet on a band of ``1/sp`` of the latent's rows.

Three kinds of operation read across bands (``compiler.patches`` lists them):

- a convolution taller than one row reads ``padding`` rows of each neighbour band (halos);
- a group norm reads the statistics of the whole map;
- a self-attention reads every band's keys and values.

On *exact* steps each of them first gathers its peers' values of this step, so the band
computes exactly its rows of the unsplit forward (up to float rounding: group norm is computed
from gathered sums). On the other full steps it uses what the peers sent at the same operation
one full step earlier, with this band's own fresh values, and sends this step's values for the
next: the exchange overlaps the compute (``Transport.gather_shards_async``). The denoiser makes
the first full steps of every call and the first one after the window exact, since there the
peers' previous values are missing or several steps old.

The operations are reached through a ``TorchFunctionMode`` (diffusers' blocks run unchanged),
and each is known by its order in the forward, which is the same on every step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hybridiff.errors import HybridiffError
from hybridiff.graph.execution import GraphRunner
from hybridiff.plan import PatchSplit

#: All-gathers among the shard peers: at once (``Gather``), or handed over later (``Post``,
#: whose result's ``wait()`` gives every peer's tensor).
Gather = Callable[[torch.Tensor], list[torch.Tensor]]
Post = Callable[[torch.Tensor], Any]


#: ``scaled_dot_product_attention``'s parameters in order: diffusers passes them by name, others by place.
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(args: tuple, kwargs: dict | None) -> dict[str, Any]:
    """An attention call's arguments by name, however it was called."""
    return {**dict(zip(_SDPA_PARAMETERS, args)), **(kwargs or {})}


def attend_over_peers(func: Any, call: dict[str, Any], every_peer: Gather, own: int, start: int = 0) -> torch.Tensor:
    """``scaled_dot_product_attention`` (``call``: its arguments by name) whose ``own`` keys and
    values from ``start`` (this peer's share) are replaced by every peer's share, in peer order,
    between the keys every peer holds whole (a transformer's text tokens, before or after; none
    for a UNet band's self-attention). A mask over the keys widens with them."""
    key, value = call["key"], call["value"]
    end = start + own
    parts = every_peer(torch.stack([key[..., start:end, :], value[..., start:end, :]]))
    key = torch.cat([key[..., :start, :], *(p[0] for p in parts), key[..., end:, :]], dim=-2)
    value = torch.cat([value[..., :start, :], *(p[1] for p in parts), value[..., end:, :]], dim=-2)
    call = {**call, "key": key, "value": value}
    if call.get("attn_mask") is not None:
        call["attn_mask"] = _widen_mask(call["attn_mask"], start, own, len(parts))
    return func(**call)


def _widen_mask(mask: torch.Tensor, start: int, own: int, peers: int) -> torch.Tensor:
    """An attention mask over this peer's keys, over every peer's: the shared keys keep their
    marks, the gathered ones take this peer's (one mark for all its image keys)."""
    if mask.shape[-1] == 1:
        return mask
    mine = mask[..., start : start + own]
    if not mine.is_meta and not bool((mine == mine[..., :1]).all()):  # a compile sizing on meta: checked when it runs
        raise HybridiffError("an attention mask that differs between image tokens cannot be split by sp; compile without sp")
    wide = mine[..., :1].expand(*mine.shape[:-1], own * peers)
    return torch.cat([mask[..., :start], wide, mask[..., start + own :]], dim=-1)


class _Exchanges:
    """One band's exchanges of one forward, in order; what it keeps between full steps."""

    def __init__(self, shard: int, gather: Gather, post: Post, exact: bool, kept: dict[int, Any]) -> None:
        self.shard, self.gather, self.post, self.exact, self.kept = shard, gather, post, exact, kept
        self.index = 0

    def every_band(self, fresh: torch.Tensor) -> list[torch.Tensor]:
        """Every band's value of this operation: this step's (exact), or the peers' of the last
        full step with this band's fresh one."""
        index, self.index = self.index, self.index + 1
        if self.exact:
            self.kept[index] = parts = self.gather(fresh.contiguous())
            return parts
        earlier = self.kept[index]
        parts = list(earlier.wait() if hasattr(earlier, "wait") else earlier)
        self.kept[index] = self.post(fresh.contiguous())
        parts[self.shard] = fresh
        return parts


class _Bands(TorchFunctionMode):
    """While one band's forward runs: the operations that read across bands get the others'."""

    def __init__(self, exchanges: _Exchanges, bands: int) -> None:
        super().__init__()
        self.exchanges, self.bands = exchanges, bands

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d and args[1].shape[2] > 1:
            return self._conv(func, args, kwargs)
        if func is F.group_norm:
            return self._group_norm(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            call = sdpa_arguments(args, kwargs)
            if call["key"].shape[-2] == call["query"].shape[-2]:
                return attend_over_peers(func, call, self.exchanges.every_band, own=call["key"].shape[-2])
        return func(*args, **kwargs)

    def _conv(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        x, weight, bias, stride, padding, dilation, groups = _conv_arguments(args, kwargs)
        rows = padding[0]
        edges = self.exchanges.every_band(torch.stack([x[:, :, :rows], x[:, :, -rows:]]))
        me = self.exchanges.shard
        zeros = torch.zeros_like(x[:, :, :rows])
        above = edges[me - 1][1] if me > 0 else zeros
        below = edges[me + 1][0] if me + 1 < self.bands else zeros
        padded = torch.cat([above, x, below], dim=2)
        return func(padded, weight, bias, stride, (0, padding[1]), dilation, groups)

    def _group_norm(
        self, x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        grouped = x.reshape(x.shape[0], num_groups, -1).double()
        sums = torch.stack([grouped.sum(-1), (grouped * grouped).sum(-1)])
        total = torch.stack(self.exchanges.every_band(sums)).sum(0)
        count = grouped.shape[-1] * self.bands
        mean = total[0] / count
        variance = (total[1] / count - mean * mean).clamp_min(0)
        normed = ((grouped - mean[..., None]) / torch.sqrt(variance[..., None] + eps)).to(x.dtype).reshape(x.shape)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if weight is not None:
            normed = normed * weight.reshape(shape)
        if bias is not None:
            normed = normed + bias.reshape(shape)
        return normed


def _conv_arguments(args: tuple, kwargs: dict) -> tuple:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    values = {**defaults, **dict(zip(names, args)), **kwargs}
    padding = values["padding"]
    padding = tuple(padding) if isinstance(padding, (tuple, list)) else (padding, padding)
    return (values["input"], values["weight"], values["bias"], values["stride"], padding, values["dilation"], values["groups"])


class PatchShards:
    """The whole graph on one band of the latent's rows, with the bands' exchanges."""

    def __init__(self, runner: GraphRunner, patches: PatchSplit, sp: int, keep: list[str]) -> None:
        self.runner, self.patches, self.sp = runner, patches, sp
        self.band = patches.height // sp
        # eager in compiled mode too: the bands exchange halos while the forward runs
        self.program = runner.program([n.name for n in runner.gm.graph.nodes if n.op != "placeholder"], keep=keep, eager=True)

    def run(
        self, env: dict[str, Any], shard: int, gather: Gather, post: Post, exact: bool, kept: dict[int, Any]
    ) -> dict[str, Any]:
        """Band ``shard``'s forward; the output is gathered whole (at once, every step).
        ``kept``: this position's exchanges of its last full step (updated for the next)."""
        latent = self.patches.latent
        env = {**env, latent: env[latent][:, :, shard * self.band : (shard + 1) * self.band]}
        exchanges = _Exchanges(shard, gather, post, exact, kept)
        with _Bands(exchanges, self.sp):
            values = self.runner.run(self.program, env)
        values["output"] = torch.cat(gather(values["output"].contiguous()), dim=2)
        return values

    def join(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        return torch.cat(parts, dim=dim)
