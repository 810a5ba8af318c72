"""Train a small CNN on scikit-learn's handwritten digits in a plain PyTorch loop and log each class's geometry.

No Lightning: the loop, the evaluation and the TensorBoard writer are written out, so the same few lines fit any
training script. Run from the repository root::

    python examples/plain_pytorch.py --epochs 5 --logdir runs
    tensorboard --logdir runs

After every epoch the script runs the validation scans through the model once. During that pass
:class:`pmg_torch.EmbeddingCapture` records the input of the last ``nn.Linear`` (the 64-wide penultimate
embeddings) per digit, and :class:`pmg_torch.ClassAccuracy` counts the correct predictions per digit from the
logits. :func:`pmg_torch.analyze` then measures each digit's cloud, and :meth:`ManifoldReport.to_tensorboard`
writes the scalars ``pmg/<metric>/<digit>``, per-class accuracy and its Spearman correlation with each metric,
the figures and the custom-scalars layout. The last epoch adds the expensive metrics (holes, nonconvexity) unless
``--no-expensive`` is given.

The split and ``k = 10`` follow ``train_digits.py``: a 30% stratified validation split leaves 52 to 55 scans per
digit, and a neighbourhood of 10 is a local patch of under a fifth of a class.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from digits_net import DigitsNet
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

import pmg_torch as pmg

K_NEIGHBOURS = 10
VAL_FRACTION = 0.3
BATCH_SIZE = 64
#: Largest grey level in the digits scans (4-bit pixels).
MAX_PIXEL = 16.0
METRICS = ("curvature", "volume", "intrinsic_dimension", "shape_similarity")
EXPENSIVE_METRICS = ("holes", "nonconvexity")


def digits_loaders(seed: int) -> tuple[DataLoader, DataLoader]:
    """Return training and validation loaders of the digits as ``(1, 8, 8)`` images in ``[0, 1]``."""
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / MAX_PIXEL
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    train_index, val_index = train_test_split(
        range(len(labels)), test_size=VAL_FRACTION, stratify=labels.numpy(), random_state=seed
    )
    generator = torch.Generator().manual_seed(seed)
    train = DataLoader(
        TensorDataset(images[train_index], labels[train_index]), BATCH_SIZE, shuffle=True, generator=generator
    )
    val = DataLoader(TensorDataset(images[val_index], labels[val_index]), BATCH_SIZE)
    return train, val


def train_one_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer) -> int:
    """Run one epoch of training and return the number of optimiser steps taken."""
    model.train()
    for images, labels in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return len(loader)


@torch.no_grad()
def measure(
    model: nn.Module, loader: DataLoader, metrics: Sequence[str]
) -> tuple[pmg.ManifoldReport, dict[int, float]]:
    """Run the validation set through ``model`` once and return each class's geometry and accuracy."""
    model.eval()
    accuracy = pmg.ClassAccuracy()
    with pmg.EmbeddingCapture(model, layer=None, max_per_class=1000) as capture:
        for images, labels in loader:
            capture.set_labels(labels)
            accuracy.update(model(images), labels)
    report = pmg.analyze(capture, k=K_NEIGHBOURS, metrics=metrics)
    return report, accuracy.compute()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default: 5)")
    parser.add_argument(
        "--logdir", default="runs/plain_pytorch", help="TensorBoard log folder (default: runs/plain_pytorch)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the weights and the shuffle")
    parser.add_argument(
        "--expensive",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add holes and nonconvexity, with their persistence diagrams, on the last epoch (default: on)",
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, val = digits_loaders(args.seed)
    model = DigitsNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    step = 0
    with SummaryWriter(args.logdir) as writer:
        for epoch in range(args.epochs):
            step += train_one_epoch(model, train, optimizer)
            expensive = args.expensive and epoch == args.epochs - 1
            report, accuracy = measure(model, val, METRICS + EXPENSIVE_METRICS if expensive else METRICS)
            report.to_tensorboard(writer, step=step, accuracy=accuracy)
            balanced = sum(accuracy.values()) / len(accuracy)
            print(f"epoch {epoch}: balanced validation accuracy {balanced:.3f}")

    print(f"\nPer-class validation accuracy and manifold geometry after {args.epochs} epochs (k = {K_NEIGHBOURS}):")
    print(report.table(extra_columns={"accuracy": accuracy}))
    correlations = {
        tag.rsplit("/", 1)[1]: value
        for tag, value in pmg.accuracy_scalars(report, accuracy).items()
        if tag.startswith("pmg/spearman/")
    }
    listed = ", ".join(f"{metric} {rho:+.2f}" for metric, rho in correlations.items()) or "undefined"
    print(f"\nSpearman correlation of each metric with per-class accuracy: {listed}")
    print(f"\nTensorBoard logs: {args.logdir}  (view with: tensorboard --logdir {args.logdir})")


if __name__ == "__main__":
    main()
