"""Plans round-trip through JSON, and broken plans are refused with one line, exit code 2."""

import json
from pathlib import Path

import pytest

from hybridiff.errors import HybridiffError
from hybridiff.graph.pipeline import trace_pipeline
from hybridiff.plan import Plan, load_plan
from tests.conftest import invoke


def test_plan_round_trips_through_json(plan, plan_path):
    assert load_plan(plan_path) == plan
    assert Plan.model_validate_json(plan.model_dump_json()) == plan


def test_plan_describes_the_hybrid_schedule(plan):
    mesh = plan.mesh
    assert (mesh.dp, mesh.cfg, mesh.pp, mesh.world_size) == (1, 2, 1, 2)  # the paper's setting, chosen by cost
    assert [mesh.branch_of(s.index) for s in plan.stages] == ["uncond", "cond"]
    assert mesh.replica_ranks(0) == (0, 1) and mesh.idle_ranks == []
    assert sum("output" in s.nodes for s in plan.stages) == 1
    assert plan.cut_tensors and all(c.consumers == [1 - c.producer] for c in plan.cut_tensors)
    assert all(c.batch_dim == 0 for c in plan.cut_tensors if c.constant is None)
    est = plan.estimates
    assert est.window_step_s < est.forward_s < est.forward_batch2_s
    assert est.speedup > 1 and est.latency_s < est.serial_latency_s
    # every 2-device mesh, and one device alone, which is slower here
    assert set(est.alternatives) == {"dp=1,cfg=2,pp=1", "dp=1,cfg=1,pp=2", "dp=1,cfg=1,pp=1"}
    assert est.alternatives["dp=1,cfg=1,pp=1"] > est.latency_s


def _broken(plan_path, tmp_path, edit):
    data = json.loads(plan_path.read_text())
    edit(data)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    return path


def _drop_stages(d):
    del d["stages"]


def _duplicate_node(d):
    d["stages"][1]["nodes"].append(d["stages"][0]["nodes"][0])


def _bad_k(d):
    d["schedule"]["k"] = -1


def _extra_field(d):
    d["mesh"]["colour"] = "blue"


def _wrong_version(d):
    d["format_version"] = 99


@pytest.mark.parametrize(
    "edit, message",
    [
        (_drop_stages, "stages: Field required"),
        (_duplicate_node, "assigned to more than one stage"),
        (_bad_k, "schedule.k"),
        (_extra_field, "mesh.colour"),
        (_wrong_version, "format_version 99"),
    ],
)
def test_malformed_plans_are_refused(plan_path, tmp_path, edit, message):
    with pytest.raises(HybridiffError, match=message):
        load_plan(_broken(plan_path, tmp_path, edit))


def _assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode", ["--emulate", None])
def test_cli_refuses_a_malformed_plan(plan_path, tmp_path, mode):
    bad = _broken(plan_path, tmp_path, _duplicate_node)
    args = ["run", str(bad), "--prompt", "x", "-o", str(tmp_path / "out")] + ([mode] if mode else [])
    _assert_one_line_error(invoke(*args), "more than one stage")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_text_that_is_not_json(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    _assert_one_line_error(invoke("run", str(bad), "--prompt", "x", "--emulate"), "is not JSON")


def test_runtime_refuses_a_plan_for_another_graph(plan_path, tmp_path):
    def other_graph(d):
        d["graph"]["fingerprint"] = "0123456789abcdef"

    bad = _broken(plan_path, tmp_path, other_graph)
    result = invoke("run", str(bad), "--prompt", "x", "-o", str(tmp_path / "out"), "--threads", "1", "--emulate")
    _assert_one_line_error(result, "does not match the model's graph")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["status"] == "failed" and "does not match" in report["error"] and not report["images"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["builtin:nope"], "unknown built-in model"),
        (["{tmp}"], "model_index.json"),
        (["builtin:tiny-sdxl", "--gpus", "0"], "Invalid value for '--gpus'"),
        (["builtin:tiny-sdxl", "--gpu", "2"], "No such option: --gpu"),
        (["builtin:tiny-sdxl", "--gpus", "2", "--mesh", "dp=2,cfg=2,pp=1"], "needs 4 devices but --gpus is 2"),
        (["builtin:tiny-sdxl", "--gpus", "2", "--mesh", "2x1"], "write it as dp=D,cfg=C,pp=P"),
        (["builtin:tiny-sdxl", "--mesh", "dp=1,cfg=2,pp=1", "--guidance-scale", "1"], "cfg=2 splits the guidance branches"),
        (["builtin:tiny-sdxl", "--gpus", "200"], "too few blocks to mesh 200 devices"),
        (["builtin:tiny-sdxl", "--strategy", "asyncdiff"], "choose from serial, cfg-parallel, pipeline, hybrid"),
    ],
)
def test_compile_refuses_unknown_models_and_meshes(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke("compile", *args, "--cost", "flops", "--repeats", "1", "-o", str(tmp_path / "p.json"))
    _assert_one_line_error(result, message)
    assert not (tmp_path / "p.json").exists()


def test_shipped_example_plans_fit_the_builtin_model(traced):
    shipped = sorted((Path(__file__).parents[1] / "plans").glob("tiny-sdxl*.json"))
    assert shipped
    for path in shipped:
        example = load_plan(path)
        assert trace_pipeline(traced.pipe, example.graph.refined).fingerprint == example.graph.fingerprint, path.name


def test_run_refuses_more_workers_than_visible_gpus_before_starting_any(plan_path, tmp_path, monkeypatch):
    import torch
    from typer.testing import CliRunner

    from hybridiff.cli import app

    monkeypatch.setenv("HYBRIDIFF_DEVICE", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = CliRunner().invoke(app, ["run", str(plan_path), "--prompt", "x", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: 2 workers on this machine but 1 visible GPU(s): NCCL needs a GPU per worker; run with --emulate, "
        "compile a plan for 1 GPU(s) (--gpus 1), or run on CPU workers with --device cpu"
    )
    assert not (tmp_path / "out").exists()


