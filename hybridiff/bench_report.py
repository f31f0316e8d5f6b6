"""What ``hybridiff bench`` shows: the strategy table, the per-step breakdown and the plots."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from hybridiff.files import write_atomic
from hybridiff.images import save_grid
from hybridiff.runtime.spans import CATEGORIES


def render(result: dict[str, Any], workers: int, breakdown: bool = True) -> str:
    """The side-by-side table (markdown), the per-step breakdown and a one-line summary."""
    entries = result["entries"]
    digits = "digit_accuracy" in entries[0]
    others = [label for label in entries[0]["speedups"] if label != entries[0]["speedup_vs"]]  # serial compiled
    head = (
        f"| strategy | k | tau1 | mesh | latency s (median call) | denoise s | speed-up vs {entries[0]['speedup_vs']} | "
        + "".join(f"vs {label} | " for label in others)
        + "predicted (error) | bound | of bound | images/s | MB sent / image | PSNR dB | SSIM |"
    )
    head += " digit acc | digit FID |" if digits else ""
    floor = f"; digit FID of {result['images']} real digits: {entries[0]['digit_fid_real']:.1f}" if digits else ""
    lines = [
        f"{result['images']} image(s), {result['steps']} steps, {workers} workers x {result['threads']} thread(s); "
        f"speed-up and PSNR/SSIM against serial (the stock pipeline on one worker); predictions against the serial "
        f"entry run alike (eager or compiled){floor}",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for e in entries:
        row = (
            f"| {e['label']} | {_dash(e['k'])} | {_dash(e['tau1'])} | {e['mesh']} | {e['latency_s']:.3f} | {e['denoise_s']:.3f} | "
            f"{e['speedup']:.2f}x | " + "".join(f"{e['speedups'][label]:.2f}x | " for label in others)
            + f"{_predicted(e)} | {_dash(e['bound'], '{:.2f}x')} | "
            f"{_dash(e['of_bound'], '{:.0%}')} | {e['images_per_s']:.2f} | {e['comm_bytes_per_image'] / 1e6:.3f} | "
            f"{_db(e['psnr'])} | {e['ssim']:.4f} |"
        )
        if digits:
            row += f" {e['digit_accuracy']:.2f} | {e['digit_fid']:.2f} |"
        lines.append(row)
    if breakdown:
        lines += ["", *_breakdown(entries)]
    return "\n".join(lines + ["", _summary(entries, workers)])


def _dash(value: float | None, form: str = "{}") -> str:
    return "-" if value is None else form.format(value)


def _predicted(entry: dict[str, Any]) -> str:
    """The predicted speed-up and its error; a dash for a peer the simulator does not model."""
    if entry["predicted_speedup"] is None:
        return "-"
    return f"{entry['predicted_speedup']:.2f}x ({entry['speedup_error']:+.1%})"


def _db(psnr: float | None) -> str:
    return "identical" if psnr is None else f"{psnr:.2f}"


def _breakdown(entries: list[dict[str, Any]]) -> list[str]:
    """Per rank and phase, the median step cut into what it spent (``--trace`` categories)."""
    lines = [
        "per-step breakdown, ms (each category: median step; totals: median and mean step)",
        f"| run | rank | phase | steps | {' | '.join(CATEGORIES)} | total median | total mean |",
        "|---|---|---|---|" + "---|" * (len(CATEGORIES) + 2),
    ]
    for e in entries:
        for rank, phases in e["profile_ms"].items():
            for phase, stats in phases.items():
                cells = " | ".join(f"{stats['median'][c]:.2f}" for c in CATEGORIES)
                lines.append(
                    f"| {e['label']} | {rank} | {phase} | {stats['steps']} | {cells} | "
                    f"{stats['median']['total']:.2f} | {stats['mean']['total']:.2f} |"
                )
    return lines


def _summary(entries: list[dict[str, Any]], workers: int) -> str:
    """One line: serial against the fastest other entry."""
    serial = entries[0]
    best = max((e for e in entries if e["strategy"] != "serial"), key=lambda e: e["speedup"])
    others = "".join(f", {best['speedups'][label]:.2f}x vs {label}" for label in best["speedups"] if label != serial["label"])
    return (
        f"serial {serial['denoise_s']:.3f} s | {best['label']} {best['denoise_s']:.3f} s on {workers} workers | "
        f"speed-up {best['speedup']:.2f}x{others} (the plan predicted {_predicted(best)})"
    )


def plot_speed_quality(result: dict[str, Any], path: Path, title: str) -> None:
    """Speed-up against PSNR vs serial, one labelled point per entry (serial left out: its PSNR
    is infinite by definition)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [e for e in result["entries"] if e["psnr"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in points:
        ax.scatter(e["speedup"], e["psnr"], s=30)
        ax.annotate(e["label"], (e["speedup"], e["psnr"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("measured speed-up vs serial")
    ax.set_ylabel("PSNR vs serial, dB (higher: closer)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def image_grid(result: dict[str, Any], path: Path) -> None:
    """Every entry's images side by side: a row per image (prompt), a column per strategy."""
    entries = result["entries"]
    paths = [Path(e["folder"]) / f"image-{i}.png" for i in range(result["images"]) for e in entries]
    save_grid(paths, path, columns=len(entries))
