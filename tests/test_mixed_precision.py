"""Half-precision embeddings, as mixed-precision training produces them, give the float32 numbers.

Every metric upcasts float16 and bfloat16 input before it computes, so a half-precision cloud gives the value of
its own float32 copy to float32 rounding. What remains is the rounding of the embeddings themselves: float16 keeps
11 significant bits and bfloat16 8, so the tolerances against the float32 cloud are a relative 1e-3 for float16
and 1e-2 for bfloat16. On the 2048-dimensional cloud below the largest measured deviations were 3e-5 (float16)
and 9e-4 (bfloat16), both in the total persistence of the holes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import pmg_torch as pmg
from callbacks import ManifoldGeometryCallback

#: Relative tolerance of a metric on a half-precision cloud against the same cloud in float32.
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 1e-2}
#: Relative tolerance against the half-precision cloud's own float32 copy: only float32 rounding differs.
UPCAST_TOLERANCE = 1e-6

K = 10
HALF_DTYPES = [pytest.param(torch.float16, id="float16"), pytest.param(torch.bfloat16, id="bfloat16")]


def curved_embeddings(seed: int, rows: int = 60, width: int = 2048) -> Tensor:
    """A 10-dimensional Gaussian pushed through a random ReLU layer to ``width`` dimensions, plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(rows, 10, generator=generator)
    weights = torch.randn(10, width, generator=torch.Generator().manual_seed(100)) / math.sqrt(10)
    return torch.relu(latent @ weights) + 0.05 * torch.randn(rows, width, generator=generator)


@pytest.fixture(scope="module")
def embeddings() -> Tensor:
    return curved_embeddings(seed=0)


@pytest.fixture(scope="module")
def other_class() -> Tensor:
    return curved_embeddings(seed=1)


def holes_threshold(x: Tensor) -> float:
    """A threshold halfway across the widest gap between the float32 cloud's bar lengths.

    A bar within rounding of the threshold would flip in or out of the count, so the threshold keeps away from all.
    """
    diagram = pmg.holes(x, threshold=0.0).diagram
    lengths = np.sort(diagram[:, 1] - diagram[:, 0])
    gaps = np.diff(lengths)
    widest = int(np.argmax(gaps))
    return float(lengths[widest] + gaps[widest] / 2)


def metric_calls(other: Tensor, threshold: float) -> dict[str, Callable[[Tensor], Any]]:
    return {
        "curvature": lambda x: pmg.curvature(x, k=K).overall,
        "curvature_reference": lambda x: pmg.curvature(x, k=K, method="reference").overall,
        "tle": lambda x: pmg.intrinsic_dimension(x, "tle", k=K),
        "mle": lambda x: pmg.intrinsic_dimension(x, "mle", k=K),
        "twonn": lambda x: pmg.intrinsic_dimension(x, "twonn", k=K),
        "participation_ratio": pmg.participation_ratio,
        "volume": lambda x: pmg.volume(x).volume,
        "density": lambda x: pmg.volume(x).density,
        "holes": lambda x: pmg.holes(x, threshold=threshold).count,
        "holes_total_persistence": lambda x: pmg.holes(x, threshold=threshold).total_persistence,
        "nonconvexity": lambda x: pmg.nonconvexity(x, n_projections=3),
        "shape_similarity": lambda x: pmg.shape_similarity(x, other),
    }


METRIC_NAMES = [
    "curvature",
    "curvature_reference",
    "tle",
    "mle",
    "twonn",
    "participation_ratio",
    "volume",
    "density",
    "holes",
    "holes_total_persistence",
    "nonconvexity",
    "shape_similarity",
]


@pytest.fixture(scope="module")
def float32_values(embeddings: Tensor, other_class: Tensor) -> dict[str, float]:
    calls = metric_calls(other_class, holes_threshold(embeddings))
    return {name: float(call(embeddings)) for name, call in calls.items()}


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("name", METRIC_NAMES)
def test_half_precision_agrees_with_float32(
    embeddings: Tensor, other_class: Tensor, float32_values: dict[str, float], name: str, dtype: torch.dtype
) -> None:
    """A half-precision cloud of dimension 2048 agrees with float32 to 1e-3 (float16) or 1e-2 (bfloat16)."""
    call = metric_calls(other_class, holes_threshold(embeddings))[name]
    half = embeddings.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = call(half)
    if isinstance(value, Tensor):
        assert value.dtype == torch.float32
    assert math.isfinite(float(value))
    assert float(value) == pytest.approx(float32_values[name], rel=TOLERANCE[dtype])
    assert float(value) == pytest.approx(float(call(half.float())), rel=UPCAST_TOLERANCE)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_analyze_of_half_precision_equals_its_upcast(dtype: torch.dtype) -> None:
    clouds = {label: curved_embeddings(seed=label, rows=40, width=64).to(dtype) for label in (0, 1)}
    upcast = {label: rows.float() for label, rows in clouds.items()}
    metrics = ["curvature", "volume", "intrinsic_dimension", "participation_ratio", "shape_similarity"]
    half_report = pmg.analyze(clouds, k=K, metrics=metrics)
    float_report = pmg.analyze(upcast, k=K, metrics=metrics)
    for metric in metrics:
        for label in (0, 1):
            half_value = half_report.values[metric][label]
            assert math.isfinite(half_value), (metric, label)
            assert half_value == pytest.approx(float_report.values[metric][label], rel=UPCAST_TOLERANCE), metric


# -- a Trainer with bf16-mixed precision ----------------------------------------------------------------------------


class SmallClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.head = nn.Linear(32, 3)
        self.head_input_dtypes: set[torch.dtype] = set()

    def forward(self, x: Tensor) -> Tensor:
        features = self.body(x)
        if not self.training:
            self.head_input_dtypes.add(features.dtype)
        return self.head(features)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def blobs(rows_per_class: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(rows_per_class)
    x = 3.0 * torch.eye(3, 8)[labels] + torch.randn(labels.shape[0], 8, generator=generator)
    return TensorDataset(x, labels)


def test_bf16_mixed_trainer_measures_bf16_embeddings(tmp_path: Path) -> None:
    """Under ``precision="bf16-mixed"`` the callback records bfloat16 activations and gives their geometry."""
    pl.seed_everything(0, verbose=False)
    model = SmallClassifier()
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0)
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        precision="bf16-mixed",
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        callbacks=[callback],
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    validation = blobs(30, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(blobs(8, seed=1), batch_size=12), DataLoader(validation, batch_size=16))

    assert model.head_input_dtypes == {torch.bfloat16}
    report = callback.last_report
    assert report is not None
    assert report.n_samples == {0: 30, 1: 30, 2: 30}
    x, labels = validation.tensors
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rows = model.eval().body(x)
    assert rows.dtype == torch.bfloat16
    direct = pmg.analyze(rows, labels, k=K, metrics=report.metrics)
    for metric in report.metrics:
        for label in report.classes:
            value = report.values[metric][label]
            assert math.isfinite(value), (metric, label)
            assert value == pytest.approx(direct.values[metric][label], rel=UPCAST_TOLERANCE), (metric, label)
