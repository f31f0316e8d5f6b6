"""Rank-aware stand-ins for a pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``).

``HybridDenoiser`` replaces the denoiser inside a stock diffusers pipeline: the pipeline keeps
doing text encoding, CFG batching, guidance, the scheduler step, callbacks and decoding, and
every call to "the denoiser" runs one step of the plan's schedule for one replica of the mesh.
A call carries ``rows`` rows (the CFG batch ``[uncond; cond]`` of the replica's images, or just
the images without guidance); ``Mesh`` says which rows each position computes:

- fully connected step: each position runs the whole graph on its own chunk of its group's
  rows and broadcasts its predictions to the replica, so every rank returns the same batch
  and the pipeline's guidance and scheduler step stay identical everywhere. The rule for
  entering the window is evaluated here from the two branches' predictions.
- window step: each position runs only its stage, on its window rows, on the fresh latent and
  on the cut tensors its producers sent one step earlier; the last stage's output is
  broadcast. With ``cfg = 2`` and ``window_guidance="mixed"`` (the paper) each stage uses its
  position's branch and the one mixed prediction is returned as both halves: guidance is off
  inside the window. With ``"cached"`` every stage runs the conditional rows and the guidance
  direction ``eps_c - eps_u`` of tau1's full step is added back. With ``cfg = 1`` every stage
  runs the whole batch, so guidance stays exact (a pure stale-activation pipeline).

The window's first step consumes cut tensors kept from tau1's full forwards (each position
hands over the rows it computed), so no forward is repeated to fill the pipeline.
``ObservedDenoiser`` wraps the real denoiser unchanged and only records the discrepancy curve,
for the serial baseline.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.pipeline import TracedModel
from hybridiff.plan import CutTensor, Plan
from hybridiff.runtime.phases import Phase, PhaseController, discrepancy
from hybridiff.runtime.routing import Routing
from hybridiff.runtime.sequence import ShardedForwards
from hybridiff.runtime.spans import Spans
from hybridiff.runtime.transport import Transport


class _DenoiserProxy(nn.Module):
    """Looks like the wrapped denoiser to the pipeline (config, dtype, add_embedding, ...)."""

    def __init__(self, denoiser: nn.Module, attr: str, spans: Spans) -> None:
        super().__init__()
        self.inner = denoiser
        self.attr = attr
        self.spans = spans
        self.loop_start: float | None = None
        #: Denoiser calls the current pipeline call makes (known from its first).
        self.num_steps = 0

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    @contextmanager
    def installed(self, pipe: Any) -> Iterator[None]:
        """Stand in for the pipeline's denoiser for the duration of one pipeline call."""
        original = getattr(pipe, self.attr)
        setattr(pipe, self.attr, self)
        self._pipe = pipe
        try:
            yield
        finally:
            setattr(pipe, self.attr, original)
            self._pipe = None

    def _count_steps(self) -> None:
        """On a call's first denoiser call: how many the pipeline will make. Stock pipelines set
        ``_num_timesteps`` before their loop (after ``denoising_end`` and second-order schedulers'
        repeated timesteps), and call the denoiser once per timestep."""
        steps = getattr(self._pipe, "_num_timesteps", None)
        self.num_steps = steps if isinstance(steps, int) and steps > 0 else len(self._pipe.scheduler.timesteps)

    def _start_clock(self, barrier: Any = None) -> None:
        if self.loop_start is None:
            if barrier is not None:
                barrier()
            self.loop_start = time.perf_counter()
            self.spans.begin_loop(self.loop_start)


def _prediction(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


class ObservedDenoiser(_DenoiserProxy):
    """The stock denoiser, unchanged, recording the per-step discrepancy of its CFG batch.

    The predictions are kept and the curve is worked out after the call, so the baseline's
    timed loop does nothing the stock pipeline would not do."""

    def begin_call(self, guided: bool) -> None:
        self.loop_start = None
        self.guided = guided
        self._predictions: list[torch.Tensor] = []

    @property
    def discrepancy(self) -> list[float | None]:
        if not self.guided:
            return [None] * len(self._predictions)
        return [discrepancy(*p.chunk(2)) for p in self._predictions]

    def phase_name(self, step: int) -> str:
        return "serial"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.loop_start is None:
            self._count_steps()
        self._start_clock()
        with self.spans.call(), self.spans.span("compute", "forward"):
            out = self.inner(*args, **kwargs)
        self._predictions.append(_prediction(out))
        return out


def _rows(inputs: dict[str, Any], rows: range, total: int) -> dict[str, Any]:
    """The graph inputs of ``rows`` out of a call of ``total`` rows."""
    return {
        k: v[rows.start : rows.stop] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == total else v
        for k, v in inputs.items()
    }


class HybridDenoiser(_DenoiserProxy):
    """Executes the plan's hybrid schedule for the positions of ``replica`` this process hosts."""

    def __init__(self, traced: TracedModel, plan: Plan, transport: Transport, replica: int = 0) -> None:
        super().__init__(traced.denoiser, traced.attr, transport.spans)
        self.adapter = traced.adapter
        self.plan = plan
        self.mesh = plan.mesh
        self.transport = transport
        self.runner = GraphRunner(traced.graph)
        self.replica = replica
        self.ranks = self.mesh.replica_ranks(replica)
        self.group = self.ranks
        self.hosted = [s for s, r in enumerate(self.ranks) if r in transport.hosted]
        cuts = plan.cut_tensors
        compute = [n.name for n in traced.graph.graph.nodes if n.op != "placeholder"]
        self._full = self.runner.program(compute, keep=[c.node for c in cuts])
        self._stage_programs = {
            s.index: self.runner.program(s.recompute + s.nodes, keep=[c.node for c in cuts if c.producer == s.index])
            for s in plan.stages
        }
        self.routing = Routing(plan)
        self._output_stage = plan.output_stage
        self._sharded = ShardedForwards(self.runner, plan, transport, self.ranks) if self.mesh.sp > 1 else None

    def begin_call(self, guided: bool) -> None:
        self.mesh.check_guided(guided)
        self.guided = guided
        self.controller: PhaseController | None = None  # made on the first step, when the steps are known
        self.loop_start = None
        self._step = 0
        #: Per hosted position: the values kept from its last full forward (feed the window).
        self._last_full: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def discrepancy(self) -> list[float | None]:
        return self.controller.discrepancy

    def phase_name(self, step: int) -> str:
        return self.controller.phases[step].value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._start_clock(lambda: self.transport.barrier(self.group))
        with self.spans.call():
            return self._step_call(*args, **kwargs)

    def _step_call(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        inputs = self.adapter.inputs_from_call(*args, **kwargs)
        latent = inputs[self.adapter.latent]
        rows = latent.shape[0]
        if self.guided and rows % 2:
            raise HybridiffError(f"a guided denoiser call must have an even batch, got {rows}")
        if self._step == 0:
            self.routing.check_rows(rows)
            self._count_steps()
            self.controller = PhaseController(self.plan.schedule, self.num_steps)
            self._full_steps = 0
            if self._sharded is not None:
                self._sharded.begin_call()
        if self._step >= self.num_steps:
            raise HybridiffError(
                f"the pipeline called its denoiser more often than it has timesteps ({self.num_steps}); hybridiff "
                "runs pipelines that call the denoiser once per timestep"
            )
        self._latent = latent
        step = self._step
        self._step += 1
        phase = self.controller.phase(step)
        self.transport.phase = phase.value
        if phase is Phase.PIPELINE:
            prediction = self._window_step(step, inputs, rows)
            if self.mesh.cfg == 1:
                out = prediction
            elif self.plan.schedule.window_guidance == "cached":
                # u + w (c - u) = prediction + (w - 1) * (eps_c - eps_u) of tau1's full step
                out = torch.cat([prediction - self._guidance, prediction])
            else:
                out = torch.cat([prediction, prediction])
        else:
            out = self._full_step(step, inputs, rows)
        return self.adapter.wrap_output(out, return_dict)

    def _like(self, rows: int) -> torch.Tensor:
        """A receive buffer for ``rows`` rows of the prediction."""
        return torch.empty_like(self._latent[:rows])

    def _forwards(self, inputs: dict[str, Any], rows: int) -> dict[int, dict[str, Any]]:
        """Each hosted position's forward on the rows it computes (``Mesh.computed_rows``): whole
        rows, or with ``sp > 1`` its shard of their tokens (``runtime.sequence``)."""
        work = {s: mine for s in self.hosted if (mine := self.mesh.computed_rows(s, rows))}
        if self._sharded is not None:
            with self.spans.span("compute", "shard-parallel forward"):
                exact = self._sharded.exact(self._full_steps, self._step - 1, self.controller.tau2)
                return self._sharded.run({s: _rows(inputs, mine, rows) for s, mine in work.items()}, exact)
        done = {}
        for s, mine in work.items():
            with self.spans.span("compute", f"forward {len(mine)} row(s)"):
                done[s] = self.runner.run(self._full, _rows(inputs, mine, rows))
        return done

    def _full_step(self, step: int, inputs: dict[str, Any], rows: int) -> torch.Tensor:
        self._last_full = self._forwards(inputs, rows)
        self._full_steps += 1
        if step == 0:
            for s, values in self._last_full.items():
                self._check_cuts(values, len(self.mesh.computed_rows(s, rows)))
        sizes = [len(self.mesh.full_rows(s, rows)) for s in range(len(self.ranks))]
        chunks = {self.ranks[s]: v["output"] for s, v in self._last_full.items() if self.mesh.full_rows(s, rows)}
        out = self.transport.gather_rows(chunks, sizes, self.group, self._like(1))
        if self.guided:
            eps_u, eps_c = out.chunk(2)
            self.controller.observe(eps_u, eps_c)
        else:
            self.controller.observe(None, None)
        if self.controller.window_follows(step):
            if self.guided:
                self._guidance = eps_c - eps_u  # kept for --window-guidance cached
            self.transport.phase = Phase.PIPELINE.value  # the hand-off is the window's traffic
            if self._sharded is not None:
                self._sharded.unshard(self._last_full, rows)
            self._hand_off(rows, next_is_last=self.controller.is_last_window_step(step + 1))
        return out

    def _check_cuts(self, values: dict[str, torch.Tensor], rows: int) -> None:
        """The cut tensors the model computes have the shapes and dtypes the plan gives them, so
        every receive buffer fits its message. Checked on each call's first step, before any
        cut tensor is sent: an edited plan (a cut's shape, dtype or the image size) stops here."""
        for c in self.plan.cut_tensors:
            value = values.get(c.node)
            if c.constant is not None or not isinstance(value, torch.Tensor):
                continue
            expected = (c.row_shape(rows), c.dtype)
            found = (list(value.shape), str(value.dtype).removeprefix("torch."))
            dim = self._sharded.shards.shard_dim(value, expected[0]) if self._sharded is not None else None
            if dim is not None:
                found[0][dim] = expected[0][dim]  # one peer's share of the image tokens
            if found != expected:
                size = f"{self.plan.model.height}x{self.plan.model.width}"
                raise HybridiffError(
                    f"cut tensor {c.node} is {found[1]} {found[0]} for {rows} row(s) at {size}, but the plan says "
                    f"{expected[1]} {expected[0]}: the plan was edited or compiled for another size or dtype; recompile it"
                )

    def _hand_off(self, rows: int, next_is_last: bool) -> None:
        """After tau1's full step: each position sends, for every stage, the cut tensors of the
        rows it just computed whole that the stage's consumers will read on the first window step.
        Receives are posted first: gloo moves a message once both ends have posted it, so a
        send posted before its receive would wait for the sender's busy core to notice."""
        for s in self.hosted:
            self._expect_cuts(s, rows, first=True, next_is_last=next_is_last)
        for s in self.hosted:
            if s not in self._last_full:
                continue
            computed, values = len(self.mesh.full_rows(s, rows)), self._last_full[s]
            for consumer, cuts, part in self.routing.hand_off(s, rows, next_is_last):
                tensors = [_narrow(values[c.node], c, part.start, len(part), computed) for c in cuts]
                self.transport.post(self.ranks[s], self.ranks[consumer], tensors)

    def _window_step(self, step: int, inputs: dict[str, Any], rows: int) -> torch.Tensor:
        last = self.controller.is_last_window_step(step)
        next_is_last = self.controller.is_last_window_step(step + 1)
        first = self.controller.tau1 == step - 1
        prediction = None
        for s in self.hosted:
            owns_output = s == self._output_stage
            if last and not owns_output:
                continue  # nothing it would produce is consumed any more
            mine = self.routing.window_rows(s, rows)
            env = {**_rows(inputs, mine, rows), **{c.node: c.runtime_value(len(mine)) for c in self.routing.constants}}
            for cuts, sources in self.routing.incoming(s, rows, first):
                parts = [self.transport.take(self.ranks[src], self.ranks[s], self._templates(cuts, n)) for src, n in sources]
                for i, cut in enumerate(cuts):
                    env[cut.node] = parts[0][i] if len(parts) == 1 else torch.cat([p[i] for p in parts], cut.batch_dim)
            if not last:
                self._expect_cuts(s, rows, first=False, next_is_last=next_is_last)
            with self.spans.span("compute", f"stage {s}"):
                values = self.runner.run(self._stage_programs[s], env)
            if not last:
                self._post_cuts(s, values, next_is_last)
            if owns_output:
                prediction = values["output"]
        out_rows = len(self.routing.window_rows(self._output_stage, rows))
        out = self.transport.broadcast(prediction, self.ranks[self._output_stage], self._like(out_rows), self.group)
        self.transport.flush()  # the cut tensors leave now, not while the next stage computes
        return out

    def _templates(self, cuts: list[CutTensor], rows: int) -> list[torch.Tensor]:
        """Receive buffers shaped as the plan records, for ``rows`` rows."""
        device = self._latent.device
        return [torch.empty(c.row_shape(rows), dtype=getattr(torch, c.dtype), device=device) for c in cuts]

    def _expect_cuts(self, position: int, rows: int, first: bool, next_is_last: bool) -> None:
        """Pre-post the receives of the next window step's cut tensors (if it reads any)."""
        if not self.routing.receives_next(position, next_is_last):
            return
        for cuts, sources in self.routing.incoming(position, rows, first):
            for src, n in sources:
                self.transport.expect(self.ranks[src], self.ranks[position], self._templates(cuts, n))

    def _post_cuts(self, position: int, values: dict[str, torch.Tensor], next_is_last: bool) -> None:
        for (producer, consumer), cuts in self.routing.links.items():
            if producer == position and self.routing.receives_next(consumer, next_is_last):
                self.transport.post(self.ranks[position], self.ranks[consumer], [values[c.node] for c in cuts])


def _narrow(value: torch.Tensor, cut: CutTensor, start: int, length: int, total: int) -> torch.Tensor:
    """``length`` rows of a cut tensor computed for ``total`` rows, from row ``start``
    (``Routing.check_rows`` has refused cuts without a batch dimension wherever rows must split)."""
    return value if length == total else value.narrow(cut.batch_dim, start, length)
