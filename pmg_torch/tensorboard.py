"""Write a :class:`pmg_torch.ManifoldReport` to TensorBoard.

Tags follow one scheme, ``<prefix>/<metric>/<class>`` and ``<prefix>/<metric>/mean`` for scalars and
``<prefix>/local_curvature/<class>`` for histograms, with ``<class>`` from
:meth:`pmg_torch.ManifoldReport.tag_names`. Each kind of output has its own small function. Figures and the
custom-scalars layout are drawn in :mod:`pmg_torch.views`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from .accuracy import accuracy_scalars
from .views import FigureWriter, write_figures, write_layout

if TYPE_CHECKING:
    from .analysis import ManifoldReport

logger = logging.getLogger(__name__)


class ScalarHistogramWriter(Protocol):
    """The part of ``torch.utils.tensorboard.SummaryWriter`` that writes scalars and histograms."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None: ...

    def add_histogram(self, tag: str, values: Tensor, global_step: int | None = None) -> None: ...


class ReportWriter(ScalarHistogramWriter, FigureWriter, Protocol):
    """The part of ``torch.utils.tensorboard.SummaryWriter`` that :func:`write_report` uses."""


def write_report(
    writer: ReportWriter,
    report: ManifoldReport,
    step: int,
    prefix: str = "pmg",
    histograms: bool = True,
    *,
    scalars: bool = True,
    figures: bool = True,
    layout: bool = True,
    accuracy: Mapping[int, float] | None = None,
) -> None:
    """Write a report's scalars, per-class local-curvature histograms, figures and chart layout at ``step``.

    Only finite values are written. A NaN scalar marks a class the metric is undefined for, which :func:`analyze`
    has already warned about, so it is skipped and that class's curve has no point at this step. NaN or infinite
    local curvatures are left out of a histogram. How many values were left out is logged at INFO level through
    this module's logger. The writer is not flushed.

    With ``accuracy``, the scalars also include ``<prefix>/accuracy/<class>``, their mean, and the Spearman
    correlation of each metric with accuracy over the classes, ``<prefix>/spearman/<metric>``
    (:func:`pmg_torch.accuracy.accuracy_scalars`). The figures are those of :func:`pmg_torch.views.write_figures`.
    The custom-scalars layout (:func:`pmg_torch.views.write_layout`) is written on the first call for a writer,
    and again only when a report brings metrics or classes that the writer's layout lacks.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``, or any object with its ``add_scalar`` and
            ``add_histogram`` methods, plus ``add_figure`` for ``figures`` and ``add_custom_scalars`` for
            ``layout``.
        report: the report to write.
        step: the global step to write at, ``>= 0``.
        prefix: first component of every tag.
        histograms: whether to write the local-curvature histograms.
        scalars: whether to write the scalars; turn off when they reach TensorBoard another way.
        figures: whether to draw and write the figures, measured at 0.1 to 0.3 s per figure on a 2-core CPU.
        layout: whether to write the custom-scalars layout.
        accuracy: accuracy per class label, e.g. from :class:`pmg_torch.ClassAccuracy`, or ``None``.

    Raises:
        TypeError: if ``step`` is not an int.
        ValueError: if ``step`` is negative.
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise TypeError(f"Expected `step` to be an int, got {type(step).__name__} ({step!r}).")
    if step < 0:
        raise ValueError(f"Expected `step` to be at least 0, got {step}.")
    if scalars:
        write_scalars(writer, report, step, prefix)
        if accuracy is not None:
            for tag, value in accuracy_scalars(report, accuracy, prefix).items():
                writer.add_scalar(tag, value, step)
    if histograms:
        write_local_curvature_histograms(writer, report, step, prefix)
    if layout and report.values:
        write_layout(writer, report.metrics, list(report.tag_names().values()), prefix, accuracy is not None)
    if figures:
        write_figures(writer, report, step, prefix, accuracy)


def write_scalars(writer: ScalarHistogramWriter, report: ManifoldReport, step: int, prefix: str = "pmg") -> int:
    """Write every finite scalar of :meth:`ManifoldReport.scalars` and return how many were written."""
    n_written = 0
    left_out = []
    for tag, value in report.scalars(prefix).items():
        if math.isfinite(value):
            writer.add_scalar(tag, value, step)
            n_written += 1
        else:
            left_out.append(tag)
    if left_out:
        logger.info(
            "Left %d non-finite scalars out of TensorBoard at step %d: %s", len(left_out), step, ", ".join(left_out)
        )
    return n_written


def write_local_curvature_histograms(
    writer: ScalarHistogramWriter, report: ManifoldReport, step: int, prefix: str = "pmg"
) -> int:
    """Write one histogram of finite local curvatures per class and return how many histograms were written."""
    head = f"{prefix}/" if prefix else ""
    tags = report.tag_names()
    n_written = 0
    for label, local in report.local_curvature.items():
        local = local.detach().to("cpu", torch.float64).flatten()
        finite = local[torch.isfinite(local)]
        n_left_out = local.numel() - finite.numel()
        tag = f"{head}local_curvature/{tags[label]}"
        if n_left_out:
            logger.info(
                "Left %d of %d non-finite local curvatures out of %s at step %d", n_left_out, local.numel(), tag, step
            )
        if finite.numel():
            writer.add_histogram(tag, finite, step)
            n_written += 1
    return n_written
