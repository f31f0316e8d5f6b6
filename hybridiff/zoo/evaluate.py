"""``hybridiff eval accuracy DIR --digits``: how often generated digits are the digit asked for.

Reads the ``report.json`` a run wrote, takes the digit each image's prompt names ("a
handwritten digit seven"), and lets the shipped classifier read the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image

from hybridiff.errors import HybridiffError
from hybridiff.zoo.classifier import classify
from hybridiff.zoo.digits import NAMES, prompt_digit


def digit_accuracy(folder: Path) -> dict[str, Any]:
    report_path = folder / "report.json"
    try:
        report = json.loads(report_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise HybridiffError(f"{report_path} is missing or not JSON; pass the -o folder of a `hybridiff run`") from None
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
