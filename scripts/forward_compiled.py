"""One forward of each built-in model, eager against compiled (torch.compile), at 1 and 2 rows.

    python scripts/forward_compiled.py [builtin:digits-sdxl builtin:digits-sd3 ...]

Each model's traced denoiser graph runs as the runtime runs it (``graph.execution``), on one
thread, from the inputs of a guided pipeline step: the conditional row alone, and the CFG batch
of two. Eager and compiled forwards alternate in rounds, so drift of the machine's speed falls
on both; the median of each counts. Compile time is the first compiled call of each shape (a
warm cache makes it short). Prints a markdown table for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from hybridiff import quiet_libraries
from hybridiff.compiler.entries import guided_inputs
from hybridiff.graph.execution import GraphRunner
from hybridiff.graph.pipeline import default_image_size, example_call, trace_pipeline
from hybridiff.graph.rows import branch_inputs
from hybridiff.models import load_pipeline, model_card, resolve_source

ROUNDS, MODELS = 15, ("builtin:digits-sdxl", "builtin:digits-sd3", "builtin:tiny-sdxl", "builtin:tiny-flux")


def measure(model: str) -> list[str]:
    source = resolve_source(model)
    pipe = load_pipeline(source, "float32", torch.device("cpu"))
    size, kwargs = default_image_size(pipe), model_card(source).get("pipeline_kwargs", {})
    traced = trace_pipeline(pipe, call=lambda: example_call(pipe, size, size, **kwargs))
    both = guided_inputs(traced, size, size, kwargs)
    _, cond = branch_inputs(both, traced.adapter.latent)
    names = [n.name for n in traced.graph.graph.nodes if n.op != "placeholder"]
    rows = []
    for count, inputs in ((1, cond), (2, both)):
        runners = {mode: GraphRunner(traced.graph, mode) for mode in ("eager", "compiled")}
        programs = {mode: r.program(names) for mode, r in runners.items()}
        start = time.perf_counter()
        with torch.inference_mode():
            compiled_out = runners["compiled"].run(programs["compiled"], inputs)["output"]
            compile_s = time.perf_counter() - start
            eager_out = runners["eager"].run(programs["eager"], inputs)["output"]
            error = ((compiled_out - eager_out).abs().max() / eager_out.abs().max()).item()
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            for _ in range(ROUNDS):
                for mode in times:
                    began = time.perf_counter()
                    runners[mode].run(programs[mode], inputs)
                    times[mode].append(time.perf_counter() - began)
        eager, compiled = (statistics.median(times[m]) * 1e3 for m in ("eager", "compiled"))
        rows.append(
            f"| {model} {size}² | {count} | {eager:.2f} | {compiled:.2f} | {eager / compiled:.2f}x | {compile_s:.1f} | {error:.1e} |"
        )
    return rows


def main(models: list[str]) -> None:
    quiet_libraries()
    torch.set_num_threads(1)
    print("| model | rows | eager ms | compiled ms | compiled speed-up | first compiled call s | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for model in models or MODELS:
        for row in measure(model):
            print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
