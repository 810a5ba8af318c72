"""Tests of write_report, read back with TensorBoard's own event reader."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from pmg_torch.analysis import ManifoldReport
from pmg_torch.tensorboard import write_report

NAN = float("nan")


def _report() -> ManifoldReport:
    return ManifoldReport(
        classes=[0, 3, 5],
        class_names={0: "cat", 3: "big dog/2", 5: "5"},
        values={
            "curvature": {0: 0.5, 3: NAN, 5: 0.25},
            "volume": {0: 1.0, 3: 2.0, 5: 4.5},
        },
        n_samples={0: 10, 3: 2, 5: 8},
        n_duplicates={0: 0, 3: 0, 5: 1},
        n_nonfinite={0: 0, 3: 0, 5: 0},
        local_curvature={0: torch.tensor([0.1, 0.2, NAN, 0.3]), 5: torch.tensor([0.25, math.inf])},
    )


def _read_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def _write(log_dir: Path, report: ManifoldReport, step: int = 7, **options) -> EventAccumulator:
    writer = SummaryWriter(log_dir=str(log_dir))
    write_report(writer, report, step, **options)
    writer.close()
    return _read_events(log_dir)


def test_finite_scalars_written_under_class_tags(tmp_path):
    events = _write(tmp_path, _report())
    assert set(events.Tags()["scalars"]) == {
        "pmg/curvature/cat",
        "pmg/curvature/5",
        "pmg/curvature/mean",
        "pmg/volume/cat",
        "pmg/volume/big_dog_2",
        "pmg/volume/5",
        "pmg/volume/mean",
    }
    expected = {"pmg/curvature/cat": 0.5, "pmg/curvature/mean": 0.375, "pmg/volume/big_dog_2": 2.0}
    for tag, value in expected.items():
        (event,) = events.Scalars(tag)
        assert event.step == 7
        assert event.value == pytest.approx(value)
    (mean_volume,) = events.Scalars("pmg/volume/mean")
    assert mean_volume.value == pytest.approx(2.5)


def test_histograms_hold_finite_local_curvature(tmp_path):
    events = _write(tmp_path, _report())
    assert set(events.Tags()["histograms"]) == {"pmg/local_curvature/cat", "pmg/local_curvature/5"}
    (cat,) = events.Histograms("pmg/local_curvature/cat")
    assert cat.step == 7
    assert cat.histogram_value.num == 3
    assert cat.histogram_value.sum == pytest.approx(0.6)
    assert cat.histogram_value.min == pytest.approx(0.1)
    assert cat.histogram_value.max == pytest.approx(0.3)
    (five,) = events.Histograms("pmg/local_curvature/5")
    assert five.histogram_value.num == 1


def test_left_out_values_are_logged(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pmg_torch.tensorboard"):
        _write(tmp_path, _report())
    messages = [record.getMessage() for record in caplog.records]
    assert any("Left 1 non-finite scalars" in message and "pmg/curvature/big_dog_2" in message for message in messages)
    assert any("Left 1 of 4 non-finite local curvatures out of pmg/local_curvature/cat" in m for m in messages)
    assert any("Left 1 of 2 non-finite local curvatures out of pmg/local_curvature/5" in m for m in messages)


def test_histograms_and_scalars_can_be_switched_off(tmp_path):
    without_histograms = _write(tmp_path / "scalars", _report(), histograms=False)
    assert without_histograms.Tags()["histograms"] == []
    assert len(without_histograms.Tags()["scalars"]) == 7
    without_scalars = _write(tmp_path / "histograms", _report(), scalars=False)
    assert without_scalars.Tags()["scalars"] == []
    assert len(without_scalars.Tags()["histograms"]) == 2


def test_to_tensorboard_uses_prefix_and_steps(tmp_path):
    report = _report()
    writer = SummaryWriter(log_dir=str(tmp_path))
    report.to_tensorboard(writer, step=1, prefix="val_geometry")
    report.values["volume"][0] = 3.0
    report.to_tensorboard(writer, step=2, prefix="val_geometry")
    writer.close()
    events = _read_events(tmp_path)
    assert [(event.step, event.value) for event in events.Scalars("val_geometry/volume/cat")] == [(1, 1.0), (2, 3.0)]
    assert "val_geometry/local_curvature/cat" in events.Tags()["histograms"]


def test_class_named_mean_gets_distinct_tag(tmp_path):
    report = ManifoldReport(
        classes=[1, 2, 3],
        class_names={1: "mean", 2: "a b", 3: "a/b"},
        values={"volume": {1: 1.0, 2: 2.0, 3: 3.0}},
        n_samples={1: 5, 2: 5, 3: 5},
        n_duplicates={1: 0, 2: 0, 3: 0},
        n_nonfinite={1: 0, 2: 0, 3: 0},
    )
    events = _write(tmp_path, report)
    tags = set(events.Tags()["scalars"])
    assert tags == {"pmg/volume/mean_1", "pmg/volume/a_b", "pmg/volume/a_b_3", "pmg/volume/mean"}
    (mean,) = events.Scalars("pmg/volume/mean")
    assert mean.value == pytest.approx(2.0)


@pytest.mark.parametrize(("step", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_invalid_step_raises(tmp_path, step, error):
    writer = SummaryWriter(log_dir=str(tmp_path))
    with pytest.raises(error, match="step"):
        write_report(writer, _report(), step)
    writer.close()
