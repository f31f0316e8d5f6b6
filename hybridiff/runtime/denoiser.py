"""Rank-aware stand-ins for a pipeline's UNet.

``HybridDenoiser`` replaces ``pipe.unet`` inside a stock diffusers pipeline: the pipeline keeps
doing text encoding, CFG batching, guidance, the scheduler step, callbacks and decoding, and
every call to "the UNet" runs one step of the plan's schedule instead:

- cond-partition step: the leader of each branch group runs the whole graph for its branch
  at batch 1 and broadcasts the prediction, so every rank returns the same ``[eps_u; eps_c]``
  batch and the pipeline's guidance and scheduler step stay identical everywhere. The rule for
  entering the window is evaluated here from the two predictions.
- pipeline step: each rank runs only its stage, with its branch's conditioning, on the fresh
  latent and on the cut tensors its producers sent one step earlier; the last stage's output
  is broadcast. With ``window_guidance="mixed"`` (the paper) each stage uses its rank's branch
  and the one mixed prediction is returned as both halves: guidance is off inside the window.
  With ``"cached"`` every stage uses the conditional branch and the guidance direction
  ``eps_c - eps_u`` of tau1's full step is added back, so guidance is kept at no extra compute.

The first window step consumes cut tensors kept from tau1's full forward, so no forward is
repeated to fill the pipeline. ``ObservedUNet`` wraps the real UNet unchanged and only records
the discrepancy curve, for the serial baseline.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from hybridiff.compiler.compile import TracedModel, branch_inputs
from hybridiff.errors import HybridiffError
from hybridiff.execution import GraphRunner
from hybridiff.plan import CutTensor, Plan
from hybridiff.runtime.phases import Phase, PhaseController, discrepancy
from hybridiff.runtime.transport import Transport


class _UNetProxy(nn.Module):
    """Looks like the wrapped UNet to the pipeline (config, dtype, add_embedding, ...)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.loop_start: float | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    @contextmanager
    def installed(self, pipe: Any) -> Iterator[None]:
        """Stand in for ``pipe.unet`` for the duration of one pipeline call."""
        original = pipe.unet
        pipe.unet = self
        try:
            yield
        finally:
            pipe.unet = original

    def _start_clock(self, barrier: Any = None) -> None:
        if self.loop_start is None:
            if barrier is not None:
                barrier()
            self.loop_start = time.perf_counter()


class ObservedUNet(_UNetProxy):
    """The stock UNet, unchanged, recording the per-step discrepancy of its CFG batch."""

    def begin_image(self, num_steps: int) -> None:
        self.loop_start = None
        self.discrepancy: list[float | None] = []

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._start_clock()
        out = self.inner(sample, *args, **kwargs)
        prediction = out[0] if isinstance(out, tuple) else out.sample
        if prediction.shape[0] % 2 == 0:
            uncond, cond = prediction.chunk(2)
            self.discrepancy.append(discrepancy(uncond, cond))
        else:
            self.discrepancy.append(None)
        return out


class HybridDenoiser(_UNetProxy):
    """Executes the plan's hybrid schedule for the ranks this process hosts."""

    def __init__(self, traced: TracedModel, plan: Plan, transport: Transport) -> None:
        super().__init__(traced.pipe.unet)
        self.adapter = traced.adapter
        self.plan = plan
        self.transport = transport
        self.runner = GraphRunner(traced.graph)
        mesh, cuts = plan.mesh, plan.cut_tensors
        compute = [n.name for n in traced.graph.graph.nodes if n.op != "placeholder"]
        self._full = self.runner.program(compute, keep=[c.node for c in cuts])
        self._stage_programs = {
            s.index: self.runner.program(s.recompute + s.nodes, keep=[c.node for c in cuts if c.producer == s.index])
            for s in plan.stages
        }
        #: The lowest rank of each branch group runs that branch's full forwards; the rest of
        #: the group waits outside the window (one image: nothing to share).
        self._leader = {b: min(r.rank for r in mesh.ranks if r.branch == b) for b in ("uncond", "cond")}
        #: (producer stage, consumer stage) -> cut tensors, in plan order (the wire order).
        self._links: dict[tuple[int, int], list[CutTensor]] = {}
        #: Shape arithmetic crossing cuts: static, taken from the plan instead of the wire.
        self._constants = {c.node: c.runtime_value for c in cuts if c.constant is not None}
        for c in cuts:
            if c.constant is None:
                for consumer in c.consumers:
                    self._links.setdefault((c.producer, consumer), []).append(c)
        self._output_stage = next(s for s in plan.stages if "output" in s.nodes)

    def begin_image(self, num_steps: int) -> None:
        self.controller = PhaseController(self.plan.schedule, num_steps)
        self.loop_start = None
        self._step = 0
        #: Per hosted group leader: the values kept from its last full forward, which feed the
        #: window's first step.
        self._last_full: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def discrepancy(self) -> list[float | None]:
        return self.controller.discrepancy

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        inputs = self.adapter.inputs_from_call(sample, timestep, encoder_hidden_states, **kwargs)
        if sample.shape[0] % 2:
            raise HybridiffError(
                "the hybrid schedule needs classifier-free guidance (guidance_scale > 1); "
                "run with --serial for unguided sampling"
            )
        self._start_clock(self.transport.barrier)
        branches = dict(zip(("uncond", "cond"), branch_inputs(inputs)))
        self._like = branches["cond"]["sample"]  # the prediction's shape, device and dtype
        step = self._step
        self._step += 1
        phase = self.controller.phase(step)
        self.transport.phase = phase.value
        if phase is Phase.PIPELINE:
            prediction = self._window_step(step, branches)
            if self.plan.schedule.window_guidance == "cached":
                # u + w (c - u) = prediction + (w - 1) * (eps_c - eps_u) of tau1's full step
                out = torch.cat([prediction - self._guidance, prediction])
            else:
                out = torch.cat([prediction, prediction])
        else:
            out = torch.cat(self._full_step(step, branches))
        return self.adapter.wrap_output(out, return_dict)

    def _full_step(self, step: int, branches: dict[str, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        mesh = self.plan.mesh
        for rank in self.transport.hosted:
            if rank == self._leader[mesh.branch_of(rank)]:
                self._last_full[rank] = self.runner.run(self._full, branches[mesh.branch_of(rank)])
        eps_u, eps_c = (
            self.transport.broadcast(self._leader_output(b), self._leader[b], self._like) for b in ("uncond", "cond")
        )
        self.controller.observe(eps_u, eps_c)
        if self.controller.window_follows(step):
            self._guidance = eps_c - eps_u  # kept for --window-guidance cached
            self.transport.phase = Phase.PIPELINE.value  # the hand-off is the window's traffic
            self._hand_off()
        return eps_u, eps_c

    def _window_branch(self, rank: int) -> str:
        """The conditioning a rank's stage uses in the window: its own branch ("mixed", the
        paper), or the conditional branch everywhere ("cached")."""
        return self.plan.mesh.branch_of(rank) if self.plan.schedule.window_guidance == "mixed" else "cond"

    def _leader_output(self, branch: str) -> torch.Tensor | None:
        values = self._last_full.get(self._leader[branch])
        return None if values is None else values["output"]

    def _hand_off(self) -> None:
        """After tau1's full step: each leader sends, for every stage its branch group owns, the
        cut tensors that stage will have produced, from the full forward it just ran."""
        stages = self.plan.stages
        for rank in self.transport.hosted:
            if rank in self._last_full:
                for (producer, consumer), cuts in self._links.items():
                    if self._leader[self._window_branch(stages[producer].rank)] == rank:
                        values = self._last_full[rank]
                        self.transport.post(rank, stages[consumer].rank, [values[c.node] for c in cuts])
        for rank in self.transport.hosted:
            self._expect_cuts(rank, first=True)

    def _window_step(self, step: int, branches: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        plan = self.plan
        last = self.controller.is_last_window_step(step)
        first = self.controller.tau1 == step - 1
        prediction = None
        for rank in self.transport.hosted:
            stage = plan.stage_of_rank(rank)
            owns_output = stage.index == self._output_stage.index
            if last and not owns_output:
                continue  # nothing it would produce is consumed any more
            env = {**branches[self._window_branch(rank)], **self._constants}
            for src, cuts in self._incoming(rank, first):
                env.update(zip((c.node for c in cuts), self.transport.take(src, rank, self._templates(cuts))))
            if not last:
                self._expect_cuts(rank, first=False)
            values = self.runner.run(self._stage_programs[stage.index], env)
            if not last:
                self._post_cuts(rank, values)
            if owns_output:
                prediction = values["output"]
        return self.transport.broadcast(prediction, self._output_stage.rank, self._like)

    def _incoming(self, rank: int, first: bool) -> list[tuple[int, list[CutTensor]]]:
        """(source rank, cut tensors) for each link into ``rank``'s stage. On the window's first
        step the source is the leader whose full forward stood in for the producing stage."""
        stages = self.plan.stages
        incoming = []
        for (producer, consumer), cuts in self._links.items():
            if stages[consumer].rank == rank:
                owner = stages[producer].rank
                incoming.append((self._leader[self._window_branch(owner)] if first else owner, cuts))
        return incoming

    def _templates(self, cuts: list[CutTensor]) -> list[torch.Tensor]:
        """Receive buffers shaped as the plan records (batch 1 per branch)."""
        return [torch.empty(c.shape, dtype=getattr(torch, c.dtype), device=self._like.device) for c in cuts]

    def _expect_cuts(self, rank: int, first: bool) -> None:
        """Pre-post the receives of the next window step's cut tensors."""
        for src, cuts in self._incoming(rank, first):
            self.transport.expect(src, rank, self._templates(cuts))

    def _post_cuts(self, rank: int, values: dict[str, torch.Tensor]) -> None:
        stage = self.plan.stage_of_rank(rank)
        for (producer, consumer), cuts in self._links.items():
            if producer == stage.index:
                self.transport.post(rank, self.plan.stages[consumer].rank, [values[c.node] for c in cuts])
