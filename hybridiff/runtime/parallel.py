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

import inspect
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from hybridiff.errors import HybridiffError, one_line
from hybridiff.graph.pipeline import TracedModel
from hybridiff.plan import Plan, load_plan
from hybridiff.runtime import calls, shared, watchdog
from hybridiff.runtime.checks import trace_for_plan
from hybridiff.runtime.denoiser import HybridDenoiser, ObservedDenoiser
from hybridiff.runtime.group import choose_device, join_group, pipe_device
from hybridiff.runtime.options import Mode
from hybridiff.runtime.routing import Routing
from hybridiff.runtime.spans import Spans
from hybridiff.runtime.transport import DistTransport, LocalTransport


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


@dataclass(frozen=True)
class CallReport:
    """The last call: one entry per replica that had images. ``tau1`` .. ``discrepancy`` are
    the first replica's (each replica decides its window from its own images)."""

    replicas: list[ReplicaCall]

    @property
    def latency_s(self) -> float:
        return max(r.latency_s for r in self.replicas)

    @property
    def comm_bytes(self) -> int:
        return sum(r.comm_bytes for r in self.replicas)

    tau1 = property(lambda self: self.replicas[0].tau1)
    tau2 = property(lambda self: self.replicas[0].tau2)
    phases = property(lambda self: self.replicas[0].phases)
    discrepancy = property(lambda self: self.replicas[0].discrepancy)


def parallelize(
    pipe: Any, plan: Plan | str | Path, *, device: str | torch.device | None = None, emulate: bool = False,
    all_ranks: bool = False, trace: bool = False,
) -> ParallelPipeline:
    """Run ``plan`` on ``pipe``: under ``torchrun --nproc-per-node N`` (one rank per device of
    the plan), or in this one process with ``emulate=True``. ``device``: where ``pipe`` computes
    [default: this rank's GPU where CUDA exists, else the pipeline's device]. ``all_ranks``: every
    rank gets the output, not only rank 0. ``trace``: record per-step spans (``write_trace``)."""
    return ParallelPipeline(pipe, plan, mode="emulate" if emulate else "hybrid", device=device, all_ranks=all_ranks, trace=trace)


class ParallelPipeline:
    """A diffusers pipeline executing a plan; call it like the pipeline. See the module text."""

    def __init__(
        self, pipe: Any, plan: Plan | str | Path, mode: Mode = "hybrid", device: str | torch.device | None = None,
        all_ranks: bool = False, trace: bool = False, own_cores: bool = False,
    ) -> None:
        """``mode="serial"`` runs the stock denoiser, observed (the CLI's baseline); ``own_cores``:
        this worker is bound to cores of its own (``device.placement``), so it may poll for peers."""
        self.pipe = pipe
        self.plan = plan if isinstance(plan, Plan) else load_plan(Path(plan))
        self.mode, self.all_ranks = mode, all_ranks
        self.spans = Spans(enabled=trace)
        self.last_report: CallReport | None = None
        self._closed = False
        self.device = choose_device(pipe, device, mode)
        if pipe_device(pipe) != self.device:
            pipe.to(self.device)
        self._owns_group = mode == "hybrid" and not dist.is_initialized()
        self._transports: list[Any] = []
        self.rank = 0
        try:
            if mode == "hybrid":
                self.rank = join_group(self.plan, self.device)
            traced = self._agreed(lambda: trace_for_plan(pipe, self.plan))
            self._attr, self._denoiser = traced.attr, traced.denoiser
            self._module_ids = [id(m) for m in self._denoiser.modules()]
            self._routing = Routing(self.plan)
            self._signature = inspect.signature(pipe.__call__)  # what the pipeline's calls accept
            self._stand_ins = self._make_stand_ins(traced, own_cores)
        except BaseException:
            self._release(graceful=False)
            raise

    @property
    def replicas(self) -> int:
        """Replicas a call's images are shared among (the serial baseline is one)."""
        return 1 if self.mode == "serial" else self.plan.mesh.dp

    def _make_stand_ins(self, traced: TracedModel, own_cores: bool) -> dict[int, Any]:
        """The stand-in denoiser of each replica this process runs."""
        mesh = self.plan.mesh
        if self.mode == "serial":
            return {0: ObservedDenoiser(traced.denoiser, traced.attr, self.spans)}
        if self.mode == "emulate":
            self._transports = [LocalTransport(mesh.replica_ranks(d), self.spans) for d in range(mesh.dp)]
            return {d: HybridDenoiser(traced, self.plan, t, d) for d, t in enumerate(self._transports)}
        one_machine = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
        transport = DistTransport(
            [mesh.replica_ranks(d) for d in range(mesh.dp)] + mesh.shard_groups(), self.spans, spin=own_cores,
            shared=own_cores and one_machine and shared.supported(), timeout_s=watchdog.timeout_s(),
        )
        self._transports = [transport]
        located = mesh.locate(self.rank)
        return {located[0]: HybridDenoiser(traced, self.plan, transport, located[0])} if located else {}

    def __getattr__(self, name: str) -> Any:
        """The pipeline's attributes (``ppipe.scheduler``, ``ppipe.vae``, ...)."""
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One call of the pipeline, as ``pipe(*args, **kwargs)``; see the module text."""
        if self._closed:
            raise HybridiffError("this ParallelPipeline was closed; call hybridiff.parallelize again")
        call = self._agreed(lambda: self._prepare(args, kwargs), compare=True)
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

    def _prepare(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments, with the plan's defaults where the call gives none, checked
        against the plan and against the denoiser the plan was checked on."""
        signature = self._signature
        call = dict(signature.bind_partial(*args, **kwargs).arguments)
        call.update(call.pop("kwargs", {}))
        schedule = self.plan.schedule
        planned = {"num_inference_steps": schedule.steps, "guidance_scale": schedule.guidance_scale}
        for key, value in {**self.plan.model.pipeline_kwargs, **planned}.items():
            if key in signature.parameters:  # what the plan was tuned for, where the call says nothing
                call.setdefault(key, value)
        for name in ("height", "width"):
            planned = getattr(self.plan.model, name)
            if call.get(name) is None:
                call[name] = planned
            elif call[name] != planned:
                raise HybridiffError(
                    f"the plan was compiled for {self.plan.model.height}x{self.plan.model.width} images but this call "
                    f"asks {name}={call[name]}; call with that size or compile a plan for it (--height/--width)"
                )
        guided = self._argument(call, "guidance_scale", 1.0) > 1
        self.plan.mesh.check_guided(guided)
        images, per_prompt = calls.image_count(call)
        most = calls.replica_images(images, self.replicas)[0]
        if self.replicas > 1:  # refuse what cannot be shared out here, where every rank hears of it
            calls.split(call, most, per_prompt, images)
        if self.mode != "serial":
            self._routing.check_rows(len(most) * (2 if guided else 1))
        current = getattr(self.pipe, self._attr)
        if current is not self._denoiser or [id(m) for m in current.modules()] != self._module_ids:
            raise HybridiffError(
                f"pipe.{self._attr} changed since hybridiff.parallelize (a module was replaced, e.g. by unfused LoRA "
                "adapters), so the traced graph would not run it; fuse them (pipe.fuse_lora(); "
                "pipe.unload_lora_weights()) or call hybridiff.parallelize again"
            )
        return call

    def _argument(self, call: dict[str, Any], name: str, otherwise: Any) -> Any:
        """``name``'s value in ``call``, else the pipeline's default."""
        if name in call:
            return call[name]
        parameter = self._signature.parameters.get(name)
        return otherwise if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    def _agreed(self, work: Callable[[], Any], compare: bool = False) -> Any:
        """Run this rank's ``work`` (checks that may fail with a one-line error) and exchange the
        outcome with every rank: one rank's problem stops every rank, with that line. With
        ``compare``, ``work``'s result is a call whose arguments must match rank 0's."""
        result, problem = None, None
        try:
            result = work()
        except HybridiffError as e:
            problem = str(e)
        except Exception as e:  # noqa: BLE001 - peers must hear of it, or they wait for this rank
            problem = f"rank {self.rank} failed: {one_line(e)}"
        unseeded = compare and result is not None and result.get("generator") is None and result.get("latents") is None
        said = {"problem": problem, "seed": int(torch.randint(0, 2**62, ())) if unseeded else None}
        if compare and result is not None:
            said["digest"] = calls.digest(result)
        everyone = self._exchange(said)
        for rank, theirs in enumerate(everyone):
            if theirs["problem"]:
                mine = theirs["problem"] == problem
                raise HybridiffError(theirs["problem"] if mine else f"rank {rank}: {theirs['problem']}")
        if compare:
            _check_same_call([e["digest"] for e in everyone])
        if unseeded:  # rank 0's seed, so every rank of a replica starts from the same noise
            images, _ = calls.image_count(result)
            result["generator"] = [torch.Generator("cpu").manual_seed(everyone[0]["seed"] + i) for i in range(images)]
        return result

    def _exchange(self, mine: Any) -> list[Any]:
        """``mine`` from every rank, in rank order (just ``[mine]`` in one process)."""
        if self.mode != "hybrid":
            return [mine]
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        return everyone

    def _replica_call(self, replica: int, stand_in: Any, call: dict[str, Any], images: list[int]) -> tuple[Any, ReplicaCall]:
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
        stand_in.begin_call(guided=self._argument(call, "guidance_scale", 1.0) > 1)
        with stand_in.installed(self.pipe), torch.inference_mode():
            output = self.pipe(**call)
        transport = getattr(stand_in, "transport", None)
        controller = getattr(stand_in, "controller", None)
        done = ReplicaCall(
            replica=replica,
            images=images,
            latency_s=ends[-1] - stand_in.loop_start,
            tau1=controller.tau1 if controller else None,
            tau2=controller.tau2 if controller else None,
            phases=[p.value for p in controller.phases] if controller else ["serial"] * len(ends),
            discrepancy=stand_in.discrepancy,
            comm_bytes_by_phase=transport.take_counts() if transport else {},
        )
        return output, done

    def _receivers(self) -> range:
        """The ranks that get each call's output."""
        return range(self.plan.mesh.world_size if self.all_ranks and self.mode == "hybrid" else 1)

    def _hands_over(self, replica: int) -> bool:
        """Whether this process sends ``replica``'s output on: it is the replica's first rank
        and a rank outside the replica wants it."""
        ranks = self.plan.mesh.replica_ranks(replica)
        return self.rank == ranks[0] and any(r not in ranks for r in self._receivers())

    def _wants_output(self, replica: int) -> bool:
        """Whether this process needs ``replica``'s output: to return it, or to hand it over."""
        return self.mode != "hybrid" or self.rank in self._receivers() or self._hands_over(replica)

    def _collect(self, results: dict[int, tuple[Any, ReplicaCall]]) -> tuple[Any, CallReport | None]:
        """The call's output and report where they are wanted: this process's replicas', and in
        hybrid mode every replica's, handed over by its first rank (every rank's bytes too)."""
        if self.mode != "hybrid":
            return _merged(results, self.device)
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
        return _assemble(everyone, results, self.device)

    def step_breakdowns(self) -> list[dict[str, Any]]:
        """Every rank's milliseconds per step by phase and category (``trace=True``; see
        ``Spans.breakdown``), in rank order. In hybrid mode every rank must call it."""
        return self._exchange(self.spans.breakdown())

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
            transport.close()
        if self._owns_group and dist.is_initialized():
            if graceful:
                # Leave together: a rank that exits while its peer still holds the gloo group open
                # can abort at teardown, which leaves a torchrun peer waiting at its exit.
                dist.barrier()
            dist.destroy_process_group()


def _merged(results: dict[int, tuple[Any, ReplicaCall]], device: torch.device) -> tuple[Any, CallReport]:
    """The call's output and report from every replica's, run in this process."""
    report = CallReport([done for _, done in results.values()])
    if len(results) == 1:
        return next(iter(results.values()))[0], report
    return calls.merge([(done.images, out) for out, done in results.values()], device), report


def _assemble(everyone: list[dict], local: dict[int, tuple[Any, Any]], device: torch.device) -> tuple[Any, CallReport]:
    """Merge every rank's share of a call: each replica's output once (its own where this
    process ran it) and its ranks' bytes summed."""
    outputs: dict[int, Any] = {replica: output for replica, (output, _) in local.items()}
    records: dict[int, ReplicaCall] = {}
    sent: dict[int, dict[str, int]] = {}
    for share in everyone:
        for replica, (done, output) in share.items():
            records.setdefault(replica, done)
            if output is not None:
                outputs.setdefault(replica, output)
            counted = sent.setdefault(replica, {})
            for phase, n in done.comm_bytes_by_phase.items():
                counted[phase] = counted.get(phase, 0) + n
    replicas = [replace(records[d], comm_bytes_by_phase=sent[d]) for d in sorted(records)]
    if len(records) == 1 and set(records) == set(local):  # one replica, this process's: its output as the pipeline gave it
        return outputs[replicas[0].replica], CallReport(replicas)
    return calls.merge([(r.images, outputs[r.replica]) for r in replicas], device), CallReport(replicas)


def _check_same_call(digests: list[dict[str, str]]) -> None:
    for rank, theirs in enumerate(digests[1:], 1):
        differs = sorted(k for k in set(theirs) | set(digests[0]) if theirs.get(k) != digests[0].get(k))
        if differs:
            raise HybridiffError(
                f"rank {rank} called the pipeline with a different {differs[0]!r} than rank 0: every rank must make "
                "the same calls, with the same prompts, generators and arguments (see docs/api.md)"
            )

