"""A small CNN that reads a 32 x 32 digit: the judge of generated images.

Trained by ``python -m hybridiff.zoo.train classifier`` on the training split (augmented) and
shipped as safetensors; its held-out accuracy is stored beside the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from hybridiff.errors import HybridiffError
from hybridiff.zoo.digits import IMAGE_SIZE

WEIGHTS = Path(__file__).parent / "weights" / "classifier"


class DigitClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 32), block(32, 64), block(64, 64))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64 * 4 * 4, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for images N x 1 x 32 x 32 in [-1, 1]."""
        return self.head(self.features(images))


def load_classifier() -> DigitClassifier:
    path = WEIGHTS / "model.safetensors"
    if not path.is_file():
        raise HybridiffError(f"no digit classifier at {path}; train it with `python -m hybridiff.zoo.train classifier`")
    model = DigitClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def classifier_card() -> dict:
    return json.loads((WEIGHTS / "card.json").read_text())


def pixels(image) -> torch.Tensor:
    """A PIL image (any mode, any size) as a 1 x 1 x 32 x 32 tensor in [-1, 1]."""
    gray = image.convert("L").resize((IMAGE_SIZE, IMAGE_SIZE))
    return torch.tensor(np.asarray(gray, dtype=np.float32) / 127.5 - 1.0)[None, None]


@torch.inference_mode()
def classify(images: list) -> list[int]:
    """The digit the classifier reads in each PIL image."""
    model = load_classifier()
    return model(torch.cat([pixels(im) for im in images])).argmax(1).tolist()
