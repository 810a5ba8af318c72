"""Matplotlib figures of a per-class report, and the custom-scalars layout, for TensorBoard.

Every figure function returns a :class:`matplotlib.figure.Figure` built directly on the Agg canvas, not through
``pyplot``. Pyplot's figure manager never registers such a figure, so nothing opens a window. A callback that draws
new figures every epoch accumulates nothing, because each figure is garbage-collected once the caller drops it.
``SummaryWriter.add_figure(tag, figure, step)`` renders a figure, and ``matplotlib.pyplot.close(figure)`` on it is
harmless.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Colormap
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["custom_scalars_layout", "metric_bars", "persistence_diagram", "similarity_heatmap"]

#: Largest number of classes whose heatmap cells get their value written in them; beyond it the text overlaps.
MAX_ANNOTATED_CLASSES = 20

#: Class names listed in a custom-scalars chart title before the rest are summarised as "and N more".
MAX_TITLE_CLASSES = 5

_NAN_COLOUR = "0.8"
_ABOVE_THRESHOLD_COLOUR = "tab:red"
_BAR_COLOUR = "tab:blue"


class ReportLike(Protocol):
    """The part of :class:`pmg_torch.ManifoldReport` that :func:`metric_bars` reads."""

    values: Mapping[str, Mapping[int, float]]
    class_names: Mapping[int, str]


def _new_figure(width: float, height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


def _text_colour(cmap: Colormap, fraction: float) -> str:
    """Return black or white, whichever reads better on the colour ``cmap(fraction)``."""
    red, green, blue, _ = cmap(fraction)
    luminance = 0.299 * red + 0.587 * green + 0.114 * blue
    return "black" if luminance > 0.5 else "white"


def similarity_heatmap(matrix: Tensor | np.ndarray, class_names: Sequence[str]) -> Figure:
    """Draw the class-by-class shape-similarity matrix as a heatmap.

    Cell ``(i, j)`` is ``S_ij = sum_c |v_c(i) . v_c(j)|``, the summed absolute cosines between the c-th covariance
    eigenvectors of classes i and j. Rows and columns follow ``class_names``. With at most
    :data:`MAX_ANNOTATED_CLASSES` classes every cell shows its value. NaN cells are grey and read "NaN".

    Args:
        matrix: ``(C, C)`` similarity matrix, as a tensor on any device or a numpy array.
        class_names: ``C`` display names, in the order of the matrix rows.

    Returns:
        The figure, with one image, a colour bar and the class names on both axes.

    Raises:
        ValueError: if ``matrix`` is not square or ``class_names`` does not have one name per row.
    """
    values = _as_numpy(matrix)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"Expected `matrix` of shape (C, C), got shape {tuple(values.shape)}.")
    n_classes = values.shape[0]
    if len(class_names) != n_classes:
        raise ValueError(f"Expected one class name per matrix row ({n_classes}), got {len(class_names)} names.")

    side = min(4.0 + 0.4 * n_classes, 16.0)
    figure, axes = _new_figure(side + 1.0, side)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if low == high:
        high = low + 1.0
    cmap = colormaps["viridis"].with_extremes(bad=_NAN_COLOUR)
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=low, vmax=high)
    figure.colorbar(image, ax=axes, label="shape similarity")

    positions = np.arange(n_classes)
    axes.set_xticks(positions, labels=list(class_names), rotation=45, ha="right", rotation_mode="anchor")
    axes.set_yticks(positions, labels=list(class_names))
    axes.set_xlabel("class")
    axes.set_ylabel("class")
    axes.set_title("Shape similarity between classes")

    if n_classes <= MAX_ANNOTATED_CLASSES:
        _annotate_cells(axes, values, cmap, low, high)
    return figure


def _annotate_cells(axes: Axes, values: np.ndarray, cmap: Colormap, low: float, high: float) -> None:
    font_size = 9 if values.shape[0] <= 10 else 7
    for (row, column), value in np.ndenumerate(values):
        if np.isfinite(value):
            colour = _text_colour(cmap, (value - low) / (high - low))
        else:
            colour = "black"
        axes.text(column, row, _format_value(float(value)), ha="center", va="center", color=colour, fontsize=font_size)


def metric_bars(report_or_values: ReportLike | Mapping[str, float], metric: str) -> Figure:
    """Draw one bar per class for ``metric``, with the mean over classes as a horizontal line.

    A class whose value is NaN or infinite has no bar: a hatched grey stub marks its place and is labelled with the
    value. The mean line is the mean of the finite values, so it matches ``ManifoldReport.mean`` whenever the only
    non-finite values are NaN, and it is left out when no value is finite.

    Args:
        report_or_values: a :class:`pmg_torch.ManifoldReport`, whose ``values[metric]`` is read and labelled with
            its ``class_names``, or a mapping from class display name to value.
        metric: the metric name, used for the axis label and, with a report, to choose the values.

    Returns:
        The figure, with one bar patch per class in mapping order (stubs included).

    Raises:
        KeyError: if a report is given and it has no values for ``metric``.
        ValueError: if there are no classes.
    """
    values = _values_by_name(report_or_values, metric)
    if not values:
        raise ValueError(f"Expected at least one class value for {metric!r}, got none.")
    names = list(values)
    heights = np.array([float(values[name]) for name in names], dtype=np.float64)
    finite = np.isfinite(heights)

    figure, axes = _new_figure(min(3.0 + 0.45 * len(names), 16.0), 4.0)
    positions = np.arange(len(names))
    bars = axes.bar(positions, np.where(finite, heights, 0.0), color=_BAR_COLOUR)
    _mark_missing_bars(axes, bars, heights, finite)

    if finite.any():
        mean = float(heights[finite].mean())
        axes.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean = {_format_value(mean)}")
        axes.legend(loc="best")
    axes.axhline(0.0, color="0.5", linewidth=0.5)
    axes.set_xticks(positions, labels=names, rotation=45, ha="right", rotation_mode="anchor")
    axes.set_xlabel("class")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per class")
    return figure


def _values_by_name(report_or_values: ReportLike | Mapping[str, float], metric: str) -> dict[str, float]:
    if isinstance(report_or_values, Mapping):
        return {str(name): float(value) for name, value in report_or_values.items()}
    if metric not in report_or_values.values:
        raise KeyError(f"The report has no values for {metric!r}; its metrics are {list(report_or_values.values)}.")
    per_label = report_or_values.values[metric]
    return {report_or_values.class_names.get(label, str(label)): float(value) for label, value in per_label.items()}


def _mark_missing_bars(axes: Axes, bars: Any, heights: np.ndarray, finite: np.ndarray) -> None:
    """Replace the zero-height bars of non-finite values by labelled, hatched stubs a tenth of the axis high."""
    if finite.all():
        return
    finite_heights = heights[finite]
    stub = 0.1 * float(np.abs(finite_heights).max()) if finite_heights.size and finite_heights.any() else 0.1
    for bar, height, is_finite in zip(bars, heights, finite, strict=True):
        if is_finite:
            continue
        bar.set_height(stub)
        bar.set_facecolor(_NAN_COLOUR)
        bar.set_hatch("//")
        bar.set_edgecolor("0.4")
        axes.annotate(
            _format_value(float(height)),
            (bar.get_x() + bar.get_width() / 2, stub),
            textcoords="offset points",
            xytext=(0, 2),
            ha="center",
            va="bottom",
            fontsize=8,
        )


def persistence_diagram(diagram: np.ndarray | Tensor, threshold: float, title: str) -> Figure:
    """Draw a persistence diagram: one point per bar at (birth, death), with the diagonal and the hole threshold.

    Bars with persistence ``death - birth > threshold``, the ones counted as holes, are drawn in red; the rest in
    grey. The dashed line ``death = birth + threshold`` separates the two. Bars that never die (infinite death)
    are drawn on a line at the top of the plot, labelled "inf". An empty diagram gives the axes, the diagonal and
    the note "no bars".

    Args:
        diagram: ``(b, 2)`` births and deaths, e.g. one class's H1 diagram from the report.
        threshold: the persistence above which a bar counts as a hole, in the units of the embedding distances.
        title: the axes title, e.g. ``"H1 persistence, class cat"``.

    Returns:
        The figure. Its axes hold at most two scatter collections: holes first (when any), then the other bars.

    Raises:
        ValueError: if ``diagram`` is not of shape ``(b, 2)``, contains NaN, or ``threshold`` is negative or not
            finite.
    """
    points = _as_numpy(diagram).astype(np.float64, copy=False)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"Expected `diagram` of shape (b, 2), got shape {tuple(points.shape)}.")
    if np.isnan(points).any():
        raise ValueError("Expected `diagram` without NaN births or deaths, got at least one NaN.")
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"Expected `threshold` to be a finite number >= 0, got {threshold}.")

    figure, axes = _new_figure(4.5, 4.5)
    births, deaths = points[:, 0], points[:, 1]
    finite_values = points[np.isfinite(points)]
    low = min(0.0, float(finite_values.min())) if finite_values.size else 0.0
    high = float(finite_values.max()) if finite_values.size else 1.0
    high = max(high, low + threshold, low + 1e-12) * 1.05
    infinite_death = np.isinf(deaths)
    if infinite_death.any():
        top = high * 1.1
        deaths = np.where(infinite_death, top, deaths)
        axes.axhline(top, color="0.5", linestyle=":", linewidth=1)
        axes.annotate("inf", (low, top), textcoords="offset points", xytext=(2, 2), fontsize=8, color="0.3")
        high = top * 1.05

    is_hole = deaths - births > threshold
    if is_hole.any():
        axes.scatter(
            births[is_hole],
            deaths[is_hole],
            s=20,
            color=_ABOVE_THRESHOLD_COLOUR,
            label=f"persistence > {threshold:g} ({is_hole.sum()})",
        )
    if (~is_hole).any():
        axes.scatter(
            births[~is_hole],
            deaths[~is_hole],
            s=12,
            color="0.4",
            label=f"persistence <= {threshold:g} ({(~is_hole).sum()})",
        )
    axes.plot([low, high], [low, high], color="black", linewidth=1)
    axes.plot(
        [low, high - threshold], [low + threshold, high], color=_ABOVE_THRESHOLD_COLOUR, linestyle="--", linewidth=1
    )
    if points.shape[0] == 0:
        axes.text(0.5, 0.5, "no bars", transform=axes.transAxes, ha="center", va="center", color="0.3")
    else:
        axes.legend(loc="lower right", fontsize=8)

    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_aspect("equal")
    axes.set_xlabel("birth")
    axes.set_ylabel("death")
    axes.set_title(title)
    return figure


def custom_scalars_layout(
    metrics: Sequence[str], class_names: Sequence[str], prefix: str = "pmg"
) -> dict[str, dict[str, list[Any]]]:
    """Build the layout that ``SummaryWriter.add_custom_scalars`` takes: one Multiline chart per metric.

    The layout has one category, named ``prefix``, and in it one chart per metric whose only tag pattern is the
    regular expression ``<prefix>/<metric>/.*``. TensorBoard treats each entry of a Multiline chart as a regular
    expression, so the chart collects ``<prefix>/<metric>/<class>`` for every class and ``<prefix>/<metric>/mean``.
    Because all lines of one run share a colour in such a chart, the title of each chart names the first classes
    it plots.

    Args:
        metrics: metric names, as in ``ManifoldReport.values``.
        class_names: class names as they appear in the scalar tags, e.g. ``list(report.tag_names().values())``.
            The first :data:`MAX_TITLE_CLASSES` of them go into each chart title.
        prefix: the tag prefix the scalars were written under.

    Returns:
        ``{prefix: {chart_title: ["Multiline", [regex]]}}`` with one chart per metric, in order.

    Raises:
        ValueError: if ``metrics`` is empty or repeats a name, or ``prefix`` is empty.
    """
    if not prefix:
        raise ValueError("Expected a non-empty `prefix`, got ''.")
    if not metrics:
        raise ValueError("Expected at least one metric name, got none.")
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"Expected distinct metric names, got {list(metrics)}.")
    title_suffix = _list_classes(class_names)
    charts: dict[str, list[Any]] = {}
    for metric in metrics:
        pattern = f"{re.escape(prefix)}/{re.escape(metric)}/.*"
        charts[f"{metric} per class{title_suffix}"] = ["Multiline", [pattern]]
    return {prefix: charts}


def _list_classes(class_names: Sequence[str]) -> str:
    if not class_names:
        return ""
    listed = ", ".join(str(name) for name in class_names[:MAX_TITLE_CLASSES])
    if len(class_names) > MAX_TITLE_CLASSES:
        listed += f" and {len(class_names) - MAX_TITLE_CLASSES} more"
    return f": {listed}"


def _as_numpy(array: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, Tensor):
        return array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)
