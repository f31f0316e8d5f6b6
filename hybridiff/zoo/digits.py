"""The training data: scikit-learn's 1,797 bundled 8 x 8 handwritten digits, as 32 x 32 images.

Images are upscaled bilinearly, scaled to [-1, 1] and, for training, augmented with small
random affine jitter (rotation, scale, shift) so a model sees many more than 1,797 shapes.
The split into training and held-out images is fixed (stratified, seed 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PROMPTS = tuple(f"a handwritten digit {name}" for name in NAMES)


def prompt_digit(prompt: str) -> int | None:
    """The digit a prompt asks for ("... digit seven" -> 7), or None."""
    words = prompt.lower().replace(",", " ").split()
    found = [NAMES.index(w) for w in words if w in NAMES] + [int(w) for w in words if w.isdigit() and len(w) == 1]
    return found[-1] if found else None


def load(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x 1 x 32 x 32 in [-1, 1], labels N) of the ``train`` (80%) or ``test`` split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(range(len(labels)), test_size=0.2, stratify=digits.target, random_state=0)
    chosen = torch.tensor(train if split == "train" else test)
    images = F.interpolate(images[chosen], size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    return images * 2 - 1, labels[chosen]


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small rotations (+-12 deg), scales (0.9-1.1) and shifts (+-2 px), per image."""
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(12)
    scale = 0.9 + torch.rand(n, generator=generator) * 0.2
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 * 2 / IMAGE_SIZE)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images + 1, grid, align_corners=False, padding_mode="zeros") - 1


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1)
