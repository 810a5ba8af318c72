"""The digits network as a plain ``nn.Module``, shared by the Lightning and the plain-PyTorch examples.

It imports no Lightning, so ``plain_pytorch.py`` stays free of it.
"""

from __future__ import annotations

from torch import Tensor, nn


class DigitsNet(nn.Module):
    """Two 3x3 convolutions, a 2x2 max-pool, a ``hidden``-wide embedding and a linear head for 8x8 digits."""

    def __init__(self, hidden: int = 64, channels: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.embed = nn.Sequential(nn.Linear(2 * channels * 4 * 4, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.embed(self.features(images)))
