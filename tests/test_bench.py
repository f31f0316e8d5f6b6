"""``hybridiff bench MODEL``: strategies compiled, run and scored side by side in one command.

Times here are never asserted (the machine is shared); what a user relies on is: every
strategy ran, each on its own plan, its images scored against serial's, and the files exist.
"""

import json

import pytest
from PIL import Image

from tests.conftest import cli, invoke


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    prompts = out / "prompts.txt"
    prompts.write_text("a handwritten digit three\na handwritten digit seven\n")
    result = cli(
        "bench", "builtin:digits-sd3", "--steps", "8", "--strategies", "pipeline,hybrid", "--k", "4",
        "--warmup", "2", "--tau-cap", "2", "--prompts", str(prompts), "--rounds", "1", "--no-calibrate", "--plot", "-o", str(out / "run"),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return out / "run", result.stdout


def test_bench_runs_every_strategy_on_its_own_plan(bench):
    out, table = bench
    result = json.loads((out / "bench.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in bench.json"))
    labels = [e["label"] for e in result["entries"]]
    assert labels == ["serial", "pipeline", "hybrid"]
    assert [type(b) for b in result["background_busy_cores"]] == [float]  # measured before its one round
    by = {e["label"]: e for e in result["entries"]}
    assert by["serial"]["mesh"] == "1 device" and by["pipeline"]["mesh"] == "dp=1,cfg=1,pp=2"
    assert by["hybrid"]["mesh"] == "dp=1,cfg=2,pp=1" and by["hybrid"]["k"] == 4
    for entry in result["entries"]:
        plan = json.loads((out / entry["folder"].split("/")[-1] / "plan.json").read_text())
        assert plan["strategy"] == entry["strategy"]
        report = json.loads((out / entry["folder"].split("/")[-1] / "report.json").read_text())
        assert [i["prompt"] for i in report["images"]] == ["a handwritten digit three", "a handwritten digit seven"]
    # the pipeline runs from its fixed warm-up to the last step; hybrid's window is k steps
    pipeline = json.loads((out / "pipeline" / "report.json").read_text())["images"][0]
    assert pipeline["phases"] == ["warm-up"] * 2 + ["window"] * 6
    hybrid = json.loads((out / "hybrid" / "report.json").read_text())["images"][0]
    assert hybrid["phases"].count("window") == 4
    for label in labels:
        assert f"| {label} |" in table


def test_bench_scores_every_strategy_against_serial(bench):
    out, _ = bench
    by = {e["label"]: e for e in json.loads((out / "bench.json").read_text())["entries"]}
    serial = by["serial"]
    assert serial["psnr"] is None and serial["identical_images"] == 2 and serial["ssim"] == pytest.approx(1.0)
    for label in ("pipeline", "hybrid"):
        assert by[label]["identical_images"] < 2 and 10 < by[label]["psnr"] < 100 and by[label]["ssim"] < 1
        assert 0 <= by[label]["digit_accuracy"] <= 1 and by[label]["digit_fid"] > 0
    # cut tensors move on window steps only: 6 for the pipeline, 4 for hybrid, none serially
    sent = [by[label]["comm_bytes_per_image"] for label in ("pipeline", "hybrid", "serial")]
    assert sent[0] > sent[1] > sent[2] == 0


def test_bench_draws_the_plot_and_the_image_grid(bench):
    out, _ = bench
    assert Image.open(out / "speed-quality.png").size[0] > 300
    grid = Image.open(out / "images.png")
    cell = Image.open(out / "serial" / "image-0.png").size[0]
    assert grid.size == (3 * cell + 2 * 2, 2 * cell + 2)  # a column per entry, a row per image


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategies", "serial,asyncdiff"], "choose from serial, cfg-parallel, pipeline, hybrid"),
        (["--k", "5,x"], "--k '5,x': give window lengths as integers"),
        (["--peers", "xdit"], "unknown ['xdit']; choose from diffusers-ulysses"),
    ],
)
def test_bench_refuses_bad_options_in_one_line(tmp_path, args, message):
    result = invoke("bench", "builtin:digits-sd3", *args, "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bench_refuses_the_diffusers_peer_for_a_model_diffusers_cannot_split(tmp_path, plan_path):
    result = invoke("bench", str(plan_path), "--peers", "diffusers-ulysses", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "no plan for unet models; the peer runs flux, qwen-image, wan" in result.stderr


def test_bench_runs_diffusers_context_parallelism_as_a_peer(tmp_path):
    """diffusers' own Ulysses on the same 2 workers (its text padded to an even length under
    the mask): its images are the stock pipeline's up to rounding, its all-to-all bytes are
    counted, and it has no prediction (the simulator does not model it)."""
    plan = tmp_path / "plan.json"
    compiled = invoke("compile", "builtin:tiny-qwen-image", "--gpus", "2", "--steps", "4", "--cost", "flops", "-o", str(plan))
    assert compiled.returncode == 0, compiled.stderr
    result = cli("bench", str(plan), "--peers", "diffusers-ulysses", "--rounds", "1", "-o", str(tmp_path / "out"), timeout=600)
    assert result.returncode == 0, result.stderr
    by = {e["label"]: e for e in json.loads((tmp_path / "out" / "bench.json").read_text())["entries"]}
    peer = by["diffusers-ulysses"]
    assert peer["mesh"] == "diffusers ulysses=2" and peer["predicted_speedup"] is None and peer["bound"] is None
    assert peer["psnr"] is None or peer["psnr"] > 60
    # each attention moves q, k, v and its output all-to-all: far more than hybrid's cut tensors
    assert peer["comm_bytes_per_image"] > by["hybrid"]["comm_bytes_per_image"] > 0
    assert "| diffusers-ulysses | - | - | diffusers ulysses=2 |" in result.stdout
