"""Per-class accuracy of a classifier, and how each class's geometry ranks against it.

:class:`ClassAccuracy` counts correct predictions per class from logits and labels. :class:`AccuracyCapture` feeds
one from a forward hook on the layer that produces the logits, so a monitor gets the accuracy of the same forward
passes whose embeddings it records. :func:`spearman_correlation` ranks a metric against accuracy over the classes,
and :func:`accuracy_scalars` turns both into the ``pmg/accuracy/<class>`` and ``pmg/spearman/<metric>`` tags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .capture import _first_tensor, _resolve_layer

if TYPE_CHECKING:
    from .analysis import ManifoldReport

__all__ = [
    "MIN_CLASSES_FOR_SPEARMAN",
    "AccuracyCapture",
    "ClassAccuracy",
    "accuracy_scalars",
    "spearman_correlation",
]

#: Minimum number of classes with both values defined for which :func:`spearman_correlation` returns a number. With two
#: classes the rank correlation can only be -1 or +1, which carries no information about a trend.
MIN_CLASSES_FOR_SPEARMAN = 3

#: Batches that :class:`ClassAccuracy` queues before counting them, which bounds the queued predictions' memory.
PENDING_BATCHES = 64

#: Tag component of per-class accuracy, ``<prefix>/accuracy/<class>``.
ACCURACY_TAG = "accuracy"

#: Tag component of the rank correlations, ``<prefix>/spearman/<metric>``.
SPEARMAN_TAG = "spearman"


class ClassAccuracy:
    """Count, per class label, how many samples a classifier predicts correctly.

    A prediction is the argmax over the last dimension of the ``(B, C)`` logits, and it is correct when it equals
    the sample's label. The accuracy of class ``c`` is ``correct_c / total_c`` over every sample seen since the
    last :meth:`reset`.

    Example:
        >>> accuracy = ClassAccuracy()
        >>> accuracy.update(torch.tensor([[2.0, 0.1], [0.3, 1.0], [0.9, 0.2]]), torch.tensor([0, 1, 1]))
        >>> accuracy.compute()
        {0: 1.0, 1: 0.5}
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every count."""
        # Counts per label, on the host.
        self._correct_counts = np.zeros(0, dtype=np.int64)
        self._total_counts = np.zeros(0, dtype=np.int64)
        # Batches not counted yet: predictions on the device of the logits, and host labels with -1 for samples
        # left out. Counting them together costs a few operations per PENDING_BATCHES batches, not per batch.
        self._pending_predictions: list[Tensor] = []
        self._pending_labels: list[np.ndarray] = []
        self._n_columns = 0

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor | Sequence[int]) -> None:
        """Add one batch.

        Args:
            logits: ``(B, C)`` class scores (logits or probabilities), on any device.
            labels: ``(B,)`` integer labels in ``[0, C)``.

        Raises:
            TypeError: if ``logits`` is not a floating-point tensor or ``labels`` are not integers.
            ValueError: if the shapes do not match or a label is outside ``[0, C)``.
        """
        problem = _logits_problem(logits, labels)
        if problem is not None:
            error_type, message = problem
            raise error_type(message)
        self._add(logits.detach(), torch.as_tensor(labels).detach().to("cpu", torch.long).numpy())

    def _add(self, logits: Tensor, labels: np.ndarray) -> None:
        """Queue one batch whose host ``labels`` lie in ``[0, C)``, or are -1 for samples not to count."""
        self._pending_predictions.append(logits.argmax(dim=1))
        self._pending_labels.append(labels)
        self._n_columns = max(self._n_columns, logits.shape[1])
        if len(self._pending_labels) >= PENDING_BATCHES:
            self._count_pending()

    def _count_pending(self) -> None:
        if not self._pending_labels:
            return
        # One transfer of the queued predictions to the host.
        predictions = torch.cat(self._pending_predictions).cpu().numpy()
        labels = np.concatenate(self._pending_labels)
        self._pending_predictions, self._pending_labels = [], []
        counted = labels >= 0
        predictions, labels = predictions[counted], labels[counted]
        size = max(self._n_columns, self._total_counts.size)
        self._total_counts = _padded(self._total_counts, size) + np.bincount(labels, minlength=size)
        hits = np.bincount(labels[predictions == labels], minlength=size)
        self._correct_counts = _padded(self._correct_counts, size) + hits

    @property
    def correct(self) -> dict[int, int]:
        """Correct predictions per class label seen, sorted by label."""
        self._count_pending()
        return {label: int(self._correct_counts[label]) for label in self.total}

    @property
    def total(self) -> dict[int, int]:
        """Samples seen per class label, sorted by label."""
        self._count_pending()
        return {int(label): int(self._total_counts[label]) for label in np.flatnonzero(self._total_counts)}

    def compute(self) -> dict[int, float]:
        """Return ``correct / total`` per class label seen, sorted by label."""
        correct = self.correct
        return {label: correct[label] / total for label, total in self.total.items()}


def _padded(counts: np.ndarray, size: int) -> np.ndarray:
    """Return ``counts`` followed by zeros up to ``size`` entries."""
    if counts.size >= size:
        return counts
    return np.concatenate([counts, np.zeros(size - counts.size, dtype=np.int64)])


def _logits_problem(logits: Any, labels: Any) -> tuple[type[Exception], str] | None:
    """Return the error type and message for logits and labels that cannot give an accuracy, else ``None``."""
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        kind = f"dtype {logits.dtype}" if isinstance(logits, Tensor) else f"a {type(logits).__name__}"
        return TypeError, f"Expected floating-point logits of shape (B, C), got {kind}."
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        return TypeError, f"Expected integer class labels, got dtype {labels.dtype}."
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        return ValueError, (
            f"Expected logits of shape (B, C) and labels of shape (B,), got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if labels.numel() and not _labels_below(labels, logits.shape[1]):
        return ValueError, (
            f"Expected labels in [0, {logits.shape[1]}) for logits with {logits.shape[1]} columns, got labels from "
            f"{int(labels.min())} to {int(labels.max())}."
        )
    return None


def _labels_below(labels: Tensor, n_columns: int) -> bool:
    """Return whether every label lies in ``[0, n_columns)``, with one host sync for labels on an accelerator."""
    if labels.device.type == "cpu":
        # Viewed as unsigned, a negative label is huge, so one maximum checks both ends of the range.
        return bool(labels.to(torch.long).numpy().view(np.uint64).max() < n_columns)
    lowest, highest = torch.stack(torch.aminmax(labels)).tolist()
    return bool(lowest >= 0 and highest < n_columns)


class AccuracyCapture:
    """Count per-class accuracy from the logits a layer produces, through a forward hook.

    Which tensor is taken as the logits:

    * ``layer=None``: the output of the last ``nn.Linear`` in ``model.modules()`` order, the classification head
      of most classifiers. Its input is what :class:`pmg_torch.EmbeddingCapture` records by default, so one
      forward gives both.
    * ``layer="name"`` or a module inside ``model``: that module's output. ``""`` names ``model`` itself, whose
      output is the logits only when the forward of ``model`` runs during evaluation.

    Call :meth:`set_labels` before every forward, as for :class:`pmg_torch.EmbeddingCapture`. A forward whose
    output cannot serve as logits (not a ``(B, C)`` float tensor, a batch size that differs from the labels,
    labels outside ``[0, C)``, or a second call of the layer on one batch) never raises. The hook keeps the
    reason as an exception in :attr:`error`, removes itself and lets the forward finish, so that a monitor can
    report it once while training goes on. The counts made before stay.

    Args:
        model: the classifier to watch.
        layer: a dotted module name, a module inside ``model``, or ``None`` for the output of the last
            ``nn.Linear``.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module`` or ``layer`` has the wrong type.
        ValueError: if ``layer`` names no module of ``model``, or ``layer`` is ``None`` and ``model`` has no
            ``nn.Linear``.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with AccuracyCapture(model) as capture:
        ...     capture.set_labels(torch.tensor([0, 1, 1]))
        ...     logits = model(torch.randn(3, 4))
        >>> sorted(capture.accuracy.total.items())
        [(0, 1), (1, 2)]
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Expected `model` to be a torch.nn.Module, got {type(model).__name__}.")
        self.layer_name, self.module, _ = _resolve_layer(model, layer)
        self.accuracy = ClassAccuracy()
        #: Why counting stopped, or ``None`` while every forward gave usable logits.
        self.error: Exception | None = None
        self._handle: RemovableHandle | None = None
        self._pending_labels: Tensor | None = None
        self._pending_keep: Tensor | None = None

    def __enter__(self) -> AccuracyCapture:
        self.attach()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    @property
    def attached(self) -> bool:
        """Whether the hook is registered."""
        return self._handle is not None

    def attach(self) -> None:
        """Register the forward hook. Calling it while attached does nothing."""
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._forward_hook)

    def remove(self) -> None:
        """Remove the hook and drop labels no forward has used yet. The counts stay. Safe to call repeatedly."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pending_labels = None
        self._pending_keep = None

    def stop(self, error: Exception) -> None:
        """Remove the hook and keep ``error`` in :attr:`error` as the reason counting stopped. The counts stay."""
        self.error = error
        self.remove()

    def set_labels(self, labels: Tensor | Sequence[int], keep: Tensor | None = None) -> None:
        """Set the labels of the next forward's batch.

        Args:
            labels: ``(B,)`` integer class labels, on any device. They are checked against the logits in the hook.
            keep: ``(B,)`` bool, which samples to count; ``None`` counts all. A distributed sampler's padding is
                one use.

        Raises:
            TypeError: if ``keep`` is not a bool tensor.
            ValueError: if ``keep`` does not have the shape of ``labels``.
        """
        labels = torch.as_tensor(labels).detach()
        if keep is not None:
            if not isinstance(keep, Tensor) or keep.dtype != torch.bool:
                described = keep.dtype if isinstance(keep, Tensor) else type(keep).__name__
                raise TypeError(f"Expected `keep` to be a bool tensor, got {described}.")
            if keep.shape != labels.shape:
                raise ValueError(
                    f"Expected `keep` of shape {tuple(labels.shape)}, one flag per label, got {tuple(keep.shape)}."
                )
            keep = keep.detach().cpu()
        self._pending_labels = labels
        self._pending_keep = keep

    @torch.no_grad()
    def _forward_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        labels, keep = self._pending_labels, self._pending_keep
        self._pending_labels = self._pending_keep = None
        if labels is None:
            self.stop(
                ValueError(
                    f"Layer {self.layer_name!r} ran without labels for its batch, so it ran more than once per "
                    "batch: either the model uses it twice in one forward, and the logits layer should be the "
                    "classification head, or the model ran twice on one batch."
                )
            )
            return
        try:
            logits = _first_tensor(output, f"the output of layer {self.layer_name!r}")
        except TypeError as error:
            self.stop(error)
            return
        problem = _logits_problem(logits, labels)
        if problem is not None:
            error_type, message = problem
            self.stop(error_type(f"The output of layer {self.layer_name!r} cannot serve as logits. {message}"))
            return
        host_labels = labels.to("cpu", torch.long).numpy()
        if keep is not None:
            host_labels = np.where(keep.numpy(), host_labels, -1)
        self.accuracy._add(logits.detach(), host_labels)


def spearman_correlation(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    r"""Compute Spearman's rank correlation of paired values, leaving out every pair with a NaN.

    With ``r(x)`` the ranks of ``x`` (ties get the mean of the ranks they span),

    .. math::

        \rho = \frac{\operatorname{cov}(r(x), r(y))}{\sigma_{r(x)} \, \sigma_{r(y)}}.

    It equals ``scipy.stats.spearmanr(x, y, nan_policy="omit")`` wherever that is defined.

    Args:
        x: ``(n,)`` values, e.g. one metric per class.
        y: ``(n,)`` values paired with ``x``, e.g. the accuracy of the same classes.

    Returns:
        ``rho`` in ``[-1, 1]``; NaN when fewer than :data:`MIN_CLASSES_FOR_SPEARMAN` pairs are free of NaN or
        either side is constant over them.

    Raises:
        ValueError: if ``x`` and ``y`` are not one-dimensional of the same length.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"Expected x and y of the same shape (n,), got {x.shape} and {y.shape}.")
    defined = ~(np.isnan(x) | np.isnan(y))
    if defined.sum() < MIN_CLASSES_FOR_SPEARMAN:
        return math.nan
    x_ranks = _average_ranks(x[defined])
    y_ranks = _average_ranks(y[defined])
    x_centred = x_ranks - x_ranks.mean()
    y_centred = y_ranks - y_ranks.mean()
    scale = math.sqrt(float(x_centred @ x_centred) * float(y_centred @ y_centred))
    if scale == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float(x_centred @ y_centred) / scale))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Return the 1-based ranks of ``values``, each run of tied values sharing the mean of its ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_run = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    run_of = np.cumsum(starts_run) - 1
    run_starts = np.flatnonzero(starts_run)
    run_lengths = np.diff(np.append(run_starts, len(values)))
    mean_rank = run_starts + (run_lengths + 1) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = mean_rank[run_of]
    return ranks


def accuracy_scalars(report: ManifoldReport, accuracy: Mapping[int, float], prefix: str = "pmg") -> dict[str, float]:
    """Return per-class accuracy and each metric's rank correlation with it, as scalar tags.

    The tags are ``<prefix>/accuracy/<class>`` for every class of the report that has an accuracy,
    ``<prefix>/accuracy/mean`` (the mean over those classes, which is the balanced accuracy), and
    ``<prefix>/spearman/<metric>``, the :func:`spearman_correlation` over the classes of a metric's per-class values
    with their accuracy. ``<class>`` is the name from :meth:`ManifoldReport.tag_names`. A correlation that is
    undefined (fewer than :data:`MIN_CLASSES_FOR_SPEARMAN` classes with both values, or a constant side, such as
    every class at accuracy 1) is left out rather than given as NaN.

    Args:
        report: the geometry of the classes.
        accuracy: accuracy in ``[0, 1]`` per class label, e.g. from :meth:`ClassAccuracy.compute`.
        prefix: first component of every tag.

    Returns:
        ``{tag: value}``, empty when no class of the report has an accuracy.
    """
    head = f"{prefix}/" if prefix else ""
    tags = report.tag_names()
    labels = [label for label in report.classes if label in accuracy]
    if not labels:
        return {}
    scalars = {f"{head}{ACCURACY_TAG}/{tags[label]}": float(accuracy[label]) for label in labels}
    scalars[f"{head}{ACCURACY_TAG}/mean"] = math.fsum(accuracy[label] for label in labels) / len(labels)
    paired_accuracy = [accuracy[label] for label in labels]
    for metric, per_class in report.values.items():
        rho = spearman_correlation([per_class.get(label, math.nan) for label in labels], paired_accuracy)
        if not math.isnan(rho):
            scalars[f"{head}{SPEARMAN_TAG}/{metric}"] = rho
    return scalars
