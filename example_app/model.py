"""The models the example app serves, built in code with deterministic weights.

Both factories take no arguments, download nothing and seed their own generator, so every pool
worker builds exactly the same weights and two workers never disagree about an answer. The weights
are untrained: a label is a deterministic function of the input, not a real digit recognition. Both
models take ``(N, 1, 28, 28)`` float32 images (0 = background, 1 = ink) and return ``(N, 10)`` class
probabilities, so the views need not know which one is configured::

    TORCHPOOL_MODEL = "example_app.model:build_classifier"   # small conv net (default)
    TORCHPOOL_MODEL = "example_app.model:build_mlp"          # tiny MLP
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SIDE = 28
NUM_CLASSES = 10
SEED = 0


class DigitConvNet(nn.Module):
    """Two conv/pool blocks and a linear head: (N, 1, 28, 28) in, (N, 10) probabilities out."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 x 14 x 14
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 x 7 x 7
        )
        self.head = nn.Linear(16 * 7 * 7, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1)).softmax(dim=1)


class DigitMLP(nn.Module):
    """One hidden layer of 64 units: (N, 1, 28, 28) images in, (N, 10) probabilities out."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(IMAGE_SIDE * IMAGE_SIDE, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).softmax(dim=1)


def _build(module_type: type[nn.Module]) -> nn.Module:
    # fork_rng keeps the seeding local: the worker's global RNG is left as it was found.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = module_type()
    return model.eval().requires_grad_(False)


def build_classifier() -> nn.Module:
    """Return the small conv net with its fixed seed-0 weights, in eval mode."""
    return _build(DigitConvNet)


def build_mlp() -> nn.Module:
    """Return the tiny MLP with its fixed seed-0 weights, in eval mode."""
    return _build(DigitMLP)


def example_input() -> torch.Tensor:
    """One random ``(1, 1, 28, 28)`` image: what ``flask torchpool status --probe`` and ``flask
    torchpool tune`` call the model with (``TORCHPOOL_EXAMPLE_INPUT``)."""
    return torch.rand(1, 1, 28, 28)
