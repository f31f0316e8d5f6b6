"""Fidelity (PSNR, SSIM, LPIPS availability) and digit FID, on small hand-made run folders.

Expected values are computed here independently: PSNR from a known +-d pixel pattern, the
Frechet distance with numpy and scipy's sqrtm on the same classifier features.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.linalg import sqrtm
from typer.testing import CliRunner

from hybridiff.cli import app
from hybridiff.errors import HybridiffError
from hybridiff.fidelity import as_json, compare_runs
from hybridiff.zoo.classifier import load_classifier, pixels
from hybridiff.zoo.digits import NAMES, load
from hybridiff.zoo.evaluate import DigitFeatures, digit_fid, frechet_digit_distance, held_out_digits

SIZE = 32


def write_run(folder: Path, images: dict[int, np.ndarray], labels: dict[int, int] | None = None) -> Path:
    """A folder laid out as `hybridiff run -o` writes it: image-<i>.png and report.json."""
    folder.mkdir(parents=True)
    entries = []
    for i, array in images.items():
        Image.fromarray(array).convert("RGB").save(folder / f"image-{i}.png")
        digit = NAMES[labels[i]] if labels else "seven"
        entries.append({"index": i, "image": f"image-{i}.png", "prompt": f"a handwritten digit {digit}", "seed": i})
    (folder / "report.json").write_text(json.dumps({"mode": "serial", "images": entries}))
    return folder


def random_images(n: int, low: int = 0, high: int = 256, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(low, high, (SIZE, SIZE, 3), dtype=np.uint8) for i in range(n)}


def strict_json(text: str) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def real_digit_run(tmp_path_factory):
    """30 training-split digits (not in the held-out set), written as a run's RGB PNGs."""
    images, labels = load("train")
    levels = ((images[:30, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    folder = tmp_path_factory.mktemp("digits") / "run"
    return write_run(folder, dict(enumerate(levels)), dict(enumerate(labels[:30].tolist())))


@pytest.fixture(scope="module")
def real_digit_fid(real_digit_run) -> dict:
    return digit_fid(real_digit_run)


def test_identical_folders_have_infinite_psnr_and_ssim_one(tmp_path):
    images = random_images(3)
    result = compare_runs(write_run(tmp_path / "a", images), write_run(tmp_path / "b", images))
    assert result["images"] == 3 and result["identical"] == 3 and result["psnr_mean"] == math.inf
    assert all(s["psnr"] == math.inf and s["identical"] for s in result["per_image"])
    assert all(abs(s["ssim"] - 1) < 1e-6 for s in result["per_image"]) and abs(result["ssim_mean"] - 1) < 1e-6
    written = strict_json(as_json(result))
    assert written["psnr_mean"] is None and [s["psnr"] for s in written["per_image"]] == [None] * 3


def test_a_known_noise_level_gives_its_psnr(tmp_path):
    """A +-d pattern on pixels in [d, 255 - d] has MSE exactly (d / 255)^2: no clipping, no rounding.

    (torchmetrics converts to decibels with a float32 factor: 1e-6 relative is its precision.)
    """
    rng = np.random.default_rng(2)
    steps = {0: 1, 1: 4, 2: 16}
    reference = {i: rng.integers(d, 256 - d, (SIZE, SIZE, 3)).astype(np.uint8) for i, d in steps.items()}
    noisy = {i: (reference[i] + d * rng.choice([-1, 1], reference[i].shape)).astype(np.uint8) for i, d in steps.items()}
    noisy[3] = reference[3] = random_images(1, seed=3)[0]  # one identical pair: left out of the PSNR mean
    result = compare_runs(write_run(tmp_path / "run", noisy), write_run(tmp_path / "ref", reference))
    for i, d in steps.items():
        mse = np.mean(((noisy[i].astype(np.float64) - reference[i]) / 255) ** 2)
        assert mse == pytest.approx((d / 255) ** 2, rel=1e-12)
        assert result["per_image"][i]["psnr"] == pytest.approx(10 * math.log10(1 / mse), rel=1e-6)
    assert result["psnr_mean"] == pytest.approx(np.mean([20 * math.log10(255 / d) for d in steps.values()]), rel=1e-6)
    assert result["identical"] == 1 and result["per_image"][3]["psnr"] == math.inf
    ssim = [result["per_image"][i]["ssim"] for i in steps]
    assert 1 > ssim[0] > ssim[1] > ssim[2] > 0


def test_lpips_is_reported_unavailable_rather_than_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    images = random_images(2)
    result = compare_runs(write_run(tmp_path / "a", images), write_run(tmp_path / "b", images))
    assert result["lpips_mean"].startswith("unavailable: ")
    assert not (tmp_path / "empty-torch-home").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ("index", "hold different images (indices only in the run: [2], only in the reference: [1]); compare runs"),
        ("size", "image 0 is 16x16 in"),
        ("missing", "image-1.png is listed in report.json but missing"),
        ("report", "report.json is missing or not JSON"),
        ("labels", "image 0 was generated from ('a handwritten digit one', 0) (prompt, seed) in"),
    ],
)
def test_mismatched_folders_give_a_one_line_error(tmp_path, change, message):
    images = random_images(2)
    reference = write_run(tmp_path / "ref", images)
    if change == "index":
        run = write_run(tmp_path / "run", {0: images[0], 2: images[1]})
    elif change == "labels":
        run = write_run(tmp_path / "run", images, labels={0: 1, 1: 2})
    elif change == "size":
        run = write_run(tmp_path / "run", {0: images[0][:16, :16], 1: images[1]})
    else:
        run = write_run(tmp_path / "run", images)
        (run / ("image-1.png" if change == "missing" else "report.json")).unlink()
    with pytest.raises(HybridiffError) as error:
        compare_runs(run, reference)
    assert message in str(error.value) and "\n" not in str(error.value)


def frechet_by_hand(generated: np.ndarray, real: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), with numpy and scipy.

    S1 = X^T X / (n - 1) for the n centred generated features X, so S1 S2 has the nonzero
    eigenvalues of the small symmetric X S2 X^T / (n - 1): its sqrtm has the same trace and
    takes milliseconds where a 1024 x 1024 sqrtm takes seconds.
    """
    n, mu1, mu2 = len(generated), generated.mean(0), real.mean(0)
    centred, s2 = generated - mu1, np.cov(real, rowvar=False)
    trace_sqrt = np.trace(sqrtm(centred @ s2 @ centred.T / (n - 1))).real
    return float(((mu1 - mu2) ** 2).sum() + (centred**2).sum() / (n - 1) + np.trace(s2) - 2 * trace_sqrt)


def test_digit_fid_is_the_frechet_distance_of_classifier_features(real_digit_run, real_digit_fid):
    result = real_digit_fid
    assert result["images"] == 30 and result["real_images"] == 360 and "not Inception FID" in result["features"]
    classifier = load_classifier()
    generated_pixels = torch.cat([pixels(Image.open(real_digit_run / f"image-{i}.png")) for i in range(30)])
    with torch.inference_mode():
        generated = classifier.features(generated_pixels).flatten(1).double()
        real = classifier.features(torch.cat([pixels(im) for im in held_out_digits()])).flatten(1).double()
        # penultimate: the last linear layer turns these features into the classifier's logits
        assert torch.allclose(classifier.head[-1](generated.float()), classifier(generated_pixels), atol=1e-5)
        features = DigitFeatures(load_classifier())
        features.train()
        assert not features.training and torch.equal(features(generated_pixels), generated)
    assert generated.shape == (30, DigitFeatures.num_features)
    assert result["fid"] == pytest.approx(frechet_by_hand(generated.numpy(), real.numpy()), rel=1e-5)
    # the floor it reports is the same first training digits, read without the PNG round trip
    assert result["real_fid"] == pytest.approx(result["fid"], rel=1e-9)


def test_held_out_digits_are_the_test_split_in_8_bits():
    images, _ = load("test")
    ours = torch.cat([pixels(im) for im in held_out_digits()])
    assert ours.shape == images.shape and (ours - images).abs().max() <= 0.5 / 127.5 + 1e-6


def test_real_digits_score_far_below_noise():
    """The held-out digits split in two against 180 noise images (~215 vs ~5,800 when written)."""
    real = held_out_digits()
    rng = np.random.default_rng(4)
    noise = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)) for _ in range(180)]
    assert frechet_digit_distance(real[:180], real[180:]) < 0.1 * frechet_digit_distance(noise, real[180:])


def test_digit_fid_needs_two_images(tmp_path):
    with pytest.raises(HybridiffError, match="at least 2 images"):
        digit_fid(write_run(tmp_path / "run", random_images(1)))


def test_eval_commands(tmp_path, real_digit_run, real_digit_fid):
    runner = CliRunner()
    images = random_images(2)
    run, reference = write_run(tmp_path / "a", images), write_run(tmp_path / "b", images)
    text = runner.invoke(app, ["eval", "fidelity", str(run), str(reference)])
    assert text.exit_code == 0, text.output
    assert "PSNR inf: all 2 image(s) identical" in text.stdout and "LPIPS " in text.stdout
    as_json_out = runner.invoke(app, ["eval", "fidelity", str(run), str(reference), "--json"])
    assert as_json_out.exit_code == 0 and strict_json(as_json_out.stdout)["images"] == 2
    bad = runner.invoke(app, ["eval", "fidelity", str(run), str(tmp_path)])
    assert bad.exit_code == 2 and bad.stderr.startswith("error: ") and "report.json is missing" in bad.stderr
    fid = runner.invoke(app, ["eval", "fid", str(real_digit_run), "--digits", "--json"])
    assert fid.exit_code == 0 and json.loads(fid.stdout)["fid"] == pytest.approx(real_digit_fid["fid"])
    no_digits = runner.invoke(app, ["eval", "fid", str(real_digit_run)])
    assert no_digits.exit_code == 2 and "only --digits FID exists" in no_digits.stderr
    accuracy = runner.invoke(app, ["eval", "accuracy", str(real_digit_run), "--digits", "--json"])
    assert accuracy.exit_code == 0 and json.loads(accuracy.stdout)["images"] == 30
