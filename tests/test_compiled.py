"""Compiled execution (``graph.compiled``): the example DiT's own loop with every program
through torch.compile, against the eager loop, in one process and on 2 workers. The model is
tiny so inductor compiles its programs in seconds; the pipelines compile the same way."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import hybridiff
from examples.custom_dit import build, example_inputs, sample
from hybridiff.errors import HybridiffError
from hybridiff.graph.compiled import CompileCounts, cache_dir
from tests.conftest import cli
from tests.test_custom_module import EXAMPLE, TORCHRUN, WINDOWED

#: Steps of the loop that must not compile anything: the issue's 50.
LONG = 50


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build()


@pytest.fixture(scope="module")
def compiled_plan(model, tmp_path_factory) -> Path:
    """A plan costed compiled: its forwards were timed under torch.compile."""
    plan = hybridiff.compile(model, example_inputs(), gpus=2, latent="x", schedule=WINDOWED, cost="flops", execution="compiled")
    path = tmp_path_factory.mktemp("compiled") / "plan.json"
    plan.save(path)
    return path


def _loop(denoiser, steps: int) -> torch.Tensor:
    with denoiser.loop(steps=steps):
        return sample(denoiser, steps=steps)


def test_the_compiled_loop_equals_the_eager_one_and_compiles_only_in_its_first(model, compiled_plan):
    assert hybridiff.load_plan(compiled_plan).execution == "compiled"
    with hybridiff.parallelize(model, compiled_plan, emulate=True, execution="eager") as eager:
        expected = _loop(eager, LONG)
    before = CompileCounts.now()
    with hybridiff.parallelize(model, compiled_plan, emulate=True) as denoiser:  # the plan's execution
        _loop(denoiser, WINDOWED.steps)  # the warm-up: every program at its rows
        warmed = CompileCounts.now()
        out = _loop(denoiser, LONG)
        after = CompileCounts.now()
    report = denoiser.last_report
    assert (warmed - before).graphs >= 2  # the full forward and the window's program
    assert (after - warmed).graphs == 0, "the 50-step loop recompiled"
    assert report.tau1 == WINDOWED.tau_cap and "window" in report.phases
    error = ((out - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-4, f"compiled differs from eager by {error:.2e} (relative)"


def test_a_second_run_loads_the_kernels_from_hybridiffs_cache(model, compiled_plan):
    with hybridiff.parallelize(model, compiled_plan, emulate=True) as denoiser:
        _loop(denoiser, WINDOWED.steps)  # compiled and cached (again, if this test runs alone)
    torch._dynamo.reset()  # forget every compiled graph of this process, as a new process would
    before = CompileCounts.now()
    with hybridiff.parallelize(model, compiled_plan, emulate=True) as denoiser:
        _loop(denoiser, WINDOWED.steps)
    done = CompileCounts.now() - before
    assert done.graphs >= 2 and done.cache_hits == done.graphs and done.cache_misses == 0
    assert cache_dir().is_relative_to(os.environ["HYBRIDIFF_CACHE_DIR"]) and any(cache_dir().iterdir())


def test_compiled_workers_equal_the_compiled_emulation(model, compiled_plan, tmp_path):
    out = tmp_path / "workers.pt"
    env = {**os.environ, "HYBRIDIFF_TIMEOUT_S": "240", "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc-per-node", "2", EXAMPLE, "sample", str(compiled_plan), str(out), "--compiled"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"tau1={WINDOWED.tau_cap}" in result.stdout
    with hybridiff.parallelize(model, compiled_plan, emulate=True) as denoiser:
        emulated = _loop(denoiser, WINDOWED.steps)
    # Same programs, same schedule; inductor's kernels may round the last bit differently in
    # another process (measured: 4.8e-7 on values up to about 3), where eager ones agree bitwise.
    error = ((torch.load(out) - emulated).abs().max() / emulated.abs().max()).item()
    assert error < 1e-5, f"the workers differ from the emulation by {error:.2e} (relative)"


def test_an_unknown_execution_is_refused_in_one_line(model, compiled_plan, tmp_path):
    with pytest.raises(HybridiffError, match="execution 'fast' is not one of eager, compiled"):
        hybridiff.parallelize(model, compiled_plan, emulate=True, execution="fast")
    result = cli("run", str(compiled_plan), "--prompt", "x", "--execution", "fast", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.strip() == "error: --execution 'fast': use 'eager' or 'compiled'"
