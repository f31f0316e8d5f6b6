"""The one check every distributed test makes: a plan run on its workers equals the same plan
emulated in one process, image for image (byte-identical PNGs) and report for report (the
per-image schedule, the discrepancy curve and the bytes sent)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hybridiff.runtime.run.requests import ImageRequest
from hybridiff.runtime.run.session import RunOptions, execute
from tests.conftest import cli

#: What must agree per image between the workers' report and the emulation's.
PER_IMAGE = ("tau1", "tau2", "phases", "discrepancy", "comm_bytes", "comm_bytes_by_phase", "replica", "call", "seed")
#: ``run`` options that change what is generated, as RunOptions fields -> command-line flags.
FLAGS = {"scheduler": "--scheduler", "window_guidance": "--window-guidance", "trace": "--trace"}


def pixels(folder: Path, index: int = 0) -> np.ndarray:
    return np.asarray(Image.open(folder / f"image-{index}.png"), dtype=np.int16)


def assert_workers_equal_emulation(
    plan_path: Path,
    tmp_path: Path,
    requests: list[ImageRequest],
    launched: Path | None = None,
    **options: Any,
) -> tuple[dict, dict]:
    """Run ``requests`` with ``hybridiff run`` on the plan's workers (or read the folder
    ``launched`` that another launcher, torchrun, wrote) and emulated in one process, with the
    same ``options``; assert they agree. Returns (workers' report, emulation's report)."""
    if launched is None:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": r.prompt, "seed": r.seed}) + "\n" for r in requests))
        flags = [part for name, value in options.items() for part in (FLAGS[name], str(value))]
        launched = tmp_path / "hybrid"
        result = cli("run", str(plan_path), "--prompts", str(prompts), "--threads", "1", "-o", str(launched), *flags)
        assert result.returncode == 0, result.stderr
    hybrid = json.loads((launched / "report.json").read_text())
    same = {name: value for name, value in options.items() if name != "trace"}  # traces are per run
    emulated = execute(
        RunOptions(plan=plan_path, requests=tuple(requests), out=tmp_path / "emulate", mode="emulate", threads=1, **same)
    )
    assert hybrid["status"] == emulated["status"] == "complete" and len(hybrid["images"]) == len(requests)
    for i, (mine, theirs) in enumerate(zip(hybrid["images"], emulated["images"])):
        assert np.array_equal(pixels(launched, i), pixels(tmp_path / "emulate", i)), f"image {i}"
        for key in PER_IMAGE:
            assert mine[key] == theirs[key], (i, key)
    return hybrid, emulated
