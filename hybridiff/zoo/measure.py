"""Measure a trained digit model: ``python -m hybridiff.zoo.measure NAME [--write-defaults]``.

Generates 10 images per digit (seeds 0-9) serially with the stock pipeline at the model's
default steps and guidance, then:

- accuracy: the fraction the shipped classifier reads as the digit the prompt asked for;
- the denoising-discrepancy curve of every image, its mean and 2 sigma band (a plot), and
  ``tau_cap`` = the step where the mean is lowest;
- the step the online tau1 rule picks for each image with the model's L and g_slope;
- a grid of samples (all ten digits x four seeds).

``--write-defaults`` stores the schedule (the measured ``tau_cap``; L, g_slope and k as the
paper's) in the model's card, so ``hybridiff compile`` uses it.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hybridiff import quiet_libraries
from hybridiff.compiler.schedule_defaults import DEFAULT_SCHEDULE
from hybridiff.files import write_atomic
from hybridiff.graph.trace import denoiser_attr
from hybridiff.models import CARD, TRAINED, load_pipeline, model_card
from hybridiff.program.timeline import detect_tau1
from hybridiff.runtime.execution.phases import discrepancy
from hybridiff.zoo import digits
from hybridiff.zoo.classifier import classify

DOCS = Path(__file__).parents[2] / "docs"


def _sample(name: str, seeds: int) -> tuple[list[Any], list[int], np.ndarray]:
    """(images, asked digits, discrepancy curves images x steps), one call per seed."""
    card = model_card(f"builtin:{name}")
    schedule = {**DEFAULT_SCHEDULE.model_dump(), **card.get("schedule", {})}
    pipe = load_pipeline(f"builtin:{name}")
    denoiser = getattr(pipe, denoiser_attr(pipe))
    rows: list[list[float]] = []

    def record(_module: Any, _args: Any, _kwargs: Any, out: Any) -> None:
        uncond, cond = (out[0] if isinstance(out, tuple) else out.sample).chunk(2)
        rows.append([discrepancy(u, c) for u, c in zip(uncond, cond)])

    handle = denoiser.register_forward_hook(record, with_kwargs=True)
    images, asked, curves = [], [], []
    try:
        for seed in range(seeds):
            rows.clear()
            with torch.inference_mode():
                result = pipe(
                    prompt=list(digits.PROMPTS),
                    num_inference_steps=schedule["steps"],
                    guidance_scale=schedule["guidance_scale"],
                    generator=[torch.Generator().manual_seed(seed * 10 + d) for d in range(10)],
                    **card.get("pipeline_kwargs", {}),
                )
            images += result.images
            asked += list(range(10))
            curves += np.array(rows).T.tolist()
    finally:
        handle.remove()
    return images, asked, np.array(curves)


def _plot_curve(curves: np.ndarray, tau_cap: int, name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean, std = curves.mean(0), curves.std(0)
    steps = np.arange(len(mean))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.fill_between(steps, mean - 2 * std, mean + 2 * std, alpha=0.25, label="mean +- 2 sigma")
    ax.plot(steps, mean, label=f"mean over {len(curves)} images")
    ax.axvline(tau_cap, color="0.3", ls="--", lw=1, label=f"tau_cap = {tau_cap} (argmin)")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("M = mean|eps_c - eps_u| / mean|eps_u|")
    ax.set_title(f"builtin:{name}: denoising discrepancy", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def _grid(images: list[Any], seeds: int, path: Path, scale: int = 2) -> None:
    """Rows: seeds; columns: digits 0-9."""
    size = images[0].size[0] * scale
    grid = Image.new("RGB", (10 * size, seeds * size))
    for i, image in enumerate(images[: seeds * 10]):
        grid.paste(image.resize((size, size), Image.NEAREST), ((i % 10) * size, (i // 10) * size))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())


def measure(name: str, seeds: int = 10, write_defaults: bool = False) -> dict[str, Any]:
    images, asked, curves = _sample(name, seeds)
    read = classify(images)
    correct = [a == r for a, r in zip(asked, read)]
    per_digit = {digits.NAMES[d]: float(np.mean([c for a, c in zip(asked, correct) if a == d])) for d in range(10)}
    mean = curves.mean(0)
    tau_cap = int(np.argmin(mean[1:-1]) + 1)  # the first and last steps are the ends of the U
    card = model_card(f"builtin:{name}")
    schedule = {**DEFAULT_SCHEDULE.model_dump(), **card.get("schedule", {}), "tau_cap": tau_cap}
    picked = [detect_tau1(list(c), schedule["L"], schedule["g_slope"], tau_cap) for c in curves]
    fired = [t for t, c in zip(picked, curves) if t is not None and t < tau_cap]
    _plot_curve(curves, tau_cap, name, DOCS / f"curve-{name}.png")
    _grid(images, min(4, seeds), DOCS / f"samples-{name}.png")
    result = {
        "model": f"builtin:{name}",
        "images": len(images),
        "steps": schedule["steps"],
        "guidance_scale": schedule["guidance_scale"],
        "accuracy": float(np.mean(correct)),
        "accuracy_per_digit": per_digit,
        "curve_mean": [round(float(m), 5) for m in mean],
        "curve_std": [round(float(s), 5) for s in curves.std(0)],
        "tau_cap": tau_cap,
        "U_shaped": bool(mean[0] > mean[tau_cap] < mean[-1]),
        "rule_fired_before_cap": len(fired),
        "tau1_picked": {str(t): picked.count(t) for t in sorted(set(picked), key=lambda x: (x is None, x))},
    }
    if write_defaults:  # L, g_slope and k stay the paper's; tau_cap is this model's own
        card["schedule"] = {k: schedule[k] for k in ("steps", "guidance_scale", "L", "g_slope", "tau_cap", "k")}
        card["measured"] = {k: result[k] for k in ("images", "accuracy", "tau_cap", "U_shaped", "tau1_picked")}
        write_atomic(TRAINED[name] / CARD, json.dumps(card, indent=2) + "\n")
    return result


def main() -> None:
    quiet_libraries()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=list(TRAINED))
    parser.add_argument("--seeds", type=int, default=10, help="images per digit")
    parser.add_argument("--write-defaults", action="store_true", help="store tau_cap in the model's card")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args.name, args.seeds, args.write_defaults)
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("curve")}, indent=2))


if __name__ == "__main__":
    main()
