"""``hybridiff.parallelize``: run a plan inside your own diffusers code.

``parallelize(pipe, plan)`` checks the plan against ``pipe``'s denoiser and returns a
``ParallelPipeline`` that is called exactly like ``pipe``. Each call runs the stock pipeline on
every rank of each replica of the plan's mesh with the rank-aware denoiser
(``runtime.denoiser``) standing in for ``pipe.unet``/``pipe.transformer`` for the duration of
the call only: between calls ``pipe`` is untouched, so schedulers, weights and callbacks the user
changes are what the next call uses. ``hybridiff run`` is built on this class too (``session``).

Rules, checked on every call (one line on every rank, never a hang): every rank makes the same
calls with the same arguments (a digest of each argument is compared, generators by state);
the call is the plan's image size and fits its mesh. Rank 0, or every rank with
``all_ranks=True``, gets the pipeline's output object and ``last_report``; other ranks get None.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hybridiff.errors import HybridiffError, one_line, one_line_when_uncaught
from hybridiff.graph.guidance import CallPattern, Guidance
from hybridiff.graph.pipeline import TracedModel
from hybridiff.plan import Execution, Plan, load_plan
from hybridiff.program.layout import Layout
from hybridiff.program.routing import Routing
from hybridiff.runtime import watchdog
from hybridiff.runtime.api import DISTRIBUTED, Mode, calls
from hybridiff.runtime.api.agreement import Agreement
from hybridiff.runtime.api.callspec import CallSpec
from hybridiff.runtime.api.checks import trace_for_plan
from hybridiff.runtime.api.collect import CallReport, merge_local, merge_shares
from hybridiff.runtime.api.execution import chosen_execution
from hybridiff.runtime.api.module import ParallelModule
from hybridiff.runtime.comm import shared
from hybridiff.runtime.comm.group import choose_device, join_group, pipe_device, release_group
from hybridiff.runtime.comm.transport import DistTransport, LocalTransport, Transport
from hybridiff.runtime.execution.context_parallel import UlyssesDenoiser
from hybridiff.runtime.execution.denoiser import HybridDenoiser, ObservedDenoiser, ReplicaCall, StandIn
from hybridiff.runtime.spans import Spans


def parallelize(
    pipe: Any, plan: Plan | str | Path, *, device: str | torch.device | None = None, emulate: bool = False,
    all_ranks: bool = False, trace: bool = False, guidance: CallPattern = "batched", leaves: Any = None,
    execution: Execution | None = None,
) -> ParallelPipeline | ParallelModule:
    """Run ``plan`` on ``pipe``: under ``torchrun --nproc-per-node N`` (one rank per device of
    the plan), or in this one process with ``emulate=True``. ``device``: where ``pipe`` computes
    [default: this rank's GPU where CUDA exists, else the pipeline's device]. ``all_ranks``: every
    rank gets the output, not only rank 0. ``trace``: record per-step spans (``write_trace``).
    ``execution``: ``"eager"`` or ``"compiled"`` (every program through ``torch.compile``; the
    first call compiles, so warm up before timing) [default: the plan's].

    ``pipe`` may be a denoiser module of your own sampling loop (``runtime.api.module``):
    ``guidance`` says how the loop guides it (``"batched"``: ``[uncond; cond]`` rows in one call;
    ``"two-calls"``: conditional, then unconditional), ``leaves`` are the ones it was compiled with."""
    if isinstance(pipe, nn.Module):
        return ParallelModule(pipe, plan, guidance, emulate=emulate, leaves=leaves, trace=trace, execution=execution)
    mode = "emulate" if emulate else "hybrid"
    return ParallelPipeline(pipe, plan, mode, device=device, all_ranks=all_ranks, trace=trace, execution=execution)


class ParallelPipeline:
    """A diffusers pipeline executing a plan; call it like the pipeline. See the module text."""

    def __init__(
        self, pipe: Any, plan: Plan | str | Path, mode: Mode = "hybrid", device: str | torch.device | None = None,
        all_ranks: bool = False, trace: bool = False, own_cores: bool = False, execution: Execution | None = None,
    ) -> None:
        """``mode="serial"`` runs the stock denoiser, observed (the CLI's baseline); ``"ulysses"``
        runs it under diffusers' context parallelism over all launched ranks (``bench``'s peer;
        it changes ``pipe``'s denoiser for good). ``own_cores``: this worker is bound to cores of
        its own (``device.placement``), so it may poll for peers. ``execution``: eager or compiled
        programs [default: the plan's]; diffusers' Ulysses always runs eagerly."""
        self.pipe = pipe
        self.plan = plan if isinstance(plan, Plan) else load_plan(Path(plan))
        self.execution: Execution = "eager" if mode == "ulysses" else chosen_execution(execution, self.plan.execution)
        self.mode, self.all_ranks = mode, all_ranks
        self.spans = Spans(enabled=trace)
        self.last_report: CallReport | None = None
        self._closed = False
        distributed = mode in DISTRIBUTED
        self.device = choose_device(pipe, device, distributed=distributed)
        if pipe_device(pipe) != self.device:
            pipe.to(self.device)
        self._distributed = distributed
        if distributed and self.execution == "compiled":
            watchdog.allow_compilation()
        self._transports: list[Transport] = []
        self.rank = 0
        try:
            if distributed:
                self.rank = join_group(self.plan, self.device, any_size=mode == "ulysses")
                one_line_when_uncaught()
            self.agreement = Agreement(self.rank, distributed=distributed)
            traced = self.agreement.agreed(lambda: trace_for_plan(pipe, self.plan))
            check_rows = None if mode in ("serial", "ulysses") else Routing(Layout.of(self.plan)).check_rows
            self.spec = CallSpec(traced, self.plan, self.replicas, check_rows)
            self._stand_ins = self._make_stand_ins(traced, own_cores)
        except BaseException:
            self._release(graceful=False)
            raise

    @property
    def guidance(self) -> Guidance:
        """How the pipeline guides: ``guidance.scale`` names the argument the plan's scale sets."""
        return self.spec.guidance

    @property
    def replicas(self) -> int:
        """Replicas a call's images are shared among (the serial baseline is one)."""
        return 1 if self.mode in ("serial", "ulysses") else self.plan.mesh.dp

    @property
    def world(self) -> int:
        """The processes this pipeline runs on."""
        return dist.get_world_size() if self.mode in DISTRIBUTED else 1

    def _make_stand_ins(self, traced: TracedModel, own_cores: bool) -> dict[int, StandIn]:
        """The stand-in denoiser of each replica this process runs."""
        mesh = self.plan.mesh
        two_calls = traced.guidance.calls == "two-calls"
        if self.mode == "serial":
            return {0: ObservedDenoiser(traced.denoiser, traced.attr, self.spans, two_calls, self.execution)}
        if self.mode == "ulysses":
            masks = getattr(getattr(traced.adapter, "family", None), "masks", {})
            return {0: UlyssesDenoiser(traced.denoiser, traced.attr, self.spans, two_calls, masks)}
        if self.mode == "emulate":
            self._transports = [LocalTransport(mesh.replica_ranks(d), self.spans) for d in range(mesh.dp)]
            return {d: HybridDenoiser(traced, self.plan, t, d, self.execution) for d, t in enumerate(self._transports)}
        transport = DistTransport(
            [mesh.replica_ranks(d) for d in range(mesh.dp)] + mesh.shard_groups(), self.spans, spin=own_cores,
            shared=own_cores and shared.supported(), timeout_s=watchdog.timeout_s(),
        )
        self._transports = [transport]
        located = mesh.locate(self.rank)
        return {located[0]: HybridDenoiser(traced, self.plan, transport, located[0], self.execution)} if located else {}

    def __getattr__(self, name: str) -> Any:
        """The pipeline's attributes (``ppipe.scheduler``, ``ppipe.vae``, ...)."""
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One call of the pipeline, as ``pipe(*args, **kwargs)``; see the module text."""
        if self._closed:
            raise HybridiffError("this ParallelPipeline was closed; call hybridiff.parallelize again")
        call = self.agreement.agreed(lambda: self.spec.prepare(args, kwargs), compare=True)
        return_dict = call.pop("return_dict", True)
        images, per_prompt = calls.image_count(call)
        shares = calls.replica_images(images, self.replicas)
        results = {}
        for replica, stand_in in self._stand_ins.items():
            if shares[replica]:
                mine = call if self.replicas == 1 else calls.split(call, shares[replica], per_prompt, images)
                if not self._wants_output(replica):
                    mine = {**mine, "output_type": "latent"}  # nobody reads this rank's images: skip decoding
                results[replica] = self._replica_call(replica, stand_in, mine, shares[replica])
        output, self.last_report = self._collect(results)
        if output is None or return_dict:
            return output
        return output.to_tuple()

    def _replica_call(self, replica: int, stand_in: StandIn, call: dict[str, Any], images: list[int]) -> tuple[Any, ReplicaCall]:
        """One stock pipeline call with ``stand_in`` as the denoiser, timed from the first
        denoiser call (after the replica's ranks met) to the end of the last step."""
        ends: list[float] = []
        user = call.get("callback_on_step_end")

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if self.device.type == "cuda" and (self.spans.enabled or step == stand_in.num_steps - 1):
                torch.cuda.synchronize(self.device)  # only where a time is read: no stall per step
            ends.append(time.perf_counter())
            watchdog.advance()
            self.spans.end_step(ends[-1], stand_in.phase_name(step))
            return user(pipe, step, timestep, tensors) if user is not None else tensors

        call = {**call, "callback_on_step_end": step_end, "return_dict": True}
        tensor_inputs = getattr(user, "tensor_inputs", None)  # diffusers' PipelineCallback objects
        if tensor_inputs is not None:
            call["callback_on_step_end_tensor_inputs"] = tensor_inputs
        stand_in.begin_call(guided=self.spec.guided(call))
        with stand_in.installed(self.pipe), torch.inference_mode():
            try:
                output = self.pipe(**call)
            except (ValueError, TypeError) as e:
                if stand_in.loop_start is not None:
                    raise  # raised while denoising: not the pipeline's check of its arguments
                raise HybridiffError(f"{type(self.pipe).__name__} refused the call ({one_line(e)}); correct that argument") from e
        return output, stand_in.record(replica, images, latency_s=ends[-1] - stand_in.loop_start)

    def _receivers(self) -> range:
        """The ranks that get each call's output."""
        return range(self.world if self.all_ranks else 1)

    def _hands_over(self, replica: int) -> bool:
        """Whether this process sends ``replica``'s output on: it is the replica's first rank
        and a rank outside the replica wants it."""
        ranks = range(self.world) if self.mode == "ulysses" else self.plan.mesh.replica_ranks(replica)
        return self.rank == ranks[0] and any(r not in ranks for r in self._receivers())

    def _wants_output(self, replica: int) -> bool:
        """Whether this process needs ``replica``'s output: to return it, or to hand it over."""
        return self.mode not in DISTRIBUTED or self.rank in self._receivers() or self._hands_over(replica)

    def _collect(self, results: dict[int, tuple[Any, ReplicaCall]]) -> tuple[Any, CallReport | None]:
        """The call's output and report where they are wanted: this process's replicas', and in
        hybrid mode every replica's, handed over by its first rank (every rank's bytes too)."""
        if self.mode not in DISTRIBUTED:
            return merge_local(results, self.device)
        world, receivers = dist.get_world_size(), self._receivers()
        sent = {}
        for replica, (output, done) in results.items():
            sent[replica] = (done, calls.portable(output) if self._hands_over(replica) else None)
        if self.all_ranks:
            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, sent)
        else:
            everyone = [None] * world if self.rank == 0 else None
            dist.gather_object(sent, everyone, dst=0)
        if self.rank not in receivers:
            return None, None
        return merge_shares(everyone, results, self.device)

    def step_breakdowns(self) -> list[dict[str, Any]]:
        """Every rank's milliseconds per step by phase and category (``trace=True``; see
        ``Spans.breakdown``), in rank order. In hybrid mode every rank must call it."""
        return self.agreement.exchange(self.spans.breakdown())

    def write_trace(self, path: Path) -> None:
        """This process's per-step spans as a Chrome/Perfetto trace (``trace=True``)."""
        self.spans.write(path, f"rank {self.rank} ({self.mode})")

    def close(self) -> None:
        """Release the transport, and the process group if ``parallelize`` created it (after
        every rank got here). ``pipe`` is as it was: the stand-in is only installed per call."""
        if not self._closed:
            self._closed = True
            self._release(graceful=True)

    def __enter__(self) -> ParallelPipeline:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        if not self._closed:
            self._closed = True
            # after a failure a peer may never arrive: leave without waiting for it
            self._release(graceful=error is None)

    def _release(self, graceful: bool) -> None:
        for transport in self._transports:
            transport.close(graceful)
        if self._distributed:
            release_group(graceful)
