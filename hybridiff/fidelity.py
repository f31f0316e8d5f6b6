"""``hybridiff eval fidelity RUN REFERENCE``: how far a run's images are from a reference run's.

A hybrid run should reproduce the serial run of the same prompts and seeds up to the
approximation its pipeline window makes; these scores measure the gap image by image (matched
by ``index`` in each folder's ``report.json``). PSNR and SSIM come from torchmetrics, on RGB
pixels scaled to [0, 1]. LPIPS needs torchvision and its AlexNet checkpoint in the torch hub
cache; nothing is ever downloaded, so without them LPIPS reads ``"unavailable: <reason>"``.

Identical images have an infinite PSNR, kept as ``float('inf')`` in the result. ``psnr_mean``
averages the images that differ (``inf`` when none do) and ``identical`` counts the others, so
one identical pair neither hides nor swamps the rest. :func:`as_json` writes every infinite
PSNR as ``null`` (the ``identical`` fields say why), so the output stays strict JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hybridiff.errors import HybridiffError
from hybridiff.files import strict_json


def read_report(folder: Path) -> dict[str, Any]:
    """The ``report.json`` of a ``hybridiff run`` output folder."""
    report_path = folder / "report.json"
    try:
        return json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise HybridiffError(f"{report_path} is missing or not JSON; pass the -o folder of a `hybridiff run`") from None


def run_images(folder: Path) -> dict[int, Path]:
    """Each image file of a run folder by its ``index``; every listed file must exist."""
    try:
        images = {int(e["index"]): folder / e["image"] for e in read_report(folder).get("images", [])}
    except (KeyError, TypeError, ValueError):
        raise HybridiffError(f"{folder / 'report.json'}: every entry of 'images' needs an index and an image file name") from None
    if not images:
        raise HybridiffError(f"{folder / 'report.json'} lists no images; pass the -o folder of a `hybridiff run` that finished")
    missing = [str(p) for p in images.values() if not p.is_file()]
    if missing:
        raise HybridiffError(f"{missing[0]} is listed in report.json but missing ({len(missing)} missing); rerun into {folder}")
    return images


def _pairs(run: Path, reference: Path) -> list[tuple[int, Path, Path]]:
    """(index, run image, reference image) for every index; both folders must list the same ones."""
    ours, theirs = run_images(run), run_images(reference)
    if ours.keys() != theirs.keys():
        only_run, only_ref = _few(ours.keys() - theirs.keys()), _few(theirs.keys() - ours.keys())
        raise HybridiffError(
            f"{run} and {reference} hold different images (indices only in the run: {only_run}, only in the "
            f"reference: {only_ref}); compare runs of the same prompts and seeds"
        )
    _same_requests(run, reference)
    return [(i, ours[i], theirs[i]) for i in sorted(ours)]


def _same_requests(run: Path, reference: Path) -> None:
    """Images are compared by index: both runs must have asked for the same prompt and seed."""
    asked = [{e["index"]: (e.get("prompt"), e.get("seed")) for e in read_report(f)["images"]} for f in (run, reference)]
    differ = sorted(i for i in asked[0] if asked[0][i] != asked[1][i])
    if differ:
        i = differ[0]
        raise HybridiffError(
            f"image {i} was generated from {asked[0][i]} (prompt, seed) in {run} but {asked[1][i]} in {reference} "
            f"({len(differ)} image(s) differ); compare runs of the same prompts and seeds"
        )


def _few(indices: set[int], shown: int = 5) -> str:
    """Indices for a one-line message: the first few, then how many in all."""
    ordered = sorted(indices)
    return str(ordered) if len(ordered) <= shown else f"[{', '.join(map(str, ordered[:shown]))}, ... ({len(ordered)} in all)]"


def _pixels(path: Path) -> torch.Tensor:
    """An image file as a 1 x 3 x H x W float64 tensor in [0, 1] (any mode is read as RGB)."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1)[None]


def _load_pair(index: int, ours: Path, theirs: Path) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _pixels(ours), _pixels(theirs)
    if a.shape != b.shape:
        raise HybridiffError(
            f"image {index} is {a.shape[3]}x{a.shape[2]} in {ours.parent} but {b.shape[3]}x{b.shape[2]} in "
            f"{theirs.parent}; compare runs whose plans have the same image size"
        )
    return a, b


def _scores(index: int, a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    identical = bool(torch.equal(a, b))
    psnr = math.inf if identical else float(peak_signal_noise_ratio(a, b, data_range=1.0))
    ssim = float(structural_similarity_index_measure(a, b, data_range=1.0))
    return {"index": index, "psnr": psnr, "ssim": ssim, "identical": identical}


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot run here without a download, or None when its weights are installed.

    torchmetrics ships LPIPS's linear layers but takes the AlexNet backbone from torchvision,
    which would download it on first use: only a checkpoint already in the hub cache counts.
    """
    if importlib.util.find_spec("torchvision") is None:
        return "torchvision is not installed"
    from torchvision.models import AlexNet_Weights

    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / Path(AlexNet_Weights.DEFAULT.url).name
    if not checkpoint.is_file():
        return f"no AlexNet checkpoint at {checkpoint} (LPIPS never downloads)"
    return None


def _lpips(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """LPIPS (AlexNet) of each pair; call only when :func:`lpips_unavailable` is None."""
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    with torch.inference_mode():
        return [float(metric(a.float(), b.float())) for a, b in pairs]


def compare_runs(run: Path, reference: Path) -> dict[str, Any]:
    """PSNR, SSIM (and LPIPS where installed) of each image of ``run`` against ``reference``."""
    pairs = [(i, *_load_pair(i, ours, theirs)) for i, ours, theirs in _pairs(run, reference)]
    per_image = [_scores(i, a, b) for i, a, b in pairs]
    differing = [s["psnr"] for s in per_image if not s["identical"]]
    result: dict[str, Any] = {
        "images": len(per_image),
        "identical": len(per_image) - len(differing),
        "psnr_mean": sum(differing) / len(differing) if differing else math.inf,
        "ssim_mean": sum(s["ssim"] for s in per_image) / len(per_image),
    }
    reason = lpips_unavailable()
    if reason is None:
        for score, value in zip(per_image, _lpips([(a, b) for _, a, b in pairs])):
            score["lpips"] = value
        result["lpips_mean"] = sum(s["lpips"] for s in per_image) / len(per_image)
    else:
        result["lpips_mean"] = f"unavailable: {reason}"
    return {**result, "per_image": per_image}


def as_json(result: dict[str, Any]) -> str:
    """``compare_runs``'s result as strict JSON: an infinite PSNR becomes ``null``."""
    return strict_json(result)
