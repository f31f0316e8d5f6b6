"""Full steps of ``sp > 1`` meshes: ``sp`` shard peers split each row they compute.
``ShardedForwards`` runs the peers a process hosts; a transformer's rows are split into image
tokens here (``TokenShards``, exact), a UNet's into bands of rows (``runtime.patches``).

The peers of a row chunk (``Mesh.shard_peers``) each run the whole graph on the chunk's rows,
but on ``1/sp`` of every row's image tokens. The token sequence is cut right after the patch
embedding (``TokenSplit.shard_after``), with the tables indexed per token (rotary embeddings),
and put back together after the last per-token layer (``TokenSplit.gather_after``). Every
attention over the image tokens gathers all peers' image keys and values, in token order,
beside the text tokens' (which every peer computes whole; before the image in Flux and
Qwen-Image, after it in SD3). In these models only attention mixes tokens, so each peer
computes exactly its tokens of the unsplit forward; only the order of float sums inside
matrix products may differ.

Attention is reached through a ``TorchFunctionMode`` that intercepts
``scaled_dot_product_attention`` while a peer's forward runs: diffusers' attention processors
run unchanged, and nothing outside the forward (nor another thread) is affected.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hybridiff.errors import HybridiffError
from hybridiff.graph.execution import GraphRunner, NodeProgram
from hybridiff.graph.tokens import token_segments
from hybridiff.plan import Plan, TokenSplit, TokenTableRef
from hybridiff.runtime.comm.transport import Transport
from hybridiff.runtime.execution.patches import PatchShards, attend_over_peers, sdpa_arguments

#: All-gathers a tensor among a row chunk's shard peers: every peer's, in shard order.
Gather = Callable[[torch.Tensor], list[torch.Tensor]]


class _GatheredKeysValues(TorchFunctionMode):
    """Inside a peer's forward: an attention over the image tokens sees every peer's image keys
    and values. One whose queries and keys differ in length attends to the text only
    (cross-attention, Wan): each peer's queries read keys every peer holds, nothing to gather."""

    def __init__(self, split: TokenSplit, shard_tokens: int, gather: Gather) -> None:
        super().__init__()
        self.split, self.shard_tokens, self.gather = split, shard_tokens, gather

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is F.scaled_dot_product_attention:
            call = sdpa_arguments(args, kwargs)
            keys, n = call["key"].shape[-2], self.shard_tokens
            if keys == call["query"].shape[-2]:
                if keys < n:
                    raise HybridiffError(f"an attention sees {keys} keys, fewer than a shard's {n} image tokens")
                return attend_over_peers(func, call, self.gather, own=n, start=self.split.image_start(keys, n))
        return func(*args, **(kwargs or {}))


def own_tokens(value: torch.Tensor, dim: int, split: TokenSplit, shard: int, sp: int) -> torch.Tensor:
    """Shard ``shard``'s part of a value running over the image tokens along ``dim``: its image
    tokens, with every text token the value holds (before or after them, as the model puts them)."""
    n = split.tokens // sp
    text = value.shape[dim] - split.tokens
    mine = value.narrow(dim, split.image_start(value.shape[dim], split.tokens) + shard * n, n)
    if text == 0:
        return mine
    rest = value.narrow(dim, 0 if split.text_first else split.tokens, text)
    return torch.cat([rest, mine] if split.text_first else [mine, rest], dim)


def _own_table(value: Any, table: TokenTableRef, split: TokenSplit, shard: int, sp: int) -> Any:
    """Shard ``shard``'s rows of a token-indexed table (each element of a tuple, or one)."""
    if isinstance(value, (tuple, list)):
        return type(value)(
            own_tokens(v, table.dim, split, shard, sp) if table.element in (None, i) else v for i, v in enumerate(value)
        )
    return own_tokens(value, table.dim, split, shard, sp)


class TokenShards:
    """The whole graph as three programs: up to the token cut, the token-parallel middle, and
    the rest after the tokens are put back together (``graph.tokens.token_segments``). The
    middle stays eager in compiled mode: its attentions gather keys while it runs."""

    def __init__(self, runner: GraphRunner, tokens: TokenSplit, sp: int, keep: list[str]) -> None:
        self.runner, self.tokens, self.sp = runner, tokens, sp
        self.shard_tokens = tokens.tokens // sp
        cuts = [tokens.shard_after, *(t.node for t in tokens.tables)]
        segments = [[runner.nodes[n] for n in names] for names in token_segments(runner.gm, cuts, tokens.gather_after)]
        self.programs: list[NodeProgram] = []
        for i, segment in enumerate(segments):
            later = {p.name for s in segments[i + 1 :] for n in s for p in n.all_input_nodes}
            wanted = (later | set(keep) | set(cuts) | {tokens.gather_after}) & {n.name for n in segment}
            self.programs.append(runner.program([n.name for n in segment], keep=wanted, eager=i == 1))

    def run(
        self, env: dict[str, Any], shard: int, gather: Gather, post: Any = None, exact: bool = True, kept: Any = None
    ) -> dict[str, Any]:
        """Shard ``shard``'s forward on ``env`` (the rows' graph inputs); returns the kept values,
        the output whole, and the values between the cuts for this shard's tokens only. Every
        step is exact here (``post``, ``exact`` and ``kept`` serve ``PatchShards``' stale steps)."""
        split = self.tokens
        first = self.runner.run(self.programs[0], env)
        first[split.shard_after] = own_tokens(first[split.shard_after], 1, split, shard, self.sp)
        for table in split.tables:
            first[table.node] = _own_table(first[table.node], table, split, shard, self.sp)
        with _GatheredKeysValues(split, self.shard_tokens, gather):
            middle = self.runner.run(self.programs[1], {**env, **first})
        middle[split.gather_after] = self.join(gather(middle[split.gather_after].contiguous()), 1)
        last = self.runner.run(self.programs[2], {**env, **first, **middle})
        return {**first, **middle, **last}

    def join(self, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The whole sequence from every peer's shard (in shard order): every peer's image
        tokens, with the text tokens every peer holds before or after them."""
        n = self.shard_tokens
        text = parts[0].shape[dim] - n
        images = [p.narrow(dim, self.tokens.image_start(parts[0].shape[dim], n), n) for p in parts]
        if text == 0:
            return torch.cat(images, dim=dim)
        rest = parts[0].narrow(dim, 0 if self.tokens.text_first else n, text)
        return torch.cat([rest, *images] if self.tokens.text_first else [*images, rest], dim=dim)


class ShardedForwards:
    """A full step's forwards of the positions a process hosts, each on its shard of its rows:
    image tokens of a transformer (``TokenShards``, exact) or a band of a UNet's rows
    (``runtime.patches.PatchShards``, exact or one step stale). Shard peers hosted together
    (the emulation) run in threads of their own, since each waits for the others' values."""

    def __init__(self, runner: GraphRunner, plan: Plan, transport: Transport, ranks: tuple[int, ...]) -> None:
        self.mesh, self.transport, self.ranks = plan.mesh, transport, ranks
        keep = [c.node for c in plan.cut_tensors if c.constant is None]
        #: Where each peer holds only its share of a cut tensor (measured by the compiler).
        self.shard_dims = {c.node: c.shard_dim for c in plan.cut_tensors if c.shard_dim is not None}
        if plan.graph.tokens is not None:
            self.shards: Any = TokenShards(runner, plan.graph.tokens, plan.mesh.sp, keep)
        else:
            self.shards = PatchShards(runner, plan.graph.patches, plan.mesh.sp, keep)
        #: Which full steps exchange this step's values (``TokenSplit``/``PatchSplit.exact``).
        self.exact = plan.graph.shard_split.exact
        #: Per hosted position: its exchanges of the last full step (pending ones included).
        self.kept: dict[int, dict[int, Any]] = {}

    def _peers(self, position: int) -> tuple[int, ...]:
        return tuple(self.ranks[p] for p in self.mesh.shard_peers(position))

    def _gather(self, position: int) -> Gather:
        return partial(self.transport.gather_shards, self.ranks[position], peers=self._peers(position))

    def _post(self, position: int) -> Callable[[torch.Tensor], Any]:
        return partial(self.transport.gather_shards_later, self.ranks[position], peers=self._peers(position))

    def begin_call(self) -> None:
        """A new call: let every exchange still under way finish, and forget them all."""
        for kept in self.kept.values():
            for value in kept.values():
                if hasattr(value, "wait"):
                    value.wait()
        self.kept = {}

    def run(self, envs: dict[int, dict[str, Any]], exact: bool = True) -> dict[int, dict[str, Any]]:
        """Each position's forward on its rows' graph inputs ``envs[position]``; ``exact``: with
        the peers' values of this step (else, for bands, those of the last full step)."""
        jobs = {
            s: partial(
                self.shards.run, env, self.mesh.shard_index(s), self._gather(s), self._post(s), exact, self.kept.setdefault(s, {})
            )
            for s, env in envs.items()
        }
        return self._together(jobs)

    def unshard(self, values: dict[int, dict[str, Any]], cuts: tuple[str, ...]) -> None:
        """Before the window's hand-off: the first peer of a row chunk gets ``cuts`` whole,
        joined along each cut's ``shard_dim`` (every peer takes part in each gather)."""

        def join(position: int) -> dict[str, torch.Tensor]:
            gather = self._gather(position)
            return {c: self.shards.join(gather(values[position][c].contiguous()), self.shard_dims[c]) for c in cuts}

        for position, whole in self._together({s: partial(join, s) for s in values}).items():
            if self.mesh.shard_index(position) == 0:
                values[position].update(whole)

    def _together(self, jobs: dict[int, Callable[[], Any]]) -> dict[int, Any]:
        """Run ``jobs`` at once (in this thread when there is one), in the caller's grad mode."""
        if len(jobs) == 1:
            (position, job), = jobs.items()
            return {position: job()}
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def in_mode(job: Callable[[], Any]) -> Any:
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    return job()
            except BaseException:
                self.transport.release_waiters()  # peers waiting for this one fail too, not hang
                raise

        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = {s: pool.submit(in_mode, job) for s, job in jobs.items()}
            return {s: f.result() for s, f in futures.items()}
