"""Which of a denoiser call's inputs have a row per image, and taking or repeating rows.

The rule everything shares (compiler, runtime, guidance pairing): an input has rows when it is
a tensor whose first dimension is the call's row count (the latent's). Anything else (rotary
position ids, a shared timestep, constants) belongs to every row and is passed whole.
"""

from __future__ import annotations

from typing import Any

import torch


def has_rows(value: Any, rows: int) -> bool:
    """Whether ``value`` has one entry per row of a ``rows``-row call."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


def rows_of(inputs: dict[str, Any], rows: range, total: int) -> dict[str, Any]:
    """The inputs of ``rows`` out of a call of ``total`` rows."""
    return {k: v[rows.start : rows.stop] if has_rows(v, total) else v for k, v in inputs.items()}


def repeat_rows(inputs: dict[str, Any], times: int, rows: int = 1) -> dict[str, Any]:
    """A ``rows``-row call's inputs with every row-wise tensor repeated ``times`` over."""
    return {k: torch.cat([v] * times) if has_rows(v, rows) else v for k, v in inputs.items()}


def branch_inputs(inputs: dict[str, Any], latent: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A CFG-batched call's inputs split into its (uncond, cond) halves, diffusers' row order."""
    rows = inputs[latent].shape[0]
    half = range(rows // 2)
    return rows_of(inputs, half, rows), rows_of(inputs, range(rows // 2, rows), rows)
