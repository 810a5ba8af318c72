"""Tests for the report figures and the custom-scalars layout, read back through TensorBoard's own reader."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import ripser
import torch
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

import pmg_torch
from pmg_torch.figures import (
    MAX_ANNOTATED_CLASSES,
    custom_scalars_layout,
    metric_bars,
    persistence_diagram,
    similarity_heatmap,
)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def cell_texts(figure: Figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].texts]


def tick_labels(labels) -> list[str]:
    return [label.get_text() for label in labels]


# similarity_heatmap


def test_heatmap_draws_matrix_with_names():
    matrix = torch.tensor([[3.0, 1.5, 0.25], [1.5, 3.0, 2.0], [0.25, 2.0, 3.0]])
    names = ["cat", "dog", "bird"]
    figure = similarity_heatmap(matrix, names)
    axes = figure.axes[0]
    assert isinstance(figure, Figure)
    assert len(axes.images) == 1
    np.testing.assert_array_equal(axes.images[0].get_array(), matrix.numpy())
    assert tick_labels(axes.get_xticklabels()) == names
    assert tick_labels(axes.get_yticklabels()) == names
    assert len(figure.axes) == 2  # the heatmap and its colour bar


def test_heatmap_annotates_every_cell_row_major():
    matrix = np.array([[1.0, 0.5], [0.5, 1.0]])
    figure = similarity_heatmap(matrix, ["a", "b"])
    assert cell_texts(figure) == ["1", "0.5", "0.5", "1"]
    positions = [text.get_position() for text in figure.axes[0].texts]
    assert positions == [(0, 0), (1, 0), (0, 1), (1, 1)]


def test_heatmap_skips_annotation_above_limit():
    n_classes = MAX_ANNOTATED_CLASSES + 1
    figure = similarity_heatmap(np.eye(n_classes), [str(i) for i in range(n_classes)])
    assert cell_texts(figure) == []
    at_limit = similarity_heatmap(np.eye(MAX_ANNOTATED_CLASSES), [str(i) for i in range(MAX_ANNOTATED_CLASSES)])
    assert len(cell_texts(at_limit)) == MAX_ANNOTATED_CLASSES**2


def test_heatmap_marks_nan_cells():
    matrix = np.array([[2.0, np.nan], [np.nan, 2.0]])
    figure = similarity_heatmap(matrix, ["a", "b"])
    assert cell_texts(figure) == ["2", "NaN", "NaN", "2"]
    image = figure.axes[0].images[0]
    assert image.get_array().mask.tolist() == [[False, True], [True, False]]


def test_heatmap_all_nan_matrix_draws():
    figure = similarity_heatmap(np.full((2, 2), np.nan), ["a", "b"])
    assert cell_texts(figure) == ["NaN"] * 4
    figure.canvas.draw()


@pytest.mark.parametrize(
    ("matrix", "names", "message"),
    [
        (np.ones((2, 3)), ["a", "b"], r"shape \(C, C\), got shape \(2, 3\)"),
        (np.ones(4), ["a"], r"shape \(C, C\), got shape \(4,\)"),
        (np.ones((2, 2)), ["a"], r"one class name per matrix row \(2\), got 1"),
    ],
)
def test_heatmap_rejects_bad_shapes(matrix, names, message):
    with pytest.raises(ValueError, match=message):
        similarity_heatmap(matrix, names)


# metric_bars


def bar_heights(figure: Figure) -> list[float]:
    return [patch.get_height() for patch in figure.axes[0].patches]


def mean_lines(figure: Figure) -> list:
    return [line for line in figure.axes[0].lines if line.get_linestyle() == "--"]


def test_bars_one_per_class_with_mean_line():
    values = {"cat": 1.0, "dog": 2.0, "bird": 4.5}
    figure = metric_bars(values, "curvature")
    axes = figure.axes[0]
    assert bar_heights(figure) == [1.0, 2.0, 4.5]
    assert tick_labels(axes.get_xticklabels()) == ["cat", "dog", "bird"]
    assert axes.get_ylabel() == "curvature"
    (line,) = mean_lines(figure)
    assert line.get_ydata()[0] == pytest.approx(2.5)
    assert axes.get_legend().get_texts()[0].get_text() == "mean = 2.5"


def test_bars_mark_nan_class():
    values = {"cat": 2.0, "dog": float("nan"), "bird": -4.0}
    figure = metric_bars(values, "volume")
    patches = figure.axes[0].patches
    assert len(patches) == 3
    assert bar_heights(figure)[0] == 2.0
    assert bar_heights(figure)[2] == -4.0
    assert patches[1].get_hatch() == "//"
    assert patches[1].get_height() == pytest.approx(0.4)  # a tenth of the largest finite magnitude
    assert patches[0].get_hatch() is None
    assert [text.get_text() for text in figure.axes[0].texts] == ["NaN"]
    (line,) = mean_lines(figure)
    assert line.get_ydata()[0] == pytest.approx(-1.0)


def test_bars_mark_infinite_value():
    figure = metric_bars({"a": 1.0, "b": math.inf}, "density")
    assert [text.get_text() for text in figure.axes[0].texts] == ["inf"]
    (line,) = mean_lines(figure)
    assert line.get_ydata()[0] == pytest.approx(1.0)


def test_bars_all_nan_have_no_mean():
    figure = metric_bars({"a": float("nan"), "b": float("nan")}, "holes")
    assert len(figure.axes[0].patches) == 2
    assert mean_lines(figure) == []
    assert figure.axes[0].get_legend() is None
    figure.canvas.draw()


def test_bars_read_report_by_class_name():
    report = SimpleNamespace(
        values={"curvature": {0: 0.5, 3: 1.5}, "volume": {0: 9.0, 3: 7.0}},
        class_names={0: "zero", 3: "three"},
    )
    figure = metric_bars(report, "volume")
    assert bar_heights(figure) == [9.0, 7.0]
    assert tick_labels(figure.axes[0].get_xticklabels()) == ["zero", "three"]


def test_bars_read_manifold_report():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(30, 4, generator=generator)
    labels = torch.arange(30) % 2
    report = pmg_torch.analyze(embeddings, labels, metrics=["volume"], class_names={0: "even", 1: "odd"})
    figure = metric_bars(report, "volume")
    assert bar_heights(figure) == [report.values["volume"][0], report.values["volume"][1]]
    assert tick_labels(figure.axes[0].get_xticklabels()) == ["even", "odd"]
    (line,) = mean_lines(figure)
    assert line.get_ydata()[0] == pytest.approx(report.mean("volume"))


def test_bars_report_missing_metric_raises():
    report = SimpleNamespace(values={"curvature": {0: 0.5}}, class_names={0: "zero"})
    with pytest.raises(KeyError, match="no values for 'volume'"):
        metric_bars(report, "volume")


def test_bars_empty_mapping_raises():
    with pytest.raises(ValueError, match="at least one class value"):
        metric_bars({}, "volume")


# persistence_diagram


def scatter_offsets(figure: Figure) -> list[np.ndarray]:
    return [np.asarray(collection.get_offsets()) for collection in figure.axes[0].collections]


def test_diagram_highlights_bars_above_threshold():
    diagram = np.array([[0.0, 0.05], [0.1, 1.0], [0.2, 0.25], [0.3, 0.5]])
    figure = persistence_diagram(diagram, threshold=0.1, title="H1, class cat")
    holes, others = scatter_offsets(figure)
    np.testing.assert_array_equal(holes, [[0.1, 1.0], [0.3, 0.5]])
    np.testing.assert_array_equal(others, [[0.0, 0.05], [0.2, 0.25]])
    axes = figure.axes[0]
    assert axes.get_xlabel() == "birth"
    assert axes.get_ylabel() == "death"
    assert axes.get_title() == "H1, class cat"


def test_diagram_draws_diagonal_and_threshold_line():
    figure = persistence_diagram(np.array([[0.0, 0.5]]), threshold=0.2, title="t")
    diagonal, threshold_line = figure.axes[0].lines[:2]
    x, y = diagonal.get_data()
    np.testing.assert_allclose(y, x)
    x, y = threshold_line.get_data()
    np.testing.assert_allclose(np.asarray(y) - np.asarray(x), 0.2)


def test_diagram_of_circle_has_one_hole():
    angles = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    circle = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    h1 = ripser.ripser(circle, maxdim=1)["dgms"][1]
    figure = persistence_diagram(h1, threshold=0.5, title="circle")
    offsets = scatter_offsets(figure)
    assert len(offsets[0]) == 1  # the circle's one long bar, drawn as a hole
    np.testing.assert_allclose(offsets[0][0], h1[np.argmax(h1[:, 1] - h1[:, 0])])
    assert sum(len(points) for points in offsets) == len(h1)


def test_diagram_empty_is_handled():
    figure = persistence_diagram(np.empty((0, 2)), threshold=0.1, title="empty")
    axes = figure.axes[0]
    assert len(axes.collections) == 0
    assert [text.get_text() for text in axes.texts] == ["no bars"]
    assert len(axes.lines) == 2
    figure.canvas.draw()


def test_diagram_places_infinite_death_at_top():
    diagram = np.array([[0.0, 0.3], [0.0, np.inf]])
    figure = persistence_diagram(diagram, threshold=0.1, title="H0")
    (holes,) = scatter_offsets(figure)
    assert holes[0].tolist() == [0.0, 0.3]
    assert np.isfinite(holes[1, 1])
    assert holes[1, 1] > 0.3
    assert holes[1, 1] < figure.axes[0].get_ylim()[1]
    assert "inf" in [text.get_text() for text in figure.axes[0].texts]


@pytest.mark.parametrize(
    ("diagram", "threshold", "message"),
    [
        (np.zeros((3, 3)), 0.1, r"shape \(b, 2\), got shape \(3, 3\)"),
        (np.zeros(2), 0.1, r"shape \(b, 2\), got shape \(2,\)"),
        (np.array([[0.0, np.nan]]), 0.1, "without NaN"),
        (np.zeros((1, 2)), -0.1, "finite number >= 0, got -0.1"),
        (np.zeros((1, 2)), math.inf, "finite number >= 0, got inf"),
    ],
)
def test_diagram_rejects_bad_input(diagram, threshold, message):
    with pytest.raises(ValueError, match=message):
        persistence_diagram(diagram, threshold, "t")


# custom_scalars_layout


def test_layout_has_one_chart_per_metric():
    metrics = ["curvature", "holes", "holes_density"]
    layout = custom_scalars_layout(metrics, ["cat", "dog"])
    assert list(layout) == ["pmg"]
    charts = layout["pmg"]
    assert len(charts) == 3
    assert [spec[0] for spec in charts.values()] == ["Multiline"] * 3
    assert [spec[1] for spec in charts.values()] == [["pmg/curvature/.*"], ["pmg/holes/.*"], ["pmg/holes_density/.*"]]
    assert list(charts)[0] == "curvature per class: cat, dog"


def test_layout_regex_selects_own_metric_only():
    charts = custom_scalars_layout(["holes", "volume"], ["a"], prefix="pmg")["pmg"]
    (holes_pattern,), (volume_pattern,) = (spec[1] for spec in charts.values())
    tags = ["pmg/holes/a", "pmg/holes/mean", "pmg/holes_density/a", "pmg/volume/a", "other/holes/a"]
    assert [tag for tag in tags if re.match(holes_pattern, tag)] == ["pmg/holes/a", "pmg/holes/mean"]
    assert [tag for tag in tags if re.match(volume_pattern, tag)] == ["pmg/volume/a"]


def test_layout_title_shortens_long_class_list():
    names = [f"c{i}" for i in range(8)]
    (title,) = custom_scalars_layout(["volume"], names, prefix="geometry")["geometry"]
    assert title == "volume per class: c0, c1, c2, c3, c4 and 3 more"
    (untitled,) = custom_scalars_layout(["volume"], [])["pmg"]
    assert untitled == "volume per class"


@pytest.mark.parametrize(
    ("metrics", "prefix", "message"),
    [([], "pmg", "at least one metric"), (["volume", "volume"], "pmg", "distinct"), (["volume"], "", "prefix")],
)
def test_layout_rejects_bad_arguments(metrics, prefix, message):
    with pytest.raises(ValueError, match=message):
        custom_scalars_layout(metrics, ["a"], prefix=prefix)


# TensorBoard


def test_figures_bypass_pyplot_figure_manager():
    plt.close("all")
    similarity_heatmap(np.eye(2), ["a", "b"])
    metric_bars({"a": 1.0}, "volume")
    persistence_diagram(np.empty((0, 2)), 0.1, "empty")
    assert plt.get_fignums() == []


def test_summary_writer_accepts_figures_and_layout(tmp_path):
    names = ["cat", "dog"]
    writer = SummaryWriter(log_dir=str(tmp_path))
    writer.add_figure("pmg/figures/similarity", similarity_heatmap(np.eye(2), names), global_step=1)
    writer.add_figure("pmg/figures/volume", metric_bars({"cat": 1.0, "dog": float("nan")}, "volume"), 1)
    writer.add_figure("pmg/figures/h1_cat", persistence_diagram(np.array([[0.0, 1.0]]), 0.1, "cat"), 1)
    writer.add_custom_scalars(custom_scalars_layout(["volume", "curvature"], names))
    writer.add_scalar("pmg/volume/cat", 1.0, 1)
    writer.close()

    accumulator = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    assert sorted(tags["images"]) == ["pmg/figures/h1_cat", "pmg/figures/similarity", "pmg/figures/volume"]
    (image,) = accumulator.Images("pmg/figures/volume")
    assert image.step == 1
    assert image.width > 100
    assert image.height > 100

    (config,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(config.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == "pmg"
    assert [chart.title for chart in category.chart] == ["volume per class: cat, dog", "curvature per class: cat, dog"]
    assert [list(chart.multiline.tag) for chart in category.chart] == [["pmg/volume/.*"], ["pmg/curvature/.*"]]
