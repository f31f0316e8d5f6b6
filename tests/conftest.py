"""Shared fixtures: the built-in tiny SDXL model, traced once, and a small test plan.

The test schedule is short (12 steps) with an early cap, so every run enters and leaves the
pipeline window; flop-counted costs make the partition reproducible from run to run.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hybridiff import quiet_libraries

quiet_libraries()
# Every run in the suite, in process or launched, computes on CPU workers, so hybrid runs and
# their emulations agree on any machine (GPU-only checks pin their device themselves).
os.environ["HYBRIDIFF_DEVICE"] = "cpu"
# Compiled kernels of the suite go to a cache of its own, empty at the start of every run, so
# the compiled tests see a cold cache first wherever they run (and users' caches stay untouched).
os.environ["HYBRIDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="hybridiff-test-cache-")
atexit.register(shutil.rmtree, os.environ["HYBRIDIFF_CACHE_DIR"], ignore_errors=True)

from hybridiff.compiler.entries import compile_model  # noqa: E402
from hybridiff.graph.pipeline import TracedModel, trace_pipeline  # noqa: E402
from hybridiff.graph.trace import capture_denoiser_calls  # noqa: E402
from hybridiff.models import load_pipeline  # noqa: E402
from hybridiff.plan import Plan, Schedule  # noqa: E402

MODEL = "builtin:tiny-sdxl"
TEST_SCHEDULE = Schedule(steps=12, guidance_scale=5.0, L=3, g_slope=4e-4, tau_cap=6, k=3)
HYBRIDIFF = str(Path(sys.executable).parent / "hybridiff")


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def traced() -> TracedModel:
    return trace_pipeline(load_pipeline(MODEL))


@pytest.fixture(scope="session")
def unet_call(traced: TracedModel) -> tuple[tuple, dict]:
    """The arguments the stock pipeline passes to its UNet (CFG batch of 2)."""
    return capture_denoiser_calls(traced.pipe, 128, 128, guidance_scale=5.0)[0]


@pytest.fixture(scope="session")
def plan() -> Plan:
    return compile_model(MODEL, schedule=TEST_SCHEDULE, repeats=2, threads=1, cost="flops")


@pytest.fixture(scope="session")
def plan_traced(traced: TracedModel, plan: Plan) -> TracedModel:
    """The built-in model traced with the blocks the test plan opened."""
    return trace_pipeline(traced.pipe, plan.graph.refined)


@pytest.fixture(scope="session")
def plans_by_devices(plan: Plan) -> dict[int, Plan]:
    """Test plans for 2, 4 and 8 devices (4 and 8: 2 branch groups of 2 and 4 ranks)."""
    more = {n: compile_model(MODEL, gpus=n, schedule=TEST_SCHEDULE, repeats=1, threads=1, cost="flops") for n in (4, 8)}
    return {2: plan, **more}


@pytest.fixture(scope="session")
def plan_path(plan: Plan, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan.save(path)
    return path


def invoke(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a ``hybridiff`` command in this process, for what ends before any worker starts: a
    second faster than ``cli`` (no interpreter start-up), with the same result fields."""
    from typer.testing import CliRunner

    from hybridiff.cli import app

    result = CliRunner().invoke(app, list(args), env=env)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``hybridiff`` console script as a user would."""
    env = {**os.environ, "HYBRIDIFF_TIMEOUT_S": "120"}
    return subprocess.run([HYBRIDIFF, *args], capture_output=True, text=True, timeout=timeout, env=env)
