"""Every supported sampler runs the hybrid schedule exactly like its emulation.

Euler ancestral draws fresh noise every step and DPM-Solver++ keeps a history of predictions:
both stay identical on every rank only if every rank steps the same scheduler with the same
generator, which equality with the single-process emulation shows.
"""

import pytest

from hybridiff.compiler.entries import compile_model
from hybridiff.runtime.run.requests import ImageRequest
from tests.conftest import TEST_SCHEDULE, invoke
from tests.equivalence import assert_workers_equal_emulation


@pytest.fixture(scope="module")
def sd3_plan_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd3") / "plan.json"
    compile_model("builtin:tiny-sd3", schedule=TEST_SCHEDULE, repeats=1, threads=1, cost="flops").save(path)
    return path


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler-a", "dpm++", "flow-euler"])
def test_each_scheduler_runs_distributed_like_its_emulation(scheduler, plan_path, sd3_plan_path, tmp_path):
    path = sd3_plan_path if scheduler == "flow-euler" else plan_path
    report, _ = assert_workers_equal_emulation(path, tmp_path, [ImageRequest("a red cube", None, 5)], scheduler=scheduler)
    assert report["scheduler"] == scheduler and "window" in report["images"][0]["phases"]


def test_a_sampler_of_the_wrong_family_is_refused_in_one_line(plan_path, tmp_path):
    result = invoke("run", str(plan_path), "--prompt", "x", "--scheduler", "flow-euler", "--emulate", "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --scheduler 'flow-euler' does not fit this noise-prediction model; use one of ddim, euler, euler-a, dpm++"
    ]
