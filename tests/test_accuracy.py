"""Tests of per-class accuracy, its capture from a forward hook, and its rank correlation with the geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from pmg_torch.accuracy import (
    MIN_CLASSES_FOR_SPEARMAN,
    PENDING_BATCHES,
    AccuracyCapture,
    ClassAccuracy,
    accuracy_scalars,
    spearman_correlation,
)
from pmg_torch.analysis import ManifoldReport

NAN = float("nan")


def reference_accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per-class accuracy by a plain loop over samples."""
    correct: dict[int, int] = {}
    total: dict[int, int] = {}
    for row, label in zip(logits, labels, strict=True):
        label = int(label)
        total[label] = total.get(label, 0) + 1
        correct[label] = correct.get(label, 0) + int(int(np.argmax(row)) == label)
    return {label: correct[label] / total[label] for label in sorted(total)}


def report_with(values: dict[str, dict[int, float]], names: dict[int, str] | None = None) -> ManifoldReport:
    classes = sorted(next(iter(values.values())))
    return ManifoldReport(
        classes=classes,
        class_names=names or {label: str(label) for label in classes},
        values=values,
        n_samples={label: 10 for label in classes},
        n_duplicates={label: 0 for label in classes},
        n_nonfinite={label: 0 for label in classes},
    )


# -- ClassAccuracy ---------------------------------------------------------------------------------------------------


def test_class_accuracy_matches_loop_over_batches():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(90, 4, generator=generator)
    labels = torch.randint(0, 4, (90,), generator=generator)
    logits[torch.arange(0, 90, 3), labels[::3]] += 5.0  # a third certainly right, the rest by chance
    accuracy = ClassAccuracy()
    for start in range(0, 90, 16):
        accuracy.update(logits[start : start + 16], labels[start : start + 16])

    expected = reference_accuracy(logits.numpy(), labels.numpy())
    assert accuracy.compute() == pytest.approx(expected, abs=1e-12)
    assert accuracy.total == {label: int((labels == label).sum()) for label in range(4)}


def test_class_accuracy_counts_queued_batches():
    # More batches than ClassAccuracy queues, so the counts are folded while batches keep coming.
    generator = torch.Generator().manual_seed(3)
    n_batches = PENDING_BATCHES + 6
    logits = torch.randn(n_batches * 5, 6, generator=generator)
    labels = torch.randint(0, 6, (n_batches * 5,), generator=generator)
    accuracy = ClassAccuracy()
    for start in range(0, labels.numel(), 5):
        accuracy.update(logits[start : start + 5], labels[start : start + 5])
    expected = reference_accuracy(logits.numpy(), labels.numpy())
    assert accuracy.compute() == pytest.approx(expected, abs=1e-12)
    assert accuracy.total == {label: int((labels == label).sum()) for label in range(6)}


def test_class_accuracy_counts_only_classes_seen():
    accuracy = ClassAccuracy()
    accuracy.update(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([2]))
    accuracy.update(torch.empty(0, 4), torch.empty(0, dtype=torch.long))
    assert accuracy.compute() == {2: 1.0}
    accuracy.reset()
    assert accuracy.compute() == {}


@pytest.mark.parametrize(
    ("logits", "labels", "error", "match"),
    [
        (torch.zeros(3, 2), torch.tensor([0.0, 1.0, 1.0]), TypeError, "integer class labels"),
        (torch.zeros(3, 2, dtype=torch.long), torch.tensor([0, 1, 1]), TypeError, "floating-point logits"),
        (torch.zeros(3), torch.tensor([0, 1, 1]), ValueError, r"shape \(B, C\)"),
        (torch.zeros(3, 2), torch.tensor([0, 1]), ValueError, r"got \(3, 2\) and \(2,\)"),
        (torch.zeros(3, 2), torch.tensor([0, 1, 2]), ValueError, r"labels in \[0, 2\)"),
        (torch.zeros(3, 2), torch.tensor([0, -1, 1]), ValueError, "from -1 to 1"),
    ],
)
def test_class_accuracy_rejects_bad_batches(logits, labels, error, match):
    with pytest.raises(error, match=match):
        ClassAccuracy().update(logits, labels)


# -- AccuracyCapture -------------------------------------------------------------------------------------------------


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_capture_counts_logits_of_last_linear():
    torch.manual_seed(0)
    model = Head()
    x = torch.randn(40, 5)
    labels = torch.arange(40) % 3
    with AccuracyCapture(model) as capture:
        for start in range(0, 40, 7):
            capture.set_labels(labels[start : start + 7])
            model(x[start : start + 7])
    assert capture.layer_name == "head"
    assert capture.error is None
    with torch.no_grad():
        expected = reference_accuracy(model(x).numpy(), labels.numpy())
    assert capture.accuracy.compute() == pytest.approx(expected, abs=1e-12)


def test_capture_skips_samples_not_kept():
    torch.manual_seed(1)
    model = Head()
    x = torch.randn(6, 5)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    keep = torch.tensor([True, True, True, True, False, False])
    with AccuracyCapture(model) as capture:
        capture.set_labels(labels, keep=keep)
        model(x)
    assert capture.accuracy.total == {0: 2, 1: 1, 2: 1}
    with torch.no_grad():
        expected = reference_accuracy(model(x[:4]).numpy(), labels[:4].numpy())
    assert capture.accuracy.compute() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("keep", "error"), [(torch.tensor([1, 0]), TypeError), (torch.tensor([True, False, True]), ValueError)]
)
def test_capture_rejects_bad_keep(keep, error):
    with pytest.raises(error, match="keep"):
        AccuracyCapture(Head()).set_labels(torch.tensor([0, 1]), keep=keep)


def test_capture_of_model_output_by_empty_name():
    model = Head()
    with AccuracyCapture(model, layer="") as capture:
        capture.set_labels(torch.tensor([0, 1]))
        model(torch.randn(2, 5))
    assert capture.layer_name == ""
    assert sum(capture.accuracy.total.values()) == 2


def test_capture_stops_with_error_on_wrong_width():
    model = Head()
    with AccuracyCapture(model, layer="body") as capture:
        capture.set_labels(torch.tensor([0, 7]))
        model(torch.randn(2, 5))  # the forward finishes although the labels exceed the 6 columns
        assert not capture.attached
    assert isinstance(capture.error, ValueError)
    assert "'body' cannot serve as logits" in str(capture.error)
    assert capture.accuracy.compute() == {}


def test_capture_stops_when_layer_runs_twice():
    class TwiceHead(Head):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x)) + self.head(self.body(x))

    model = TwiceHead()
    with AccuracyCapture(model) as capture:
        capture.set_labels(torch.tensor([0, 1]))
        model(torch.randn(2, 5))
    assert isinstance(capture.error, ValueError)
    assert "ran more than once per batch" in str(capture.error)
    assert sum(capture.accuracy.total.values()) == 2  # the first call was counted


def test_capture_leaves_no_hook():
    model = Head()
    with AccuracyCapture(model):
        assert len(model.head._forward_hooks) == 1
    assert len(model.head._forward_hooks) == 0


def test_capture_rejects_unknown_layer():
    with pytest.raises(ValueError, match="not found"):
        AccuracyCapture(Head(), layer="classifier")


# -- spearman_correlation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([0.3, 0.1, 0.5, 0.2, 0.9], [0.8, 0.95, 0.6, 0.9, 0.4]),
        ([1.0, 2.0, 2.0, 3.0, 3.0, 3.0], [0.5, 0.2, 0.9, 0.9, 0.1, 0.4]),
        ([5.0, 1.0, 4.0], [0.9, 0.7, 0.7]),
        (list(np.random.default_rng(0).normal(size=40)), list(np.random.default_rng(1).normal(size=40))),
    ],
)
def test_spearman_matches_scipy(x, y):
    expected = scipy.stats.spearmanr(x, y).statistic
    assert spearman_correlation(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_leaves_out_nan_pairs():
    x = [0.3, NAN, 0.5, 0.2, 0.9, 0.4]
    y = [0.8, 0.1, 0.6, NAN, 0.4, 0.7]
    expected = scipy.stats.spearmanr([0.3, 0.5, 0.9, 0.4], [0.8, 0.6, 0.4, 0.7]).statistic
    assert spearman_correlation(x, y) == pytest.approx(expected, abs=1e-12)


def test_spearman_of_monotone_maps_is_one():
    x = np.linspace(0.1, 2.0, 8)
    assert spearman_correlation(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman_correlation(x, -(x**3)) == pytest.approx(-1.0)


def test_spearman_undefined_cases_are_nan():
    assert MIN_CLASSES_FOR_SPEARMAN == 3
    assert math.isnan(spearman_correlation([0.1, 0.2], [0.3, 0.4]))
    assert math.isnan(spearman_correlation([0.1, 0.2, NAN], [0.3, 0.4, 0.5]))
    assert math.isnan(spearman_correlation([0.1, 0.2, 0.3], [1.0, 1.0, 1.0]))


def test_spearman_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same shape"):
        spearman_correlation([0.1, 0.2, 0.3], [0.1, 0.2])


# -- accuracy_scalars ------------------------------------------------------------------------------------------------


def test_accuracy_scalars_tags_and_values():
    report = report_with(
        {
            "curvature": {0: 0.9, 1: 0.2, 2: 0.5, 3: 0.4},
            "volume": {0: 1.0, 1: NAN, 2: 3.0, 3: 2.0},
            "density": {0: NAN, 1: NAN, 2: 3.0, 3: 2.0},
        },
        names={0: "cat", 1: "dog", 2: "big bird", 3: "3"},
    )
    accuracy = {0: 0.5, 1: 0.9, 2: 0.8, 3: 0.7}
    scalars = accuracy_scalars(report, accuracy)

    assert scalars["pmg/accuracy/cat"] == 0.5
    assert scalars["pmg/accuracy/big_bird"] == 0.8
    assert scalars["pmg/accuracy/mean"] == pytest.approx(0.725)
    expected_curvature = scipy.stats.spearmanr([0.9, 0.2, 0.5, 0.4], [0.5, 0.9, 0.8, 0.7]).statistic
    assert scalars["pmg/spearman/curvature"] == pytest.approx(expected_curvature)
    expected_volume = scipy.stats.spearmanr([1.0, 3.0, 2.0], [0.5, 0.8, 0.7]).statistic
    assert scalars["pmg/spearman/volume"] == pytest.approx(expected_volume)
    assert "pmg/spearman/density" not in scalars  # two classes with both values
    assert len(scalars) == 4 + 1 + 2


def test_accuracy_scalars_skip_classes_without_accuracy():
    report = report_with({"volume": {0: 1.0, 1: 2.0, 2: 3.0}})
    scalars = accuracy_scalars(report, {0: 1.0, 2: 0.5, 9: 0.1}, prefix="val")
    assert scalars == {"val/accuracy/0": 1.0, "val/accuracy/2": 0.5, "val/accuracy/mean": 0.75}
    assert accuracy_scalars(report, {}) == {}
