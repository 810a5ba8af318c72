"""A small convolutional classifier and a datamodule for scikit-learn's handwritten digits.

The data are the 1,797 8x8 grey-level scans of :func:`sklearn.datasets.load_digits`, which ship inside
scikit-learn, so nothing is downloaded. ``train_digits.py`` and ``digits_cli.py`` share these two classes.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from digits_net import DigitsNet
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

#: Largest grey level in the digits scans (4-bit pixels).
MAX_PIXEL = 16.0


class DigitsClassifier(pl.LightningModule):
    """Two 3x3 convolutions, a 2x2 max-pool and two linear layers for 8x8 digit images.

    The input of the last ``nn.Linear`` is the ``hidden``-wide penultimate representation that
    :class:`callbacks.ManifoldGeometryCallback` records by default.

    Args:
        hidden: width of the penultimate layer, the dimension ``D`` of each class's embedding cloud.
        channels: output channels of the first convolution; the second has twice as many.
        lr: learning rate of Adam.
        n_classes: number of classes.
    """

    def __init__(self, hidden: int = 64, channels: int = 16, lr: float = 3e-3, n_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        # The layers are attributes of this module, so their names (``embed``, ``head``) match plain DigitsNet's.
        net = DigitsNet(hidden=hidden, channels=channels, n_classes=n_classes)
        self.features, self.embed, self.head = net.features, net.embed, net.head
        self.lr = lr

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.embed(self.features(images)))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log("val_acc", (logits.argmax(dim=1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class DigitsDataModule(pl.LightningDataModule):
    """Scikit-learn's digits as ``(1, 8, 8)`` float images in ``[0, 1]``, split by a seeded stratified draw.

    Args:
        val_fraction: share of the 1,797 scans held out for validation, stratified by class.
        batch_size: rows per batch.
        seed: seed of the split and of the training shuffle.
    """

    def __init__(self, val_fraction: float = 0.3, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"Expected `val_fraction` strictly between 0 and 1, got {val_fraction}.")
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / MAX_PIXEL
        labels = torch.as_tensor(digits.target, dtype=torch.long)
        train_idx, val_idx = train_test_split(
            torch.arange(len(labels)).numpy(),
            test_size=self.val_fraction,
            stratify=labels.numpy(),
            random_state=self.seed,
        )
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.val_set = TensorDataset(images[val_idx], labels[val_idx])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
