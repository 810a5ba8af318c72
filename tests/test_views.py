"""Tests of the TensorBoard views: the custom-scalars layout, the figures, and the plain-PyTorch example.

Layouts are read back through TensorBoard's own custom-scalars plugin, so the tests see what its page shows.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
from matplotlib.figure import Figure
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import custom_scalars_plugin
from torch.utils.tensorboard import SummaryWriter

import pmg_torch as pmg
from pmg_torch.analysis import ManifoldReport
from pmg_torch.views import geometry_accuracy_figure, scalars_layout, write_figures, write_layout

REPO_ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


@pytest.fixture(scope="module")
def report() -> ManifoldReport:
    """Three classes of 30 points in 4 dimensions, with every kind of extra a figure draws."""
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([[3.0, 1.0, 0.5, 0.2], [1.0, 1.0, 1.0, 1.0], [0.2, 2.0, 0.5, 1.0]])
    clouds = {label: torch.randn(30, 4, generator=generator) * scales[label] for label in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pmg.DegenerateInputWarning)
        return pmg.analyze(
            clouds,
            k=5,
            metrics=["curvature", "volume", "holes", "shape_similarity"],
            class_names=["cat", "dog", "big bird"],
        )


ACCURACY = {0: 0.9, 1: 0.6, 2: 0.75}


def tensorboard_layout(log_dir: Path) -> dict[str, Any]:
    """The layout that TensorBoard's custom-scalars page receives for ``log_dir``."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(log_dir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(log_dir))
    plugin = custom_scalars_plugin.CustomScalarsPlugin(
        base_plugin.TBContext(logdir=str(log_dir), multiplexer=multiplexer, data_provider=provider)
    )
    return json.loads(plugin.layout_impl(context.RequestContext(), ""))


def chart_patterns(layout: dict[str, Any]) -> dict[str, list[str]]:
    (category,) = layout["category"]
    return {chart["title"]: chart["multiline"]["tag"] for chart in category["chart"]}


def read_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


class RecordingWriter:
    """Records add_custom_scalars and add_figure calls."""

    def __init__(self) -> None:
        self.layouts: list[dict[str, Any]] = []
        self.figures: list[tuple[str, Figure, int | None]] = []

    def add_custom_scalars(self, layout: dict[str, Any]) -> None:
        self.layouts.append(layout)

    def add_figure(self, tag: str, figure: Figure, global_step: int | None = None, close: bool = True) -> None:
        self.figures.append((tag, figure, global_step))


# -- layout ----------------------------------------------------------------------------------------------------------


def test_layout_charts_match_their_tags_only():
    layout = scalars_layout(["curvature", "volume"], ["cat", "dog"], accuracy=True)
    charts = layout["pmg"]
    tags = [
        "pmg/curvature/cat",
        "pmg/curvature/mean",
        "pmg/volume/dog",
        "pmg/accuracy/cat",
        "pmg/accuracy/mean",
        "pmg/spearman/curvature",
        "pmg/local_curvature/cat",
    ]
    matched = {}
    for title, (kind, patterns) in charts.items():
        assert kind == "Multiline", title
        matched[title] = [tag for tag in tags if any(re.fullmatch(pattern, tag) for pattern in patterns)]
    assert sorted(map(sorted, matched.values())) == sorted(
        [
            ["pmg/curvature/cat", "pmg/curvature/mean"],
            ["pmg/volume/dog"],
            ["pmg/accuracy/cat", "pmg/accuracy/mean"],
            ["pmg/spearman/curvature"],
        ]
    )


def test_layout_without_accuracy_has_metric_charts_only():
    charts = scalars_layout(["volume"], ["cat"], prefix="geometry")["geometry"]
    assert len(charts) == 1
    ((_, patterns),) = charts.values()
    assert patterns == ["geometry/volume/.*"]


def test_layout_written_once_per_writer():
    writer = RecordingWriter()
    assert write_layout(writer, ["curvature"], ["0", "1"])
    assert not write_layout(writer, ["curvature"], ["1", "0"])
    assert len(writer.layouts) == 1
    assert write_layout(RecordingWriter(), ["curvature"], ["0", "1"])  # another writer gets its own


def test_layout_grows_with_new_metrics_and_classes():
    writer = RecordingWriter()
    write_layout(writer, ["curvature", "volume"], ["0"])
    assert write_layout(writer, ["holes"], ["0", "7"])
    assert not write_layout(writer, ["volume"], ["7"])
    latest = writer.layouts[-1]["pmg"]
    assert [title.split(" ")[0] for title in latest] == ["curvature", "volume", "holes"]
    assert all(title.endswith(": 0, 7") for title in latest)


def test_tensorboard_shows_latest_layout(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        write_layout(writer, ["curvature"], ["0"])
        write_layout(writer, ["curvature", "holes"], ["0"], accuracy=True)
    patterns = chart_patterns(tensorboard_layout(tmp_path))
    assert sorted(patterns.values()) == sorted(
        [["pmg/curvature/.*"], ["pmg/holes/.*"], ["pmg/accuracy/.*"], ["pmg/spearman/.*"]]
    )


# -- figures ---------------------------------------------------------------------------------------------------------


def test_figures_cover_metrics_matrix_diagrams_and_accuracy(report):
    writer = RecordingWriter()
    tags = write_figures(writer, report, step=4, accuracy=ACCURACY)
    expected = {f"pmg/figures/{metric}" for metric in report.values}
    expected |= {"pmg/figures/accuracy", "pmg/figures/geometry_vs_accuracy", "pmg/figures/shape_similarity_matrix"}
    expected |= {"pmg/figures/h1_cat", "pmg/figures/h1_dog", "pmg/figures/h1_big_bird"}
    assert set(tags) == expected
    assert [tag for tag, _, _ in writer.figures] == tags
    assert {step for _, _, step in writer.figures} == {4}


def test_accuracy_figures_need_accuracy(report):
    tags = write_figures(RecordingWriter(), report, step=0)
    assert "pmg/figures/accuracy" not in tags
    assert "pmg/figures/geometry_vs_accuracy" not in tags
    assert "pmg/figures/curvature" in tags


def test_heatmap_uses_class_names(report):
    writer = RecordingWriter()
    write_figures(writer, report, step=0)
    (heatmap,) = [figure for tag, figure, _ in writer.figures if tag.endswith("shape_similarity_matrix")]
    axes = heatmap.axes[0]
    assert [label.get_text() for label in axes.get_yticklabels()] == ["cat", "dog", "big bird"]
    np.testing.assert_allclose(axes.images[0].get_array(), report.similarity.numpy())


def test_diagram_threshold_follows_report(report):
    writer = RecordingWriter()
    write_figures(writer, report, step=0)
    diagram = dict((tag, figure) for tag, figure, _ in writer.figures)["pmg/figures/h1_dog"]
    threshold = report.settings["holes_threshold"]
    legend = [text.get_text() for text in diagram.axes[0].get_legend().get_texts()]
    assert any(f"> {threshold:g}" in entry for entry in legend), legend


def test_scatter_points_and_correlations(report):
    values = {"curvature": {0: 0.3, 1: 0.9, 2: NAN}, "volume": {0: 2.0, 1: 1.0, 2: 3.0}}
    small = ManifoldReport(
        classes=[0, 1, 2],
        class_names={0: "cat", 1: "dog", 2: "bird"},
        values=values,
        n_samples={0: 9, 1: 9, 2: 9},
        n_duplicates={0: 0, 1: 0, 2: 0},
        n_nonfinite={0: 0, 1: 0, 2: 0},
    )
    figure = geometry_accuracy_figure(small, ACCURACY)
    curvature_axes, volume_axes = figure.axes[:2]

    np.testing.assert_allclose(curvature_axes.collections[0].get_offsets(), [[0.3, 0.9], [0.9, 0.6]])
    assert [text.get_text() for text in curvature_axes.texts] == ["cat", "dog"]
    assert curvature_axes.get_title().endswith("ρ undefined")  # two classes with a value

    np.testing.assert_allclose(volume_axes.collections[0].get_offsets(), [[2.0, 0.9], [1.0, 0.6], [3.0, 0.75]])
    rho = scipy.stats.spearmanr([2.0, 1.0, 3.0], [0.9, 0.6, 0.75]).statistic
    assert volume_axes.get_title().endswith(f"ρ = {rho:.2f}")


def test_scatter_grid_hides_unused_panels(report):
    figure = geometry_accuracy_figure(report, ACCURACY)
    visible = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_xlabel() for axes in visible] == list(report.values)


# -- write_report ----------------------------------------------------------------------------------------------------


def test_write_report_writes_every_view(tmp_path, report):
    with SummaryWriter(str(tmp_path)) as writer:
        pmg.write_report(writer, report, step=3, accuracy=ACCURACY)
        report.to_tensorboard(writer, step=5, accuracy=ACCURACY)

    events = read_events(tmp_path)
    assert "pmg/figures/geometry_vs_accuracy" in events.Tags()["images"]
    assert [event.step for event in events.Images("pmg/figures/curvature")] == [3, 5]
    assert len(events.Tensors("custom_scalars__config__")) == 1
    assert [event.value for event in events.Scalars("pmg/accuracy/big_bird")] == [0.75, 0.75]
    expected_rho = scipy.stats.spearmanr(
        [report.values["volume"][label] for label in range(3)], [ACCURACY[label] for label in range(3)]
    ).statistic
    assert events.Scalars("pmg/spearman/volume")[-1].value == pytest.approx(expected_rho, abs=1e-6)
    titles = chart_patterns(tensorboard_layout(tmp_path))
    assert ["pmg/accuracy/.*"] in titles.values()


def test_write_report_views_can_be_switched_off(tmp_path, report):
    with SummaryWriter(str(tmp_path)) as writer:
        pmg.write_report(writer, report, step=0, figures=False, layout=False)
    events = read_events(tmp_path)
    assert events.Tags()["images"] == []
    assert events.Tags()["tensors"] == []
    assert not any(tag.startswith("pmg/accuracy") for tag in events.Tags()["scalars"])


# -- the plain PyTorch example ---------------------------------------------------------------------------------------


def test_plain_example_logs_views_without_lightning(tmp_path):
    log_dir = tmp_path / "runs"
    # A fresh interpreter, so that the check of sys.modules sees only what the example imported.
    script = (
        "import runpy, sys\n"
        f"sys.argv = ['plain_pytorch.py', '--epochs', '1', '--no-expensive', '--logdir', {str(log_dir)!r}]\n"
        # As `python examples/plain_pytorch.py` does, so that the example finds its sibling digits_net.py.
        f"sys.path.insert(0, {str(REPO_ROOT / 'examples')!r})\n"
        f"runpy.run_path({str(REPO_ROOT / 'examples' / 'plain_pytorch.py')!r}, run_name='__main__')\n"
        "lightning = sorted(name for name in sys.modules if name.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "print('lightning modules:', lightning)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning modules: []" in result.stdout

    events = read_events(log_dir)
    scalars = set(events.Tags()["scalars"])
    for metric in ("curvature", "volume", "intrinsic_dimension", "shape_similarity", "accuracy"):
        assert {f"pmg/{metric}/{digit}" for digit in range(10)} <= scalars, metric
    assert any(tag.startswith("pmg/spearman/") for tag in scalars)
    accuracy = [events.Scalars(f"pmg/accuracy/{digit}")[-1].value for digit in range(10)]
    assert all(0.0 <= value <= 1.0 for value in accuracy)
    balanced = re.search(r"balanced validation accuracy (\d\.\d+)", result.stdout)
    assert balanced is not None, result.stdout
    assert math.isclose(float(balanced.group(1)), sum(accuracy) / 10, abs_tol=1e-3)
    images = set(events.Tags()["images"])
    assert {"pmg/figures/shape_similarity_matrix", "pmg/figures/geometry_vs_accuracy"} <= images
    assert not any(tag.startswith("pmg/holes") for tag in scalars)
    assert len(chart_patterns(tensorboard_layout(log_dir))) == 4 + 2
