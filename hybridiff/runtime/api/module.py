"""``hybridiff.parallelize(module, plan)``: a plan run inside the user's own sampling loop.

The plan was compiled from the module itself (``hybridiff.compile(module, example, ...)``).
``ParallelModule`` stands in for the module: each sampling run is one ``with
denoiser.loop(steps=N):`` block, in which every call of ``denoiser(...)`` (as the module is
called) is one step, or, with ``guidance="two-calls"``, one branch of a step (conditional
first). Every rank makes the same calls and gets the same predictions back, so the user's
loop runs unchanged on every rank.

The rules of ``parallelize`` hold: a loop's length and its first call's arguments are agreed
among the ranks (a difference stops every rank with one line); the module is traced on the
first call and refused in one line when its graph is not the plan's; ``last_report`` says what
the loop did (window, discrepancy, bytes of every rank).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from hybridiff.errors import HybridiffError
from hybridiff.graph.guidance import CallPattern, Guidance
from hybridiff.graph.pipeline import TracedModel, trace_module_call
from hybridiff.plan import Execution, Plan, load_plan
from hybridiff.runtime import watchdog
from hybridiff.runtime.api import calls
from hybridiff.runtime.api.agreement import Agreement, check_same
from hybridiff.runtime.api.checks import check_fingerprint
from hybridiff.runtime.api.collect import CallReport, merge_shares
from hybridiff.runtime.api.execution import chosen_execution
from hybridiff.runtime.comm.group import join_group, release_group
from hybridiff.runtime.comm.transport import DistTransport, LocalTransport, Transport
from hybridiff.runtime.execution.denoiser import HybridDenoiser
from hybridiff.runtime.spans import Spans


class ParallelModule:
    """A denoiser module executing a plan in the user's loop; see the module text."""

    def __init__(
        self, module: nn.Module, plan: Plan | str | Path, guidance: CallPattern, emulate: bool = False, leaves: Any = None,
        trace: bool = False, execution: Execution | None = None,
    ) -> None:  # fmt: skip
        self.module, self.leaves = module, leaves
        self.plan = plan if isinstance(plan, Plan) else load_plan(Path(plan))
        self.execution: Execution = chosen_execution(execution, self.plan.execution)
        if self.plan.mesh.dp > 1:
            raise HybridiffError(
                f"the plan's mesh {self.plan.mesh.label} has {self.plan.mesh.dp} replicas, but a module in your own loop "
                "runs one batch at a time; compile it with one replica (mesh='dp=1,...' or batch=1)"
            )
        if guidance != self.plan.model.guidance_calls:
            raise HybridiffError(
                f"the plan was compiled for guidance={self.plan.model.guidance_calls!r} but parallelize was given "
                f"guidance={guidance!r}; pass the one the loop uses to both hybridiff.compile and parallelize"
            )
        self.guidance = Guidance(calls=guidance)
        self.distributed = not emulate
        self.spans = Spans(enabled=trace)
        self._released = False
        if self.distributed and self.execution == "compiled":
            watchdog.allow_compilation()
        self.rank = join_group(self.plan, _device(module)) if self.distributed else 0
        self.agreement = Agreement(self.rank, distributed=self.distributed)
        self.last_report: CallReport | None = None
        self._stand_in: HybridDenoiser | None = None
        self._transport: Transport | None = None
        self._loop: dict[str, Any] | None = None

    def _make_stand_in(self, args: tuple, kwargs: dict[str, Any]) -> HybridDenoiser:
        """Trace the module on its first call and check it against the plan."""
        plan = self.plan
        traced: TracedModel = self.agreement.agreed(
            lambda: check_fingerprint(
                trace_module_call(self.module, (args, kwargs), plan.graph.latent, self.guidance, plan.graph.refined, self.leaves),
                plan,
            )
        )
        mesh = plan.mesh
        if self.distributed:
            self._transport = DistTransport([mesh.replica_ranks(0), *mesh.shard_groups()], self.spans, timeout_s=watchdog.timeout_s())
        else:
            self._transport = LocalTransport(mesh.replica_ranks(0), self.spans)
        return HybridDenoiser(traced, plan, self._transport, 0, self.execution)

    @contextmanager
    def loop(self, steps: int, guided: bool = True) -> Iterator[ParallelModule]:
        """One sampling run of ``steps`` steps (``guided``: with classifier-free guidance)."""
        # every rank sees every rank's values, so a difference stops each with the same line
        check_same(self.agreement.exchange({"steps": str(steps), "guided": str(guided)}), "denoiser.loop")
        self._loop = {"steps": steps, "guided": guided, "calls": 0, "end": None}
        try:
            yield self
            if self._stand_in is not None and self._loop["calls"]:
                self.last_report = self._report()
        finally:
            self._loop = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One call of the module, as ``module(*args, **kwargs)``, inside ``loop``."""
        loop = self._loop
        if loop is None:
            raise HybridiffError("call the parallel denoiser inside `with denoiser.loop(steps=N):`, one block per sampling run")
        if loop["calls"] == 0:
            check_same(self.agreement.exchange(calls.digest({**{str(i): a for i, a in enumerate(args)}, **kwargs})), "the denoiser")
            if self._stand_in is None:
                self._stand_in = self._make_stand_in(args, kwargs)
            self._stand_in.begin_call(loop["guided"], loop["steps"])
        loop["calls"] += 1
        with torch.inference_mode():
            out = self._stand_in(*args, **kwargs)
        loop["end"] = time.perf_counter()
        watchdog.advance()
        return out

    def _report(self) -> CallReport:
        """The loop's report, with every rank's bytes."""
        done = self._stand_in.record(0, [0], latency_s=self._loop["end"] - self._stand_in.loop_start)
        everyone = self.agreement.exchange({0: (done, None)})
        return merge_shares(everyone, {0: (None, done)}, torch.device("cpu"))[1]

    def close(self, graceful: bool = True) -> None:
        """Release the transport, and leave the process group (``release_group``)."""
        if self._transport is not None:
            self._transport.close(graceful)
            self._transport = None
        if self.distributed and not self._released:
            self._released = True
            release_group(graceful)

    def __enter__(self) -> ParallelModule:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        self.close(graceful=error is None)


def _device(module: nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))
