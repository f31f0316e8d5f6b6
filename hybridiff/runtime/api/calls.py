"""One stock pipeline call, seen from a mesh: how many images it asks for, each replica's
share of them as a call of its own, the replicas' outputs put back in order, and a digest
that tells whether every rank made the same call.

A call's ``N = prompts x num_images_per_prompt`` images go round-robin over the plan's
replicas (image ``i`` to replica ``i % dp``, as ``Mesh.replica_images`` shares a run's images
out), and each replica makes one call of the stock pipeline with its images. Arguments given
per prompt (prompt lists, prompt embeddings) or per image (a generator list, ``latents``) are
cut to the replica's images; everything else is passed on unchanged. With one replica the
call is passed on exactly as the user wrote it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import numpy as np
import torch
from PIL import Image

from hybridiff.errors import HybridiffError

#: Arguments with one entry per prompt (a string stands for every prompt).
PER_PROMPT = (
    "prompt", "prompt_2", "prompt_3", "negative_prompt", "negative_prompt_2", "negative_prompt_3",
    "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
)
#: Arguments with one entry per image.
PER_IMAGE = ("generator", "latents")


def _entries(value: Any) -> int | None:
    if isinstance(value, str):
        return 1
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, torch.Tensor) and value.dim():
        return value.shape[0]
    return None


def image_count(kwargs: dict[str, Any]) -> tuple[int, int]:
    """(images, images per prompt) a call with ``kwargs`` generates."""
    per_prompt = kwargs.get("num_images_per_prompt") or 1
    prompts = _entries(kwargs.get("prompt"))
    if prompts is None:
        prompts = _entries(kwargs.get("prompt_embeds"))
    if not prompts:
        raise HybridiffError("the call has no prompt: pass prompt=TEXT, a list of prompts, or prompt_embeds")
    return prompts * per_prompt, per_prompt


def replica_images(images: int, replicas: int) -> list[list[int]]:
    """The call's image indices each replica generates."""
    return [list(range(d, images, replicas)) for d in range(replicas)]


def check_arguments(kwargs: dict[str, Any], images: int) -> None:
    """Refuse the argument mistakes a stock pipeline finds only mid-call (at the first step's
    end) or deep inside its scheduler, here, before any rank starts the call."""
    callback = kwargs.get("callback_on_step_end")
    if callback is not None and not callable(callback):
        raise HybridiffError(
            f"callback_on_step_end is a {type(callback).__name__}, which cannot be called: pass a function "
            "(pipe, step, timestep, callback_kwargs) -> callback_kwargs, or a diffusers PipelineCallback"
        )
    generator = kwargs.get("generator")
    if isinstance(generator, list) and len(generator) != images:
        raise HybridiffError(
            f"generator is a list of {len(generator)} but the call makes {images} image(s): "
            "pass one generator per image, or a single generator"
        )
    for key in ("timesteps", "sigmas"):
        value = kwargs.get(key)
        if value is None:
            continue
        try:
            shape = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64).shape
        except (TypeError, ValueError):
            shape = None
        if shape is None or len(shape) != 1 or not shape[0]:
            raise HybridiffError(
                f"{key} must be one list of numbers, one per step (e.g. {key}=[999, 749, 499, 249]); "
                f"got {'shape ' + str(shape) if shape is not None else type(value).__name__}"
            )


def split(kwargs: dict[str, Any], images: list[int], per_prompt: int, total: int) -> dict[str, Any]:
    """The arguments of one replica's call generating ``images`` (indices into the call's
    ``total`` images, ``per_prompt`` per prompt)."""
    prompts = [i // per_prompt for i in images]
    out = {**kwargs, "num_images_per_prompt": 1}
    for key, value in kwargs.items():
        if key in PER_PROMPT and value is not None:
            out[key] = _pick([value] * (total // per_prompt) if isinstance(value, str) else value, prompts, key)
        elif key in PER_IMAGE and value is not None:
            if not isinstance(value, (list, torch.Tensor)):
                raise HybridiffError(
                    f"{key}: the plan's replicas generate a call's images apart, so one {key} cannot be shared "
                    f"among them; pass one per image (generator=[torch.Generator().manual_seed(s) for s in seeds])"
                )
            out[key] = _pick(value, images, key)
        elif isinstance(value, torch.Tensor):
            raise HybridiffError(
                f"{key}: hybridiff cannot tell which rows of this tensor belong to which image, so it cannot share "
                "the call among the plan's replicas; use a plan with one replica (dp=1) for such calls"
            )
    return out


def _pick(value: Any, rows: list[int], key: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows]
    if isinstance(value, (list, tuple)):
        if max(rows) >= len(value):
            raise HybridiffError(f"{key} has {len(value)} entries, fewer than the call's images need")
        return [value[r] for r in rows]
    return value


def merge(outputs: list[tuple[list[int], Any]], device: torch.device) -> Any:
    """One pipeline output from the replicas' ``(images, output)``, images in call order."""
    order = [i for images, _ in outputs for i in images]
    position = {image: p for p, image in enumerate(order)}
    back = [position[i] for i in range(len(order))]
    first = outputs[0][1]
    fields = {}
    for f in dataclasses.fields(first):
        parts = [getattr(out, f.name) for _, out in outputs]
        fields[f.name] = _concat(parts, back, device)
    return type(first)(**fields)


def _concat(parts: list[Any], back: list[int], device: torch.device) -> Any:
    if any(p is None for p in parts):
        return None
    if isinstance(parts[0], torch.Tensor):
        return torch.cat([p.to(device) for p in parts])[back]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)[back]
    if isinstance(parts[0], list):
        flat = [x for p in parts for x in p]
        return [flat[b] for b in back]
    return parts[0]


def portable(output: Any) -> Any:
    """``output`` with its tensors on the CPU, to hand to another process."""
    moved = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    return type(output)(**{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def digest(kwargs: dict[str, Any]) -> dict[str, str]:
    """A short fingerprint per argument: tensors and generators by content and state, so ranks
    that were given different seeds, latents or prompts are told apart."""
    return {key: hashlib.sha1(_describe(value).encode()).hexdigest()[:12] for key, value in sorted(kwargs.items())}


#: A default ``repr``'s memory address: differs between processes for equal objects.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _describe(value: Any) -> str:
    """What ``value`` is, the same text on every rank for equal values: contents of tensors,
    arrays and images (ControlNet and image-to-image inputs), generators' states, containers
    element by element, everything else by its ``repr`` without memory addresses."""
    if isinstance(value, torch.Tensor):
        data = value.detach().cpu().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8).numpy()
        return f"tensor{tuple(value.shape)}{value.dtype}:{hashlib.sha1(data.tobytes()).hexdigest()}"
    if isinstance(value, torch.Generator):
        return f"generator:{_describe(value.get_state())}"
    if isinstance(value, np.ndarray):
        return f"array{value.shape}{value.dtype}:{hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()}"
    if isinstance(value, Image.Image):
        return f"image{value.mode}{value.size}:{hashlib.sha1(value.tobytes()).hexdigest()}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_describe(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_describe(v)}" for k, v in sorted(value.items(), key=lambda kv: repr(kv[0]))) + "}"
    if callable(value):
        return f"callable:{getattr(value, '__qualname__', type(value).__qualname__)}"
    return _ADDRESS.sub("", repr(value))
