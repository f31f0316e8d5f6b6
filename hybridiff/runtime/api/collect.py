"""What a call did, per replica, and how the replicas' outputs and bytes come together."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from hybridiff.runtime.api import calls
from hybridiff.runtime.execution.denoiser import ReplicaCall


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


def merge_local(results: dict[int, tuple[Any, ReplicaCall]], device: torch.device) -> tuple[Any, CallReport]:
    """The call's output and report from every replica's, run in this process."""
    report = CallReport([done for _, done in results.values()])
    if len(results) == 1:
        return next(iter(results.values()))[0], report
    return calls.merge([(done.images, out) for out, done in results.values()], device), report


def merge_shares(everyone: list[dict], local: dict[int, tuple[Any, Any]], device: torch.device) -> tuple[Any, CallReport]:
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
