"""Rank-aware stand-ins for a pipeline's denoiser (``pipe.unet`` or ``pipe.transformer``).

``HybridDenoiser`` replaces the denoiser inside a stock diffusers pipeline: the pipeline keeps
doing text encoding, CFG batching, guidance, the scheduler step, callbacks and decoding, and
every call to "the denoiser" executes one step program (``hybridiff.program``) for one replica of the mesh.
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

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Protocol

import torch
from torch import nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.compiled import compile_callable
from hybridiff.graph.pipeline import TracedModel
from hybridiff.plan import RUN_PHASES, Execution, Phase, Plan
from hybridiff.program.build import ProgramBuilder
from hybridiff.program.layout import Layout
from hybridiff.program.timeline import CallSchedule
from hybridiff.runtime.comm.transport import Transport
from hybridiff.runtime.execution.executor import Executor
from hybridiff.runtime.execution.pairing import BranchPairing
from hybridiff.runtime.execution.phases import discrepancy
from hybridiff.runtime.spans import Spans


@dataclass(frozen=True)
class ReplicaCall:
    """What one replica did in a call: its images (indices into the call's images), the
    denoising loop's seconds, the schedule it ran and the bytes its ranks sent."""

    replica: int
    images: list[int]
    latency_s: float
    tau1: int | None
    tau2: int | None
    phases: list[str]
    discrepancy: list[float | None]
    comm_bytes_by_phase: dict[str, int]

    @property
    def comm_bytes(self) -> int:
        return sum(self.comm_bytes_by_phase.values())


class StandIn(Protocol):
    """What ``ParallelPipeline`` needs of a stand-in denoiser for one pipeline call."""

    #: Denoiser calls the current pipeline call makes (known from its first), and when its
    #: denoising loop started.
    num_steps: int
    loop_start: float | None

    def begin_call(self, guided: bool) -> None: ...

    def installed(self, pipe: Any) -> ContextManager[None]: ...

    def phase_name(self, step: int) -> str: ...

    def record(self, replica: int, images: list[int], latency_s: float) -> ReplicaCall: ...


class _DenoiserProxy(nn.Module):
    """Looks like the wrapped denoiser to the pipeline (config, dtype, add_embedding, ...)."""

    def __init__(self, denoiser: nn.Module, attr: str, spans: Spans, two_calls: bool = False) -> None:
        super().__init__()
        self.inner = denoiser
        self.attr = attr
        self.spans = spans
        self.loop_start: float | None = None
        #: Denoising steps the current pipeline call makes (known from its first denoiser call).
        self.num_steps = 0
        #: The pipeline guides with two denoiser calls per step (conditional, then unconditional).
        self.two_calls = two_calls
        self.paired = False

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
    timed loop does nothing the stock pipeline would not do. ``execution="compiled"`` runs the
    denoiser module under ``torch.compile`` (static shapes), as a user compiling it would."""

    def __init__(self, denoiser: nn.Module, attr: str, spans: Spans, two_calls: bool = False, execution: Execution = "eager") -> None:
        super().__init__(denoiser, attr, spans, two_calls)
        device = next((p.device for p in denoiser.parameters()), None)
        # kept outside the module tree: the proxy's only submodule stays the denoiser itself
        self.__dict__["_run"] = denoiser if execution == "eager" else compile_callable(denoiser, device)

    def begin_call(self, guided: bool) -> None:
        self.loop_start = None
        self.guided, self.paired = guided, guided and self.two_calls
        self._predictions: list[torch.Tensor] = []

    @property
    def discrepancy(self) -> list[float | None]:
        if not self.guided:
            return [None] * len(self._predictions)
        if self.paired:  # conditional, then unconditional
            return [discrepancy(u, c) for c, u in zip(self._predictions[::2], self._predictions[1::2])]
        return [discrepancy(*p.chunk(2)) for p in self._predictions]

    def phase_name(self, step: int) -> str:
        return Phase.SERIAL.value

    def record(self, replica: int, images: list[int], latency_s: float) -> ReplicaCall:
        curve = self.discrepancy
        return ReplicaCall(replica, images, latency_s, None, None, [Phase.SERIAL.value] * len(curve), curve, {})

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.loop_start is None:
            self._count_steps()
        self._start_clock()
        with self.spans.call(), self.spans.span("compute", "forward"):
            out = self._run(*args, **kwargs)
        self._predictions.append(_prediction(out))
        return out


class HybridDenoiser(_DenoiserProxy):
    """Runs the plan's step programs for the positions of ``replica`` this process hosts: each
    denoiser call asks the call's ``CallSchedule`` for its step's program and executes it."""

    def __init__(
        self, traced: TracedModel, plan: Plan, transport: Transport, replica: int = 0, execution: Execution | None = None
    ) -> None:
        super().__init__(traced.denoiser, traced.attr, transport.spans, traced.guidance.calls == "two-calls")
        self.adapter = traced.adapter
        self.plan, self.mesh, self.transport = plan, plan.mesh, transport
        self.executor = Executor(traced, plan, transport, replica, execution)
        self.builder = ProgramBuilder(Layout.of(plan))
        self.timeline: CallSchedule | None = None
        self._warned: set[int] = set()  # step counts already warned of (``_warn_short_call``)

    def begin_call(self, guided: bool, steps: int | None = None) -> None:
        """A new pipeline call (or a user's sampling loop of ``steps`` steps; a pipeline's
        steps are read from it on its first denoiser call)."""
        self.mesh.check_guided(guided)
        self._steps_given = steps
        self.guided, self.paired = guided, guided and self.two_calls
        self.pairing = BranchPairing(self.adapter.latent, self.adapter.timestep)
        self.timeline = None  # made on the first step, when the steps are known
        self.loop_start = None
        self._step_index = 0
        self.executor.begin_call()

    @property
    def discrepancy(self) -> list[float | None]:
        return self.timeline.curve

    def phase_name(self, step: int) -> str:
        return self.timeline.phases[step].value

    def record(self, replica: int, images: list[int], latency_s: float) -> ReplicaCall:
        """The call just made: its window, phases, discrepancy and the bytes sent per phase."""
        self.pairing.check_done()
        self.transport.flush()  # bytes are counted when posted; these have left now too
        sent = {p.value: self.executor.sent[p] for p in RUN_PHASES}
        t = self.timeline
        return ReplicaCall(replica, images, latency_s, t.tau1, t.tau2, [p.value for p in t.phases], t.curve, sent)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._start_clock(lambda: self.transport.barrier(self.executor.ranks))
        with self.spans.call():
            return self._step_call(*args, **kwargs)

    def _step_call(self, *args: Any, **kwargs: Any) -> Any:
        return_dict = kwargs.pop("return_dict", True)
        inputs = self.adapter.inputs_from_call(*args, **kwargs)
        if not self.paired:
            return self.adapter.wrap_output(self._step(inputs), return_dict)
        both = self.pairing.add(inputs)
        if both is None:  # the conditional call: its prediction is filled in by the next call
            return self.adapter.wrap_output(self.pairing.pending_prediction, return_dict)
        return self.adapter.wrap_output(self.pairing.complete(self._step(both)), return_dict)

    def _warn_short_call(self) -> None:
        """One line, from rank 0's process, when a call is too short for the window to be sure
        (once per step count: a run makes many calls of the same length)."""
        reason = self.plan.schedule.short_call(self.num_steps) if self.guided else None
        if reason and self.num_steps not in self._warned and 0 in self.executor.ranks and 0 in self.transport.hosted:
            self._warned.add(self.num_steps)
            print(f"warning: {reason}", file=sys.stderr)

    def _step(self, inputs: dict[str, Any]) -> torch.Tensor:
        """One denoising step on a call's graph inputs; the step's predictions, all rows."""
        latent = inputs[self.adapter.latent]
        rows = latent.shape[0]
        if self.guided and rows % 2:
            raise HybridiffError(f"a guided denoiser call must have an even batch, got {rows}")
        if self._step_index == 0:
            self.builder.routing.check_rows(rows)
            if self._steps_given is None:
                self._count_steps()
            else:
                self.num_steps = self._steps_given
            self.timeline = CallSchedule(self.builder, self.plan.schedule, self.num_steps, rows)
            self._warn_short_call()
        if self._step_index >= self.num_steps:
            raise HybridiffError(
                f"the pipeline called its denoiser more often than it has timesteps ({self.num_steps}); hybridiff "
                "runs pipelines that call the denoiser once per timestep (twice with true CFG)"
            )
        step = self._step_index
        self._step_index += 1
        program = self.timeline.program(step)
        out = self.executor.run(program, inputs, latent)
        if program.returns == "predictions":
            self._after_full_step(step, out, inputs, latent)
        elif program.returns == "cached":
            # u + w (c - u) = prediction + (w - 1) * (eps_c - eps_u) of tau1's full step
            out = torch.cat([out - self._guidance, out])
        elif program.returns == "mixed":
            out = torch.cat([out, out])
        return out

    def _after_full_step(self, step: int, out: torch.Tensor, inputs: dict[str, Any], latent: torch.Tensor) -> None:
        """Apply the window rule to this step's predictions; hand off to the window if it opens."""
        measured = None
        if self.guided:
            eps_u, eps_c = out.chunk(2)
            measured = discrepancy(eps_u, eps_c)
        hand_off = self.timeline.observe(step, measured)
        if hand_off is not None:
            if self.guided:
                self._guidance = eps_c - eps_u  # kept for --window-guidance cached
            self.executor.run(hand_off, inputs, latent)
