"""Issue 24's GPU measurement: one forward of SDXL and SD3-medium at 1024², random weights from
the published configs, fp16, at 1 and 2 rows, eager, compiled (inductor) and graphed
(``reduce-overhead``, CUDA graphs: what ``--execution compiled`` runs on CUDA).

    python scripts/gpu_forwards.py [sdxl sd3-medium]    (prints a markdown table)

Each model's traced graph runs as the runtime runs it (``graph.execution``); the three modes
alternate for 20 rounds after their warm-up, medians count. Prepared for a lent GPU; it has not
run on one yet.
"""

from __future__ import annotations

import statistics
import sys
import time
from functools import partial

import torch

from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.trace import adapter_for, trace_module
from hybridiff.models.arch import build_on_device

ROUNDS, RESOLUTION = 20, 1024


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(arch: str) -> list[str]:
    model = build_on_device(arch, torch.device("cuda"), torch.float16)
    call = partial(adapter_for(model).example_call, RESOLUTION // 8)
    rows = []
    for count in (1, 2):
        traced = trace_module(model, call(count))
        names = [n.name for n in traced.graph.graph.nodes if n.op != "placeholder"]
        eager = GraphRunner(traced.graph).program(names)
        runs = {
            "eager": eager.call,
            "compiled": torch.compile(eager.module, dynamic=False),
            "graphed": GraphRunner(traced.graph, "compiled", torch.device("cuda")).program(names).call,
        }
        args = [traced.inputs.get(n.name) for n in eager.inputs]
        times: dict[str, list[float]] = {mode: [] for mode in runs}
        with torch.inference_mode():
            first = {mode: _timed(lambda f=f, a=args: [f(*a) for _ in range(3)]) for mode, f in runs.items()}
            for _ in range(ROUNDS):
                for mode, f in runs.items():
                    times[mode].append(_timed(lambda f=f, a=args: f(*a)))
        ms = {mode: statistics.median(t) * 1e3 for mode, t in times.items()}
        rows.append(
            f"| {arch} {RESOLUTION}² | {count} | {ms['eager']:.2f} | {ms['compiled']:.2f} | {ms['graphed']:.2f} | "
            f"{first['compiled']:.0f} / {first['graphed']:.0f} |"
        )
    return rows


def main(archs: list[str]) -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| model | rows | eager ms | compiled ms | graphed ms | warm-up s (compiled / graphed) |")
    print("|---|---|---|---|---|---|")
    for arch in archs or ["sdxl", "sd3-medium"]:
        for row in measure(arch):
            print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
