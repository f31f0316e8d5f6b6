"""Scores of the digit models' images, judged by the shipped digit classifier.

``hybridiff eval accuracy DIR --digits``: how often generated digits are the digit asked for.
Reads the ``report.json`` a run wrote, takes the digit each image's prompt names ("a
handwritten digit seven"), and lets the shipped classifier read the image.

``hybridiff eval fid DIR --digits``: a domain FID, the Frechet distance between the
classifier's penultimate-layer features of the run's images and of the 360 held-out real
digits. It is not Inception FID: its values are comparable only with each other (and, as any
FID, only at equal image counts, since fewer images bias it upwards).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from hybridiff.errors import HybridiffError
from hybridiff.fidelity import read_report, run_images
from hybridiff.zoo.classifier import DigitClassifier, classify, load_classifier, pixels
from hybridiff.zoo.digits import NAMES, load, prompt_digit


def digit_accuracy(folder: Path) -> dict[str, Any]:
    report_path = folder / "report.json"
    report = read_report(folder)
    entries = [(e, prompt_digit(e["prompt"])) for e in report.get("images", [])]
    entries = [(e, d) for e, d in entries if d is not None]
    if not entries:
        raise HybridiffError(f"no image in {report_path} has a prompt naming a digit (e.g. 'a handwritten digit seven')")
    read = classify([Image.open(folder / e["image"]) for e, _ in entries])
    per_digit: dict[str, list[bool]] = {}
    for (_, asked), got in zip(entries, read):
        per_digit.setdefault(NAMES[asked], []).append(asked == got)
    hits = [h for v in per_digit.values() for h in v]
    return {
        "images": len(hits),
        "accuracy": sum(hits) / len(hits),
        "per_digit": {k: sum(v) / len(v) for k, v in sorted(per_digit.items(), key=lambda kv: NAMES.index(kv[0]))},
        "read": read,
    }


class DigitFeatures(nn.Module):
    """The classifier's penultimate layer (the input of its last linear layer) as FID features.

    ``num_features`` tells torchmetrics the width, so it does not probe the module with a
    299 x 299 Inception-sized image.
    """

    num_features = 64 * 4 * 4

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.features = classifier.features
        self.train(False)

    def train(self, mode: bool = True) -> DigitFeatures:
        """Stay in evaluation mode: batch norm must use its trained statistics, not the batch's."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """N x 1024 float64 features (so the FID keeps double precision) of images N x 1 x 32 x 32 in [-1, 1]."""
        return self.features(images).flatten(1).double()


def held_out_digits() -> list[Image.Image]:
    """The 360 held-out real digits as 8-bit grayscale images, like the PNGs a run writes.

    Quantising them to 8 bits lets real and generated digits take the same path to features:
    PIL image, then ``classifier.pixels``.
    """
    return _as_images(load("test")[0])


def _as_images(images: torch.Tensor) -> list[Image.Image]:
    """Digits N x 1 x 32 x 32 in [-1, 1] as 8-bit grayscale images."""
    levels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return [Image.fromarray(level) for level in levels]


@torch.inference_mode()
def frechet_digit_distance(generated: list[Image.Image], real: list[Image.Image]) -> float:
    """FID between two sets of digit images on the classifier's penultimate features."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(generated) < 2 or len(real) < 2:
        raise HybridiffError(f"FID needs at least 2 images on each side, got {len(generated)} and {len(real)}; generate more digits")
    metric = FrechetInceptionDistance(feature=DigitFeatures(load_classifier()))
    metric.update(torch.cat([pixels(im) for im in real]), real=True)
    metric.update(torch.cat([pixels(im) for im in generated]), real=False)
    return float(metric.compute())


def digit_fid(folder: Path) -> dict[str, Any]:
    """Domain FID of a run's images against the held-out real digits (not Inception FID).

    With few images the distance is dominated by the small sample, so the result also gives
    ``real_fid``: the same number of real training-split digits scored the same way, the value
    a perfect generator would get at this image count."""
    images = run_images(folder)
    real = held_out_digits()
    fid = frechet_digit_distance([Image.open(p) for p in images.values()], real)
    return {
        "images": len(images),
        "real_images": len(real),
        "fid": fid,
        "real_fid": frechet_digit_distance(_as_images(load("train")[0][: len(images)]), real),
        "features": "digit classifier penultimate layer (domain FID, not Inception FID)",
    }
