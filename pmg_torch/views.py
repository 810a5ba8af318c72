"""TensorBoard views of a report beyond its scalars: the custom-scalars layout and the figures.

The custom-scalars layout puts every class of one metric on one chart. TensorBoard draws all lines of one run in
the run's colour there. It distinguishes the lines by marker shape (five shapes, used in turn) and lists each tag
with its marker under the chart's "Matches". Hovering over the chart shows each class's value by name. The
figures name the classes outright: each epoch has one bar chart per metric with the class names on the axis, the
class-by-class shape-similarity heatmap, a scatter of each metric against per-class accuracy, and the H1
persistence diagram of each class when holes were computed.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .accuracy import ACCURACY_TAG, SPEARMAN_TAG, spearman_correlation
from .figures import custom_scalars_layout, metric_bars, persistence_diagram, similarity_heatmap

if TYPE_CHECKING:
    from .analysis import ManifoldReport
    from .figures import ReportLike

__all__ = ["geometry_accuracy_figure", "scalars_layout", "write_figures", "write_layout"]

#: Tag component under which every figure is written: ``<prefix>/figures/<name>``.
FIGURES_TAG = "figures"

#: Width and height in inches of one panel of :func:`geometry_accuracy_figure`.
PANEL_SIZE = 3.4

#: Most panels side by side in :func:`geometry_accuracy_figure`.
MAX_PANEL_COLUMNS = 2


class FigureWriter(Protocol):
    """The part of ``torch.utils.tensorboard.SummaryWriter`` that this module uses."""

    def add_figure(self, tag: str, figure: Figure, global_step: int | None = None, close: bool = True) -> None: ...

    def add_custom_scalars(self, layout: dict[str, Any]) -> None: ...


# Metrics and class tags of the latest layout sent to each writer, so that a layout is written once per writer and
# again only when a later report adds metrics or classes. Weak keys let closed writers go.
_laid_out: weakref.WeakKeyDictionary[Any, tuple[list[str], list[str], bool]] = weakref.WeakKeyDictionary()


def scalars_layout(
    metrics: Sequence[str], class_tags: Sequence[str], prefix: str = "pmg", accuracy: bool = False
) -> dict[str, dict[str, list[Any]]]:
    """Build the custom-scalars layout: one chart per metric with every class and the mean, in one category.

    The metric charts come from :func:`pmg_torch.figures.custom_scalars_layout`. With ``accuracy`` the category
    also gets a chart of ``<prefix>/accuracy/<class>`` and one of every ``<prefix>/spearman/<metric>``.

    Args:
        metrics: metric names, in chart order.
        class_tags: class names as they appear in the tags, from :meth:`ManifoldReport.tag_names`.
        prefix: the tag prefix the scalars were written under.
        accuracy: whether per-class accuracy and the rank correlations are written too.

    Returns:
        ``{prefix: {chart_title: ["Multiline", [regex]]}}``, the argument of ``SummaryWriter.add_custom_scalars``.

    Raises:
        ValueError: if ``metrics`` is empty or repeats a name, or ``prefix`` is empty.
    """
    layout = custom_scalars_layout(metrics, class_tags, prefix)
    if accuracy:
        charts = layout[prefix]
        head = re.escape(prefix)
        charts[f"{ACCURACY_TAG} per class and its mean over classes"] = ["Multiline", [f"{head}/{ACCURACY_TAG}/.*"]]
        charts["Spearman correlation of each metric with per-class accuracy"] = [
            "Multiline",
            [f"{head}/{SPEARMAN_TAG}/.*"],
        ]
    return layout


def write_layout(
    writer: FigureWriter,
    metrics: Sequence[str],
    class_tags: Sequence[str],
    prefix: str = "pmg",
    accuracy: bool = False,
) -> bool:
    """Write the :func:`scalars_layout` to ``writer`` unless it already has one that covers these charts.

    A writer gets its layout on the first call. A later call writes a new layout, with the metrics and classes of
    every call so far, only when it brings a metric or a class the writer's layout lacks. TensorBoard shows the
    latest layout of each run.

    Args:
        writer: a ``SummaryWriter``, or any object with its ``add_custom_scalars`` method.
        metrics: metric names of this report.
        class_tags: class names as they appear in the tags.
        prefix: the tag prefix the scalars were written under.
        accuracy: whether the accuracy and Spearman charts belong in the layout.

    Returns:
        Whether a layout was written.
    """
    previous = _previous_layout(writer)
    if previous is not None:
        known_metrics, known_classes, known_accuracy = previous
        metrics = known_metrics + [metric for metric in metrics if metric not in known_metrics]
        class_tags = known_classes + [tag for tag in class_tags if tag not in known_classes]
        accuracy = accuracy or known_accuracy
        if (len(metrics), len(class_tags), accuracy) == (len(known_metrics), len(known_classes), known_accuracy):
            return False
    writer.add_custom_scalars(scalars_layout(metrics, class_tags, prefix, accuracy))
    try:
        _laid_out[writer] = (list(metrics), list(class_tags), accuracy)
    except TypeError:
        # A writer that cannot be weakly referenced gets the layout again on every call.
        pass
    return True


def _previous_layout(writer: Any) -> tuple[list[str], list[str], bool] | None:
    try:
        return _laid_out.get(writer)
    except TypeError:
        return None


def write_figures(
    writer: FigureWriter,
    report: ManifoldReport,
    step: int,
    prefix: str = "pmg",
    accuracy: Mapping[int, float] | None = None,
) -> list[str]:
    """Draw the report's figures and write each as an image at ``step``.

    The images, under ``<prefix>/figures/``:

    * ``<metric>``: a bar per class of each metric, with the mean over classes as a line;
    * ``accuracy`` and ``geometry_vs_accuracy``: the per-class accuracy as bars, and every metric against it, when
      ``accuracy`` is given;
    * ``shape_similarity_matrix``: the class-by-class heatmap, when the report has one;
    * ``h1_<class>``: the H1 persistence diagram of each class, when a holes metric was computed.

    Args:
        writer: a ``SummaryWriter``, or any object with its ``add_figure`` method.
        report: the report to draw.
        step: the global step to write at.
        prefix: first component of every tag.
        accuracy: accuracy per class label, or ``None``.

    Returns:
        The tags written, in order.
    """
    head = f"{prefix}/{FIGURES_TAG}" if prefix else FIGURES_TAG
    names = report.tag_names()
    figures: dict[str, Figure] = {}
    # ManifoldReport has the attributes of ReportLike as plain dicts, which mypy does not match to its Mappings.
    bars_source = cast("ReportLike", report)
    for metric in report.values:
        if report.values[metric]:
            figures[f"{head}/{metric}"] = metric_bars(bars_source, metric)
    shared = [label for label in report.classes if accuracy is not None and label in accuracy]
    if accuracy is not None and shared:
        by_name = {report.class_names[label]: float(accuracy[label]) for label in shared}
        figures[f"{head}/{ACCURACY_TAG}"] = metric_bars(by_name, ACCURACY_TAG)
        if report.values:
            figures[f"{head}/geometry_vs_accuracy"] = geometry_accuracy_figure(report, accuracy)
    if report.similarity is not None and report.classes:
        display = [report.class_names[label] for label in report.classes]
        figures[f"{head}/shape_similarity_matrix"] = similarity_heatmap(report.similarity, display)
    threshold = float(report.settings.get("holes_threshold", 0.0))
    for label, diagram in report.persistence_diagrams.items():
        title = f"H1 persistence, class {report.class_names[label]}"
        figures[f"{head}/h1_{names[label]}"] = persistence_diagram(diagram, threshold, title)
    for tag, figure in figures.items():
        writer.add_figure(tag, figure, step, close=True)
    return list(figures)


def geometry_accuracy_figure(report: ManifoldReport, accuracy: Mapping[int, float]) -> Figure:
    """Plot each metric of the report against per-class accuracy, one panel per metric, one labelled dot per class.

    Each panel's title gives the metric's :func:`pmg_torch.accuracy.spearman_correlation` with accuracy over the
    classes, or "ρ undefined" (fewer than 3 classes with both values, or a constant side). Classes whose value is NaN
    have no dot.

    Args:
        report: the geometry of the classes.
        accuracy: accuracy per class label.

    Returns:
        The figure, with one axes per metric of the report in report order.

    Raises:
        ValueError: if the report has no metrics.
    """
    metrics = list(report.values)
    if not metrics:
        raise ValueError("Expected a report with at least one metric, got none.")
    labels = [label for label in report.classes if label in accuracy]
    n_columns = min(len(metrics), MAX_PANEL_COLUMNS)
    n_rows = math.ceil(len(metrics) / n_columns)
    figure = Figure(figsize=(PANEL_SIZE * n_columns, PANEL_SIZE * n_rows), layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(n_rows, n_columns, squeeze=False).flatten()
    accuracies = np.array([accuracy[label] for label in labels], dtype=np.float64)
    for panel, metric in zip(panels, metrics, strict=False):
        values = np.array([report.values[metric].get(label, math.nan) for label in labels], dtype=np.float64)
        plotted = np.isfinite(values) & np.isfinite(accuracies)
        panel.scatter(values[plotted], accuracies[plotted], s=18, color="tab:blue")
        for index in np.flatnonzero(plotted):
            name = report.class_names[labels[index]]
            point = (values[index], accuracies[index])
            panel.annotate(name, point, textcoords="offset points", xytext=(3, 3), fontsize=8)
        rho = spearman_correlation(values, accuracies)
        panel.set_title(f"{metric}\nSpearman ρ = {rho:.2f}" if math.isfinite(rho) else f"{metric}\nρ undefined")
        panel.set_xlabel(metric)
        panel.set_ylabel("accuracy")
    for panel in panels[len(metrics) :]:
        panel.set_visible(False)
    return figure
