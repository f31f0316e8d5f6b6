"""What to generate: one prompt from the command line, or a prompts file, times K images each.

A prompts file is either plain text (one prompt per non-empty line) or JSON Lines, each line an
object with ``prompt`` and optionally ``negative_prompt`` and ``seed``. Image ``j`` of a prompt
with seed ``s`` uses seed ``s + j``; images are numbered in input order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hybridiff.errors import HybridiffError


@dataclass(frozen=True)
class ImageRequest:
    prompt: str
    negative_prompt: str | None
    seed: int


def read_prompts(path: Path, seed: int, negative_prompt: str | None) -> list[ImageRequest]:
    """The prompts in ``path``, with ``seed``/``negative_prompt`` where a line gives none."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise HybridiffError(f"cannot read prompts file {path}: {e.strerror}") from None
    requests = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        if not text.startswith("{"):
            requests.append(ImageRequest(text, negative_prompt, seed))
            continue
        try:
            entry = json.loads(text)
        except json.JSONDecodeError as e:
            raise HybridiffError(f"{path}:{number}: not a JSON object ({e.msg}); write one per line or plain prompts") from None
        unknown = set(entry) - {"prompt", "negative_prompt", "seed"}
        if not isinstance(entry.get("prompt"), str) or unknown:
            raise HybridiffError(
                f"{path}:{number}: a JSONL line needs a string 'prompt' and may have 'negative_prompt' and 'seed'"
                + (f"; unknown keys {sorted(unknown)}" if unknown else "")
            )
        if "seed" in entry and not isinstance(entry["seed"], int):
            raise HybridiffError(f"{path}:{number}: 'seed' must be an integer")
        requests.append(ImageRequest(entry["prompt"], entry.get("negative_prompt", negative_prompt), entry.get("seed", seed)))
    if not requests:
        raise HybridiffError(f"prompts file {path} has no prompts")
    return requests


def expand(prompts: list[ImageRequest], images_per_prompt: int) -> list[ImageRequest]:
    """Each prompt ``images_per_prompt`` times, seeds counting up from the prompt's seed."""
    return [ImageRequest(p.prompt, p.negative_prompt, p.seed + j) for p in prompts for j in range(images_per_prompt)]
