"""Every metric of the package, computed per class, gathered in one :class:`ManifoldReport`.

:func:`analyze` takes the embeddings of all classes at once and cleans each class's cloud. Curvature and the kNN
intrinsic-dimension estimators share one neighbour search per class. Every degenerate case becomes NaN with one
warning that names the class, the metric and the reason.
"""

from __future__ import annotations

import math
import operator
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._validation import (
    DegenerateInputError,
    DegenerateInputWarning,
    check_choice,
    check_positive_float,
    check_positive_int,
    describe,
    drop_nonfinite_rows,
)
from .capture import EmbeddingCapture
from .convexity import nonconvexity
from .curvature import curvature_from_neighbourhoods
from .dimension import intrinsic_dimension_from_neighbourhoods, participation_ratio, tle_pointwise
from .neighbours import Neighbourhoods, neighbourhoods, remove_duplicate_rows
from .shape import METRIC as SHAPE_SIMILARITY_METRIC
from .shape import shape_similarity_matrix
from .topology import holes
from .volume import volume

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

#: Metrics :func:`analyze` computes when ``metrics`` is not given. Curvature and intrinsic dimension share one kNN
#: search per class, and volume needs one decomposition, so they are cheap enough for every epoch.
DEFAULT_METRICS = ("curvature", "volume", "intrinsic_dimension")

#: Every metric name :func:`analyze` accepts, in the order reports list them.
AVAILABLE_METRICS = (
    "curvature",
    "volume",
    "density",
    "intrinsic_dimension",
    "participation_ratio",
    "holes",
    "holes_total_persistence",
    "holes_mean_persistence",
    "holes_density",
    "nonconvexity",
    "shape_similarity",
)

CURVATURE_METHODS = ("tangent", "reference")
ID_METHODS = ("tle", "mle", "twonn", "pr")

#: Field of :class:`pmg_torch.topology.HolesResult` behind each holes metric; one ripser run serves them all.
HOLES_FIELDS = {
    "holes": "count",
    "holes_total_persistence": "total_persistence",
    "holes_mean_persistence": "mean_persistence",
    "holes_density": "density",
}

#: Dimension of the random projections of nonconvexity, lowered to D when the embeddings have fewer columns.
NONCONVEXITY_COMPONENTS = 5

#: Tag component that :meth:`ManifoldReport.scalars` uses for the mean over classes, so no class may take it.
MEAN_TAG = "mean"

_NAN = float("nan")


@dataclass
class ManifoldReport:
    """The metrics of every class's perceptual manifold at one point of training.

    Attributes:
        classes: class labels, sorted.
        class_names: display name per label; ``str(label)`` unless :func:`analyze` got names.
        values: ``values[metric][label]``, a float, NaN where the metric is undefined for the class.
        n_samples: rows given per class, before cleaning.
        n_duplicates: rows per class that repeated an earlier finite row exactly. kNN metrics leave them out, the
            other metrics keep them.
        n_nonfinite: rows per class with NaN or infinity, left out of every metric.
        local_curvature: ``(n,)`` per-point curvature, on the CPU, for each class whose curvature was computed.
        similarity: ``(C, C)`` shape-similarity matrix in the order of ``classes``, when requested, else ``None``.
        persistence_diagrams: ``(b, 2)`` H1 diagram (birth, death) per class, when a holes metric was requested.
        settings: the arguments of :func:`analyze` that shaped the values.
    """

    classes: list[int]
    class_names: dict[int, str]
    values: dict[str, dict[int, float]]
    n_samples: dict[int, int]
    n_duplicates: dict[int, int]
    n_nonfinite: dict[int, int]
    local_curvature: dict[int, Tensor] = field(default_factory=dict)
    similarity: Tensor | None = None
    persistence_diagrams: dict[int, np.ndarray] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def metrics(self) -> list[str]:
        """Names of the metrics in the report, in order."""
        return list(self.values)

    def mean(self, metric: str) -> float:
        """Return the mean of ``metric`` over the classes where it is not NaN, or NaN if it is NaN everywhere.

        Raises:
            ValueError: if the report has no such metric.
        """
        if metric not in self.values:
            raise ValueError(f"The report has no metric {metric!r}; it has {self.metrics}.")
        defined = [value for value in self.values[metric].values() if not math.isnan(value)]
        return math.fsum(defined) / len(defined) if defined else _NAN

    def tag_names(self) -> dict[int, str]:
        """Return the class names as they appear in TensorBoard tags, one distinct name per label.

        Characters other than letters, digits, ``_``, ``.`` and ``-`` become ``_``. A name that is empty after that
        becomes the label, and a name that equals ``"mean"`` or an earlier class's tag name gets ``_<label>``
        appended.
        """
        tags: dict[int, str] = {}
        taken = {MEAN_TAG}
        for label in self.classes:
            tag = re.sub(r"[^A-Za-z0-9_.\-]", "_", self.class_names[label]) or str(label)
            while tag in taken:
                tag = f"{tag}_{label}"
            taken.add(tag)
            tags[label] = tag
        return tags

    def scalars(self, prefix: str = "pmg") -> dict[str, float]:
        """Return every value as a flat dict ``{"<prefix>/<metric>/<class>": value, "<prefix>/<metric>/mean": mean}``.

        NaN values are included; :func:`pmg_torch.tensorboard.write_report` leaves them out. ``<class>`` is the
        name from :meth:`tag_names`.
        """
        head = f"{prefix}/" if prefix else ""
        tags = self.tag_names()
        flat: dict[str, float] = {}
        for metric, per_class in self.values.items():
            for label in self.classes:
                flat[f"{head}{metric}/{tags[label]}"] = per_class[label]
            flat[f"{head}{metric}/{MEAN_TAG}"] = self.mean(metric)
        return flat

    def table(self, extra_columns: Mapping[str, Mapping[int, float]] | None = None) -> str:
        """Format the report as an aligned text table: one row per class, then a row of means.

        The columns are the class name, its row count, the duplicate and non-finite counts when any class has
        some, every metric, then ``extra_columns`` (for example per-class accuracy), which map a column title to
        values per label. Numbers have 4 significant digits, and a class missing from an extra column shows ``-``.
        """
        extra_columns = dict(extra_columns or {})
        header = ["class", "rows"]
        counts = [self.n_samples]
        for title, per_class in (("duplicates", self.n_duplicates), ("non-finite", self.n_nonfinite)):
            if any(per_class.values()):
                header.append(title)
                counts.append(per_class)
        columns = {**self.values, **extra_columns}
        header += list(columns)

        body = []
        for label in self.classes:
            cells = [self.class_names[label]] + [str(per_class[label]) for per_class in counts]
            cells += [_format_number(per_class.get(label)) for per_class in columns.values()]
            body.append(cells)
        means = [_nanmean(list(per_class.get(label, _NAN) for label in self.classes)) for per_class in columns.values()]
        body.append([MEAN_TAG] + [""] * len(counts) + [_format_number(value) for value in means])
        return _align([header, *body])

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain, JSON-serialisable types.

        Labels become string keys, NaN and infinities become ``None``, and tensors and arrays become nested lists.
        ``local_curvature`` is left out because of its size.
        """
        return {
            "classes": list(self.classes),
            "class_names": {str(label): name for label, name in self.class_names.items()},
            "values": {metric: _json_values(per_class) for metric, per_class in self.values.items()},
            "means": {metric: _json_number(self.mean(metric)) for metric in self.values},
            "n_samples": {str(label): n for label, n in self.n_samples.items()},
            "n_duplicates": {str(label): n for label, n in self.n_duplicates.items()},
            "n_nonfinite": {str(label): n for label, n in self.n_nonfinite.items()},
            "similarity": None if self.similarity is None else _json_array(self.similarity.cpu().numpy()),
            "persistence_diagrams": {
                str(label): _json_array(diagram) for label, diagram in self.persistence_diagrams.items()
            },
            "settings": dict(self.settings),
        }

    def to_tensorboard(
        self, writer: SummaryWriter, step: int, prefix: str = "pmg", accuracy: Mapping[int, float] | None = None
    ) -> None:
        """Write the report's scalars, histograms, figures and chart layout; see :func:`pmg_torch.write_report`.

        ``accuracy`` maps class labels to their accuracy; with it, per-class accuracy and the Spearman correlation
        of each metric with it are written too.
        """
        from .tensorboard import write_report

        write_report(writer, self, step, prefix=prefix, accuracy=accuracy)


class _Settings(NamedTuple):
    k: int
    tangent_dim: int | None
    curvature_method: str
    id_method: str
    volume_scale: float
    holes_threshold: float
    holes_max_points: int | None
    n_projections: int
    seed: int


def analyze(
    embeddings: Tensor | np.ndarray | Mapping[int, Tensor] | EmbeddingCapture,
    labels: Tensor | np.ndarray | Sequence[int] | None = None,
    *,
    k: int = 20,
    metrics: Sequence[str] | str | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    tangent_dim: int | None = None,
    curvature_method: str = "tangent",
    id_method: str = "tle",
    volume_scale: float = 1.0,
    holes_threshold: float = 0.1,
    holes_max_points: int | None = None,
    n_projections: int = 10,
    seed: int = 0,
) -> ManifoldReport:
    """Compute the requested metrics on each class's cloud of embeddings.

    Each class is cleaned first. Rows with NaN or infinity are left out of every metric, with one warning per
    class. Exact duplicate rows are left out of the kNN metrics only, which are curvature and the kNN estimators of
    intrinsic dimension; these search neighbours once per class and share the result. The other metrics see the
    finite rows, duplicates included, so their values equal a direct call such as ``volume(finite_rows)``.

    ``"shape_similarity"`` is a cross-class metric. The report holds the ``(C, C)`` matrix, and the per-class value
    is the mean similarity of the class to the *other* classes (NaN with fewer than two classes).

    Degenerate data never raises: a class with too few rows, identical rows or a failed decomposition gets NaN for
    the metrics it cannot support, with one :class:`DegenerateInputWarning` per class and computation that names the
    class, the metrics and the reason.

    Args:
        embeddings: ``(N, D)`` rows with ``labels``; or a mapping from label to ``(m, D)`` rows; or an
            :class:`EmbeddingCapture`. Every class must have the same ``D``. Tensors may live on any device.
        labels: ``(N,)`` integer labels, only with an ``(N, D)`` tensor.
        k: neighbours per point for curvature and the kNN intrinsic-dimension estimators.
        metrics: names from :data:`AVAILABLE_METRICS`, or ``"all"``; ``None`` means :data:`DEFAULT_METRICS`.
        class_names: display names, as a mapping from label or a sequence indexed by label.
        tangent_dim: tangent-space dimension for curvature; ``None`` lets :func:`pmg_torch.curvature` choose.
        curvature_method: ``"tangent"`` or ``"reference"``.
        id_method: ``"tle"``, ``"mle"``, ``"twonn"`` or ``"pr"`` for the ``"intrinsic_dimension"`` metric.
        volume_scale: the scale ``d`` of the volume, ``> 0``.
        holes_threshold: the persistence above which an H1 bar counts as a hole, ``>= 0``.
        holes_max_points: cap on the points given to ripser per class; ``None`` uses the default of
            :func:`pmg_torch.holes`.
        n_projections: random projections per class for nonconvexity. Each projects to
            ``min(5, D)`` dimensions; with ``D = 1`` nonconvexity is NaN.
        seed: seed of the holes subsample and the nonconvexity projections.

    Returns:
        A :class:`ManifoldReport` with the requested metrics, in the order of :data:`AVAILABLE_METRICS`.

    Raises:
        TypeError: if ``embeddings``, ``labels`` or ``class_names`` have the wrong type, or the rows are not floats.
        ValueError: if shapes disagree, ``labels`` come with a mapping or a capture, a metric name is unknown, or
            an argument is out of range.

    Warns:
        DegenerateInputWarning: once per class and computation that yields NaN or that warned about the data
            while still giving a value (nonconvexity skipping a projection, for one); once per class with
            non-finite rows; once if there are no classes at all (the report is then empty).

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> rows = torch.randn(90, 3, generator=generator) * torch.tensor([1.0, 1.0, 0.01])
        >>> labels = torch.arange(90) % 2
        >>> report = analyze(rows, labels, k=10, metrics=["volume", "participation_ratio"])
        >>> report.classes
        [0, 1]
        >>> [round(value) for value in report.values["participation_ratio"].values()]
        [2, 2]
    """
    clouds = _clouds_from(embeddings, labels)
    requested = _check_metrics(metrics)
    width = next((int(rows.shape[1]) for rows in clouds.values()), None)
    settings = _check_settings(
        _Settings(
            k=k,
            tangent_dim=tangent_dim,
            curvature_method=curvature_method,
            id_method=id_method,
            volume_scale=volume_scale,
            holes_threshold=holes_threshold,
            holes_max_points=holes_max_points,
            n_projections=n_projections,
            seed=seed,
        ),
        width,
    )
    classes = list(clouds)
    report = ManifoldReport(
        classes=classes,
        class_names=_display_names(classes, class_names),
        values={metric: {} for metric in requested},
        n_samples={label: int(clouds[label].shape[0]) for label in classes},
        n_duplicates={},
        n_nonfinite={},
        settings={"metrics": list(requested), **settings._asdict()},
    )
    if not classes:
        warnings.warn("analyze got no rows of any class, so the report is empty.", DegenerateInputWarning, stacklevel=2)
        return report

    messages: list[str] = []
    finite_clouds = {}
    for label in classes:
        finite_clouds[label] = _ClassAnalysis(report, label, settings, messages).run(clouds[label], requested)
    if "shape_similarity" in requested:
        _add_shape_similarity(report, finite_clouds, messages)
    # Issued here, not where they arise, so that each points at the caller's line.
    for message in messages:
        warnings.warn(message, DegenerateInputWarning, stacklevel=2)
    return report


def _clouds_from(embeddings: Any, labels: Any) -> dict[int, Tensor]:
    """Return ``{label: (m, D) rows}`` sorted by label from any input form that :func:`analyze` accepts."""
    if isinstance(embeddings, (EmbeddingCapture, Mapping)):
        if labels is not None:
            kind = "an EmbeddingCapture" if isinstance(embeddings, EmbeddingCapture) else "a mapping"
            raise ValueError(f"`labels` must be None when `embeddings` is {kind}, which already groups rows by class.")
        source = embeddings.embeddings if isinstance(embeddings, EmbeddingCapture) else embeddings
        clouds = {_check_label(label): _check_rows(rows, f"embeddings[{label!r}]") for label, rows in source.items()}
        if len(clouds) != len(source):
            raise ValueError(f"Expected distinct integer labels, got keys {list(source)}.")
    elif isinstance(embeddings, (Tensor, np.ndarray)):
        if labels is None:
            raise ValueError(
                "`labels` are required when `embeddings` is an (N, D) array; pass them, or pass a mapping from "
                "label to rows."
            )
        clouds = _split_by_label(_check_rows(embeddings, "embeddings"), labels)
    else:
        raise TypeError(
            "Expected `embeddings` to be an (N, D) tensor with labels, a mapping from label to (m, D) tensors, or an "
            f"EmbeddingCapture, got {type(embeddings).__name__}."
        )
    widths = {int(rows.shape[1]) for rows in clouds.values()}
    if len(widths) > 1:
        raise ValueError(f"Expected every class to have the same number of columns D, got {sorted(widths)}.")
    return {label: clouds[label] for label in sorted(clouds)}


def _check_label(label: Any) -> int:
    if isinstance(label, bool):
        raise TypeError(f"Expected integer class labels, got {label!r}.")
    try:
        return operator.index(label)
    except TypeError:
        raise TypeError(f"Expected integer class labels, got {type(label).__name__} ({label!r}).") from None


def _check_rows(rows: Any, name: str) -> Tensor:
    if isinstance(rows, np.ndarray):
        rows = torch.from_numpy(rows)
    if not isinstance(rows, Tensor):
        raise TypeError(f"Expected `{name}` to be a tensor of shape (m, D), got {type(rows).__name__}.")
    if not rows.is_floating_point():
        raise TypeError(f"Expected `{name}` to have a floating-point dtype, got {rows.dtype}.")
    if rows.ndim != 2 or rows.shape[1] < 1:
        raise ValueError(f"Expected `{name}` of shape (m, D) with D >= 1, got shape {tuple(rows.shape)}.")
    return rows.detach()


def _split_by_label(rows: Tensor, labels: Any) -> dict[int, Tensor]:
    labels = torch.as_tensor(labels).detach()
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected integer labels, got dtype {labels.dtype}.")
    if labels.shape != (rows.shape[0],):
        raise ValueError(
            f"Expected labels of shape ({rows.shape[0]},), one per row of embeddings, got {tuple(labels.shape)}."
        )
    labels = labels.to("cpu", torch.long)
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    groups = torch.split(order, counts.tolist())
    return {label: rows[group.to(rows.device)] for label, group in zip(classes.tolist(), groups, strict=True)}


def _check_metrics(metrics: Sequence[str] | str | None) -> tuple[str, ...]:
    if metrics is None:
        return DEFAULT_METRICS
    if metrics == "all":
        return AVAILABLE_METRICS
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [name for name in metrics if name not in AVAILABLE_METRICS]
    if unknown:
        raise ValueError(f"Unknown metric names {unknown}; the available metrics are {list(AVAILABLE_METRICS)}.")
    return tuple(name for name in AVAILABLE_METRICS if name in metrics)


def _check_settings(raw: _Settings, width: int | None) -> _Settings:
    """Validate the arguments of :func:`analyze`; ``width`` is the classes' common ``D``, if any class exists."""
    k = check_positive_int(raw.k, "k")
    if k < 2:
        raise ValueError(f"Expected `k` of at least 2, because the kNN estimators need two neighbours, got {k}.")
    tangent_dim = raw.tangent_dim
    if tangent_dim is not None:
        tangent_dim = check_positive_int(tangent_dim, "tangent_dim")
        limit = k if width is None else min(k, width)
        if tangent_dim > limit:
            raise ValueError(f"Expected `tangent_dim` of at most min(k, D) = {limit}, got {tangent_dim}.")
    holes_max_points = raw.holes_max_points
    if holes_max_points is not None:
        holes_max_points = check_positive_int(holes_max_points, "holes_max_points")
        if holes_max_points < 3:
            raise ValueError(
                "Expected `holes_max_points` of at least 3, the fewest points that enclose a hole, "
                f"got {holes_max_points}."
            )
    if isinstance(raw.seed, bool) or not isinstance(raw.seed, int):
        raise TypeError(f"Expected `seed` to be an int, got {type(raw.seed).__name__} ({raw.seed!r}).")
    return _Settings(
        k=k,
        tangent_dim=tangent_dim,
        curvature_method=check_choice(raw.curvature_method, "curvature_method", CURVATURE_METHODS),
        id_method=check_choice(raw.id_method, "id_method", ID_METHODS),
        volume_scale=check_positive_float(raw.volume_scale, "volume_scale"),
        holes_threshold=check_positive_float(raw.holes_threshold, "holes_threshold", allow_zero=True),
        holes_max_points=holes_max_points,
        n_projections=check_positive_int(raw.n_projections, "n_projections"),
        seed=raw.seed,
    )


def _display_names(classes: list[int], class_names: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    if class_names is None:
        return {label: str(label) for label in classes}
    if isinstance(class_names, Mapping):
        return {label: str(class_names.get(label, label)) for label in classes}
    if isinstance(class_names, Sequence) and not isinstance(class_names, str):
        return {label: str(class_names[label]) if 0 <= label < len(class_names) else str(label) for label in classes}
    raise TypeError(
        f"Expected `class_names` to be a mapping from label to name or a sequence of names, got "
        f"{type(class_names).__name__}."
    )


class _ClassAnalysis:
    """The metrics of one class, written into a report, with the warnings they raise collected in ``messages``."""

    def __init__(self, report: ManifoldReport, label: int, settings: _Settings, messages: list[str]) -> None:
        self.report = report
        self.label = label
        self.settings = settings
        self.messages = messages
        self.name = _describe_class(label, report.class_names[label])

    def run(self, rows: Tensor, requested: Sequence[str]) -> Tensor:
        """Fill in the class's counts and metrics, and return its finite rows."""
        report, label = self.report, self.label
        finite, n_nonfinite = drop_nonfinite_rows(rows)
        report.n_nonfinite[label] = n_nonfinite
        report.n_duplicates[label] = remove_duplicate_rows(finite)[1]
        for metric in requested:
            report.values[metric][label] = _NAN
        if finite.shape[0] == 0:
            # Shape similarity is left to the cross-class step, which issues its own warning for this class.
            per_class = [metric for metric in requested if metric != "shape_similarity"]
            if per_class:
                self.messages.append(_nan_message(self.name, per_class, f"none of its {rows.shape[0]} rows is finite"))
            return finite
        if n_nonfinite:
            self.messages.append(
                f"{self.name}: {n_nonfinite} of {rows.shape[0]} rows contain NaN or infinity and were left out of "
                "every metric."
            )
        self._add_knn_metrics(rows, requested)
        for metrics, computation in _cloud_computations(requested, self.settings):
            self.record(metrics, lambda computation=computation: computation(finite, self.settings))
        return finite

    def _add_knn_metrics(self, rows: Tensor, requested: Sequence[str]) -> None:
        """Add curvature and a kNN intrinsic dimension, which share one neighbour search."""
        knn_metrics = [
            metric
            for metric in requested
            if metric == "curvature" or (metric == "intrinsic_dimension" and self.settings.id_method != "pr")
        ]
        if not knn_metrics:
            return
        outcome = _capture(lambda: neighbourhoods(rows, self.settings.k))
        if outcome.result is None:
            self.messages.append(_nan_message(self.name, knn_metrics, "; ".join(outcome.notes)))
            return
        nb = outcome.result
        local_dimensions = None
        settings = self.settings
        if len(knn_metrics) == 2 and settings.id_method == "tle" and settings.curvature_method == "tangent":
            # Curvature's default tangent dimension is the rounded mean of the same pointwise TLE estimates.
            local_dimensions = _capture(lambda: tle_pointwise(nb)).result if settings.tangent_dim is None else None
        if "curvature" in knn_metrics:
            self.record(["curvature"], lambda: _curvature_values(nb, settings, local_dimensions))
        if "intrinsic_dimension" in knn_metrics:
            self.record(["intrinsic_dimension"], lambda: _knn_dimension_values(nb, settings, local_dimensions))

    def record(self, metrics: Sequence[str], compute: Callable[[], tuple[dict[str, float], Any]]) -> None:
        """Run one computation that serves ``metrics``, store its values and extras, and note one warning at most.

        ``compute`` returns the values by metric name and an extra (the local curvature or the H1 diagram).
        """
        outcome = _capture(compute, metrics)
        values, extra = outcome.result if outcome.result is not None else ({}, None)
        for metric in metrics:
            self.report.values[metric][self.label] = values.get(metric, _NAN)
        nan_metrics = [metric for metric in metrics if math.isnan(self.report.values[metric][self.label])]
        if nan_metrics:
            reason = "; ".join(outcome.notes) or "the computation returned NaN"
            self.messages.append(_nan_message(self.name, nan_metrics, reason))
        elif outcome.notes:
            self.messages.append(f"{', '.join(metrics)} of {self.name}: {'; '.join(outcome.notes)}")
        if isinstance(extra, Tensor):
            self.report.local_curvature[self.label] = extra.detach().to("cpu", torch.float32)
        elif isinstance(extra, np.ndarray):
            self.report.persistence_diagrams[self.label] = extra


def _cloud_computations(
    requested: Sequence[str], settings: _Settings
) -> list[tuple[list[str], Callable[[Tensor, _Settings], tuple[dict[str, float], Any]]]]:
    """Return the computations on finite rows that ``requested`` needs, each with the metrics it serves."""
    participation_metrics = ["participation_ratio"] + (["intrinsic_dimension"] if settings.id_method == "pr" else [])
    chosen = []
    for computation, served in (
        (_volume_values, ["volume", "density"]),
        (_participation_values, participation_metrics),
        (_holes_values, list(HOLES_FIELDS)),
        (_nonconvexity_values, ["nonconvexity"]),
    ):
        metrics = [metric for metric in requested if metric in served]
        if metrics:
            chosen.append((metrics, computation))
    return chosen


def _curvature_values(
    nb: Neighbourhoods, settings: _Settings, local_dimensions: Tensor | None
) -> tuple[dict[str, float], Tensor]:
    result = curvature_from_neighbourhoods(
        nb, method=settings.curvature_method, tangent_dim=settings.tangent_dim, local_dimensions=local_dimensions
    )
    return {"curvature": float(result.overall)}, result.local


def _knn_dimension_values(
    nb: Neighbourhoods, settings: _Settings, local_dimensions: Tensor | None
) -> tuple[dict[str, float], None]:
    value = intrinsic_dimension_from_neighbourhoods(nb, method=settings.id_method, local_dimensions=local_dimensions)
    return {"intrinsic_dimension": float(value)}, None


def _volume_values(finite: Tensor, settings: _Settings) -> tuple[dict[str, float], None]:
    result = volume(finite, d=settings.volume_scale)
    return {"volume": float(result.volume), "density": float(result.density)}, None


def _participation_values(finite: Tensor, settings: _Settings) -> tuple[dict[str, float], None]:
    ratio = float(participation_ratio(finite))
    return {"participation_ratio": ratio, "intrinsic_dimension": ratio}, None


def _holes_values(finite: Tensor, settings: _Settings) -> tuple[dict[str, float], np.ndarray]:
    limit = {} if settings.holes_max_points is None else {"max_points": settings.holes_max_points}
    result = holes(finite, threshold=settings.holes_threshold, seed=settings.seed, **limit)
    values = {metric: float(getattr(result, field_name)) for metric, field_name in HOLES_FIELDS.items()}
    return values, np.asarray(result.diagram, dtype=np.float64).reshape(-1, 2)


def _nonconvexity_values(finite: Tensor, settings: _Settings) -> tuple[dict[str, float], None]:
    width = finite.shape[1]
    if width < 2:
        raise DegenerateInputError("the embeddings have D = 1 column, and a convex hull needs at least 2 dimensions")
    n_components = min(NONCONVEXITY_COMPONENTS, width)
    value = nonconvexity(finite, n_projections=settings.n_projections, n_components=n_components, seed=settings.seed)
    return {"nonconvexity": float(value)}, None


def _add_shape_similarity(report: ManifoldReport, finite_clouds: Mapping[int, Tensor], messages: list[str]) -> None:
    """Fill the similarity matrix and each class's mean similarity to the other classes."""
    classes = report.classes
    matrix = torch.full((len(classes), len(classes)), _NAN, dtype=torch.float64)
    usable = [i for i, label in enumerate(classes) if finite_clouds[label].shape[0] > 0]
    messages_by_class: dict[int, list[str]] = {}
    if len(usable) > 1:
        outcome = _capture(lambda: shape_similarity_matrix({classes[i]: finite_clouds[classes[i]] for i in usable}))
        if outcome.result is not None:
            index = torch.tensor(usable)
            matrix[index[:, None], index[None, :]] = outcome.result.detach().to("cpu", torch.float64)
        # shape_similarity_matrix names the class in each warning, through the same `describe` helper.
        for label in classes:
            head = f"{describe(SHAPE_SIMILARITY_METRIC, label)} is NaN: "
            own = [m.removeprefix(head) for m in outcome.messages if m.startswith(head)]
            # A computation that failed outright names no class, so every class gets its reason.
            messages_by_class[label] = own or (outcome.notes if outcome.result is None else [])
    report.similarity = matrix

    off_diagonal = ~torch.eye(len(classes), dtype=torch.bool)
    for row, label in enumerate(classes):
        others = matrix[row][off_diagonal[row]]
        others = others[~others.isnan()]
        if others.numel():
            report.values["shape_similarity"][label] = float(others.mean())
            continue
        if len(classes) < 2:
            reason = "it is the only class, and the metric compares a class with the others"
        elif finite_clouds[label].shape[0] == 0:
            reason = "it has no finite rows"
        else:
            reason = "; ".join(messages_by_class.get(label, [])) or "its similarity to every other class is undefined"
        messages.append(_nan_message(_describe_class(label, report.class_names[label]), ["shape_similarity"], reason))


# -- warnings ------------------------------------------------------------------------------------------------------


class _Outcome(NamedTuple):
    result: Any
    notes: list[str]
    messages: list[str]


def _capture(compute: Callable[[], Any], metrics: Sequence[str] = ()) -> _Outcome:
    """Run ``compute`` and return its result (``None`` on :class:`DegenerateInputError`) and what it reported.

    ``notes`` are the error's reason and the text of each :class:`DegenerateInputWarning` it issued, stripped of
    the ``"<metric> is NaN: "`` or ``"<metric>: "`` head, so that the caller can issue one warning that also names
    the class. ``messages`` are those warnings' full texts. Other warnings pass through unchanged.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result, notes = compute(), []
        except DegenerateInputError as error:
            result, notes = None, [error.reason]
        except torch.linalg.LinAlgError as error:
            # LAPACK can fail to converge on finite rows of extreme magnitude, whose Gram matrices overflow. That is
            # a failed decomposition of this class's data, so its metrics become NaN like any degenerate case.
            result, notes = None, [f"a decomposition failed ({error})"]
    messages = []
    for warning in caught:
        if not issubclass(warning.category, DegenerateInputWarning):
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        message = str(warning.message)
        messages.append(message)
        note = message.split(" is NaN: ", 1)[-1]
        for metric in metrics:
            note = note.removeprefix(f"{metric}: ")
        notes.append(note.rstrip("."))
    return _Outcome(result, notes, messages)


def _describe_class(label: int, display_name: str) -> str:
    return f"class {label}" if display_name == str(label) else f"class {label} ({display_name})"


def _nan_message(name: str, metrics: Sequence[str], reason: str) -> str:
    verb = "is" if len(metrics) == 1 else "are"
    return f"{', '.join(metrics)} of {name} {verb} NaN: {reason}"


# -- formatting ----------------------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float]) -> float:
    defined = [value for value in values if not math.isnan(value)]
    return math.fsum(defined) / len(defined) if defined else _NAN


def _format_number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.4g}"


def _align(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _json_values(per_class: Mapping[int, float]) -> dict[str, float | None]:
    return {str(label): _json_number(value) for label, value in per_class.items()}


def _json_array(array: np.ndarray) -> list[Any]:
    return np.where(np.isfinite(array), array, None).tolist()
