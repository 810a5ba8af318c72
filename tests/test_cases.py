"""Inputs that have broken tools of this kind, and the argument and degenerate-data policy of every entry point.

Bad arguments raise ``TypeError`` or ``ValueError`` that say what was expected and what came. Degenerate data gives
NaN with one ``DegenerateInputWarning`` that names the metric (and the class inside ``analyze``) and the reason.
Every metric runs on every such input inside this process, so none of them reaches native code (LAPACK, ripser,
Qhull) in a form that crashes it.

Some kinds of input are tested in other modules: a class missing from validation in
``test_callback.py::test_class_missing_from_validation_is_absent``, a batch hook without ``dataloader_idx`` and a
``validation_step`` that returns nothing in ``test_callback.py::test_batch_hook_without_dataloader_idx``, the
sanity check in ``test_callback.py::test_sanity_check_logs_nothing``, two ranks with a class on one of them in
``test_distributed.py``, half-precision embeddings in ``test_mixed_precision.py``, and the train-mode graph in
``test_lifecycle.py::test_train_mode_graph_does_not_grow_memory``.
"""

from __future__ import annotations

import csv
import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from ripser import ripser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import MLPClassifier
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import callbacks.manifold_geometry as manifold_geometry
import pmg_torch as pmg
from callbacks import ManifoldGeometryCallback
from pmg_torch import DegenerateInputWarning, ManifoldReport

K = 5
M = 40
D = 6

GENERATOR = torch.Generator().manual_seed(0)
#: The cloud every degenerate input is built from, and a second one for shape similarity to compare with.
BASE = torch.randn(M, D, generator=GENERATOR)
OTHER = torch.randn(M, D, generator=GENERATOR) * torch.linspace(2.0, 0.5, D)


def call_with_warnings(call: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``call`` and return its result and the texts of the DegenerateInputWarnings it issued."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, DegenerateInputWarning)]


def as_float(value: Any) -> float:
    if isinstance(value, tuple):
        value = value[0]
    return float(value)


# -- bad arguments ----------------------------------------------------------------------------------------------------


def labels_for(x: Any) -> Tensor | None:
    return torch.zeros(x.shape[0], dtype=torch.long) if isinstance(x, Tensor) and x.ndim > 0 else None


#: Entry points that take a point cloud: how to call one with a cloud and keywords, the name of its neighbour-count
#: argument (or None), and the name of its method argument with one valid choice (or None).
CLOUD_ENTRY_POINTS: dict[str, tuple[Callable[..., Any], str | None, tuple[str, str] | None]] = {
    "curvature": (lambda x, **kw: pmg.curvature(x, **kw), "k", ("method", "tangent")),
    "intrinsic_dimension": (lambda x, **kw: pmg.intrinsic_dimension(x, **kw), "k", ("method", "tle")),
    "participation_ratio": (lambda x, **kw: pmg.participation_ratio(x, **kw), None, None),
    "volume": (lambda x, **kw: pmg.volume(x, **kw), None, None),
    "holes": (lambda x, **kw: pmg.holes(x, **kw), None, None),
    "nonconvexity": (lambda x, **kw: pmg.nonconvexity(x, n_components=2, **kw), None, None),
    "nonconvexity_from_projections": (
        lambda x, **kw: pmg.nonconvexity_from_projections(x, torch.randn(2, D, 2), **kw),
        None,
        None,
    ),
    "shape_similarity": (lambda x, **kw: pmg.shape_similarity(x, OTHER, **kw), None, None),
    "shape_similarity_matrix": (lambda x, **kw: pmg.shape_similarity_matrix([OTHER, x], **kw), None, None),
    "knn": (lambda x, **kw: pmg.knn(x, **{"k": 3, **kw}), "k", None),
    "neighbourhoods": (lambda x, **kw: pmg.neighbourhoods(x, **{"k": 3, **kw}), "k", None),
    "remove_duplicate_rows": (lambda x, **kw: pmg.remove_duplicate_rows(x, **kw), None, None),
    "analyze": (lambda x, **kw: pmg.analyze(x, labels_for(x), **kw), "k", ("id_method", "tle")),
    "quantify_overall_concavity": (lambda x, **kw: pmg.quantify_overall_concavity(x, **kw), "k", None),
    "calculate_volume": (lambda x, **kw: pmg.calculate_volume(x, **kw), None, None),
    "estimate_holes_ripser": (lambda x, **kw: pmg.estimate_holes_ripser(x, **kw), None, None),
    "estimate_intrinsic_dimension": (
        lambda x, **kw: pmg.estimate_intrinsic_dimension(x, **kw),
        None,
        ("method", "TLE"),
    ),
    "estimate_nonconvexity": (lambda x, **kw: pmg.estimate_nonconvexity(x, n_components=2, **kw), None, None),
}

#: Public names that are not functions of a cloud, each with the test that checks its arguments.
OTHER_PUBLIC_NAMES = {
    "curvature_from_neighbourhoods": "test_neighbourhood_entry_points_check_arguments",
    "intrinsic_dimension_from_neighbourhoods": "test_neighbourhood_entry_points_check_arguments",
    "gaussian_projections": "test_gaussian_projections_check_arguments",
    "write_report": "test_write_report_checks_step",
    "EmbeddingCapture": "test_embedding_capture_checks_arguments",
}


#: Modules whose public functions take point clouds, labels or reports. Other modules test their own arguments.
CHECKED_MODULES = {
    f"pmg_torch.{module}"
    for module in (
        "analysis",
        "capture",
        "compat",
        "convexity",
        "curvature",
        "dimension",
        "neighbours",
        "shape",
        "tensorboard",
        "topology",
        "volume",
    )
}
COMPAT_NAMES = {
    "quantify_overall_concavity",
    "calculate_volume",
    "estimate_holes_ripser",
    "estimate_intrinsic_dimension",
    "estimate_nonconvexity",
}


def test_every_public_function_is_covered() -> None:
    functions = set()
    for name in pmg.__all__:
        value = getattr(pmg, name)
        is_result_type = isinstance(value, type) and issubclass(value, (tuple, Warning, ManifoldReport))
        if callable(value) and not is_result_type and getattr(value, "__module__", None) in CHECKED_MODULES:
            functions.add(name)
    missing = functions - set(CLOUD_ENTRY_POINTS) - set(OTHER_PUBLIC_NAMES)
    assert not missing, f"add these public functions to the argument tests of this module: {sorted(missing)}"


def wrong_type_cases() -> list[Any]:
    cases = []
    for name in sorted(CLOUD_ENTRY_POINTS):
        cases.append(pytest.param(name, "abc", id=f"{name}-str"))
        # The compatibility functions take nested lists of numbers, as numpy does.
        if name not in COMPAT_NAMES:
            cases.append(pytest.param(name, [[1.0, 2.0]] * 3, id=f"{name}-list"))
        cases.append(pytest.param(name, None, id=f"{name}-None"))
    return cases


@pytest.mark.parametrize(("name", "wrong"), wrong_type_cases())
def test_wrong_type_raises_type_error(name: str, wrong: Any) -> None:
    call = CLOUD_ENTRY_POINTS[name][0]
    with pytest.raises(TypeError, match=type(wrong).__name__):
        call(wrong)


@pytest.mark.parametrize("name", sorted(CLOUD_ENTRY_POINTS))
def test_one_dimensional_input_raises_value_error(name: str) -> None:
    call = CLOUD_ENTRY_POINTS[name][0]
    with pytest.raises(ValueError, match=r"\(m, D\).*\(30,\)"):
        call(torch.randn(30))


@pytest.mark.parametrize("name", sorted(CLOUD_ENTRY_POINTS))
def test_three_dimensional_input_raises_value_error(name: str) -> None:
    call = CLOUD_ENTRY_POINTS[name][0]
    with pytest.raises(ValueError, match=r"\(m, D\).*\(30, 6, 2\)"):
        call(torch.randn(30, 6, 2))


@pytest.mark.parametrize("name", sorted(name for name, entry in CLOUD_ENTRY_POINTS.items() if entry[1]))
@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one_raises_value_error(name: str, k: int) -> None:
    call, k_name, _ = CLOUD_ENTRY_POINTS[name]
    with pytest.raises(ValueError, match=rf"`k`.*{k}"):
        call(BASE, **{k_name: k})


@pytest.mark.parametrize("name", sorted(name for name, entry in CLOUD_ENTRY_POINTS.items() if entry[1]))
def test_non_integer_k_raises_type_error(name: str) -> None:
    call, k_name, _ = CLOUD_ENTRY_POINTS[name]
    with pytest.raises(TypeError, match=r"`k`.*float"):
        call(BASE, **{k_name: 2.5})


@pytest.mark.parametrize("name", sorted(name for name, entry in CLOUD_ENTRY_POINTS.items() if entry[2]))
def test_unknown_method_raises_value_error(name: str) -> None:
    call, _, (method_name, valid) = CLOUD_ENTRY_POINTS[name]
    with pytest.raises(ValueError, match=rf"`{method_name}`.*{valid}.*'bendiness'"):
        call(BASE, **{method_name: "bendiness"})


def test_neighbourhood_entry_points_check_arguments() -> None:
    nb = pmg.neighbourhoods(BASE, K)
    for function in (pmg.curvature_from_neighbourhoods, pmg.intrinsic_dimension_from_neighbourhoods):
        with pytest.raises(TypeError, match="Neighbourhoods.*Tensor"):
            function(BASE)
        with pytest.raises(ValueError, match="'bendiness'"):
            function(nb, method="bendiness")


def test_gaussian_projections_check_arguments() -> None:
    with pytest.raises(ValueError, match="`n_features`.*0"):
        pmg.gaussian_projections(0)
    with pytest.raises(TypeError, match="`n_projections`.*str"):
        pmg.gaussian_projections(4, n_projections="ten")
    with pytest.raises(TypeError, match="`seed`.*float"):
        pmg.gaussian_projections(4, seed=0.5)


def test_write_report_checks_step(tmp_path: Path) -> None:
    report = pmg.analyze({0: BASE}, k=K, metrics=["volume"])
    with pytest.raises(ValueError, match="`step`.*-1"):
        pmg.write_report(object(), report, step=-1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`step`.*float"):
        pmg.write_report(object(), report, step=1.5)  # type: ignore[arg-type]


def test_embedding_capture_checks_arguments() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(TypeError, match="nn.Module.*str"):
        pmg.EmbeddingCapture("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_per_class`.*0"):
        pmg.EmbeddingCapture(model, max_per_class=0)
    with pytest.raises(ValueError, match="'head'.*not found.*'0'"):
        pmg.EmbeddingCapture(model, layer="head")


# -- degenerate data to every metric ---------------------------------------------------------------------------------


def nonfinite_rows() -> Tensor:
    """BASE with 5 bad rows mixed in: all NaN, one NaN entry, +inf, one -inf entry, and NaN with inf."""
    bad = BASE[:5].clone()
    bad[0] = float("nan")
    bad[1, 2] = float("nan")
    bad[2] = float("inf")
    bad[3, 0] = float("-inf")
    bad[4, :2] = torch.tensor([float("nan"), float("inf")])
    rows = torch.cat([BASE, bad])
    return rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(1))]


#: Metrics called directly: a call that returns one number, and the metric name its warnings use.
METRICS: dict[str, tuple[Callable[[Tensor], Any], str]] = {
    "curvature": (lambda x: pmg.curvature(x, k=K).overall, "curvature"),
    "curvature_reference": (lambda x: pmg.curvature(x, k=K, method="reference").overall, "curvature"),
    "tle": (lambda x: pmg.intrinsic_dimension(x, "tle", k=K), "intrinsic dimension"),
    "mle": (lambda x: pmg.intrinsic_dimension(x, "mle", k=K), "intrinsic dimension"),
    "twonn": (lambda x: pmg.intrinsic_dimension(x, "twonn", k=K), "intrinsic dimension"),
    "participation_ratio": (lambda x: pmg.participation_ratio(x), "participation ratio"),
    "volume": (lambda x: pmg.volume(x).volume, "volume"),
    "density": (lambda x: pmg.volume(x).density, "volume"),
    "holes": (lambda x: pmg.holes(x).count, "holes"),
    "nonconvexity": (lambda x: pmg.nonconvexity(x, n_projections=3, n_components=2), "nonconvexity"),
    "shape_similarity": (lambda x: pmg.shape_similarity(x, OTHER[:, : x.shape[1]]), "shape similarity"),
    "concavity": (lambda x: pmg.quantify_overall_concavity(x, k=K), "concavity"),
    "calculate_volume": (lambda x: pmg.calculate_volume(x), "volume"),
    "estimate_holes_ripser": (lambda x: pmg.estimate_holes_ripser(x), "holes"),
    "estimate_intrinsic_dimension": (lambda x: pmg.estimate_intrinsic_dimension(x), "intrinsic dimension"),
    "estimate_covariance_dimension": (
        lambda x: pmg.estimate_intrinsic_dimension(x, "Covariance"),
        "participation ratio",
    ),
    "estimate_nonconvexity": (lambda x: pmg.estimate_nonconvexity(x, n_projections=3, n_components=2), "nonconvexity"),
}

#: Metrics whose value on identical rows is 0 rather than NaN: there is no spread, and there is no hole.
ZERO_WITHOUT_SPREAD = {"volume", "density", "calculate_volume", "holes", "estimate_holes_ripser"}
HOLES = {"holes", "estimate_holes_ripser"}
#: Metrics that need at least two columns, so D = 1 is a bad argument for them rather than degenerate data.
NEED_TWO_COLUMNS = {"nonconvexity", "estimate_nonconvexity"}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_nonfinite_rows_are_left_out_with_one_warning(name: str) -> None:
    call, metric = METRICS[name]
    value, messages = call_with_warnings(lambda: call(nonfinite_rows()))
    expected, clean_messages = call_with_warnings(lambda: call(BASE))
    assert as_float(value) == pytest.approx(as_float(expected), rel=1e-6, abs=1e-9)
    assert len(messages) == len(clean_messages) + 1, messages
    (about_rows,) = [message for message in messages if message not in clean_messages]
    assert metric in about_rows
    assert "5" in about_rows


@pytest.mark.parametrize("name", sorted(METRICS))
def test_identical_rows_give_nan_or_zero(name: str) -> None:
    call, metric = METRICS[name]
    value, messages = call_with_warnings(lambda: call(BASE[:1].repeat(M, 1)))
    if name in ZERO_WITHOUT_SPREAD:
        assert as_float(value) == 0.0
        assert messages == []
    else:
        assert math.isnan(as_float(value))
        assert len(messages) == 1, messages
        assert metric in messages[0]


@pytest.mark.parametrize("name", sorted(METRICS))
def test_one_row_gives_nan_with_one_warning(name: str) -> None:
    call, metric = METRICS[name]
    value, messages = call_with_warnings(lambda: call(BASE[:1]))
    if name in HOLES:
        assert as_float(value) == 0.0
        assert messages == []
    else:
        assert math.isnan(as_float(value))
        assert len(messages) == 1, messages
        assert metric in messages[0]
        assert "1" in messages[0]


@pytest.mark.parametrize("name", sorted(set(METRICS) - NEED_TWO_COLUMNS))
def test_one_column_gives_finite_values(name: str) -> None:
    call, _ = METRICS[name]
    line = BASE[:, :1]
    value, messages = call_with_warnings(lambda: call(line))
    assert math.isfinite(as_float(value))
    assert messages == []


def test_one_column_known_values() -> None:
    line = BASE[:, :1].double()
    assert float(pmg.curvature(line, k=K).overall) == 0.0
    assert float(pmg.participation_ratio(line)) == pytest.approx(1.0)
    assert float(pmg.shape_similarity(line, OTHER[:, :1].double())) == pytest.approx(1.0)
    assert pmg.holes(line).count == 0
    centred = line.numpy() - line.numpy().mean(axis=0)
    expected = 0.5 * math.log2(1 + float((centred**2).sum()) / M)
    assert float(pmg.volume(line).volume) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", sorted(NEED_TWO_COLUMNS))
def test_one_column_is_a_bad_argument_for_hulls(name: str) -> None:
    with pytest.raises(ValueError, match="`n_components` between 2 and D = 1"):
        METRICS[name][0](BASE[:, :1])


# -- extreme magnitudes -----------------------------------------------------------------------------------------------

#: (dtype, scale): squared distances overflow or underflow the dtype at these scales, but the data themselves do not.
EXTREME_SCALES = [(torch.float32, 1e30), (torch.float32, 1e-30), (torch.float64, 1e200), (torch.float64, 1e-200)]

#: Metrics that uniform scaling leaves unchanged, called on a cloud and on OTHER at the same scale.
SCALE_FREE: dict[str, Callable[[Tensor, Tensor], Any]] = {
    "curvature": lambda x, other: pmg.curvature(x, k=K).overall,
    "tle": lambda x, other: pmg.intrinsic_dimension(x, "tle", k=K),
    "mle": lambda x, other: pmg.intrinsic_dimension(x, "mle", k=K),
    "twonn": lambda x, other: pmg.intrinsic_dimension(x, "twonn", k=K),
    "participation_ratio": lambda x, other: pmg.participation_ratio(x),
    "shape_similarity": lambda x, other: pmg.shape_similarity(x, other),
}


def scale_id(dtype: torch.dtype, scale: float) -> str:
    return f"{str(dtype).removeprefix('torch.')}-{scale:g}"


def extreme_scale_cases() -> list[Any]:
    """One case per extreme scale."""
    return [pytest.param(dtype, scale, id=scale_id(dtype, scale)) for dtype, scale in EXTREME_SCALES]


def scale_free_cases() -> list[Any]:
    cases = []
    for name in SCALE_FREE:
        for dtype, scale in EXTREME_SCALES:
            cases.append(pytest.param(name, dtype, scale, id=f"{name}-{scale_id(dtype, scale)}"))
    return cases


@pytest.mark.parametrize(("name", "dtype", "scale"), scale_free_cases())
def test_scale_free_metrics_survive_extreme_magnitudes(name: str, dtype: torch.dtype, scale: float) -> None:
    call = SCALE_FREE[name]
    expected = float(call(BASE.double(), OTHER.double()))
    value, messages = call_with_warnings(lambda: call(BASE.to(dtype) * scale, OTHER.to(dtype) * scale))
    assert messages == []
    assert float(value) == pytest.approx(expected, rel=1e-4)


def reference_volume(x: np.ndarray) -> float:
    """``1/2 sum log2(1 + sigma^2 / m)`` from float64 singular values of the scaled-down data, without overflow."""
    magnitude = float(np.abs(x).max())
    singular_values = np.linalg.svd((x - x.mean(axis=0)) / magnitude, compute_uv=False)
    log_terms = np.logaddexp(0.0, 2 * np.log(singular_values) + 2 * math.log(magnitude) - math.log(x.shape[0]))
    return float(0.5 * log_terms.sum() / math.log(2))


@pytest.mark.parametrize(("dtype", "scale"), extreme_scale_cases())
def test_volume_at_extreme_magnitudes_matches_closed_form(dtype: torch.dtype, scale: float) -> None:
    x = BASE.to(dtype) * scale
    value, messages = call_with_warnings(lambda: float(pmg.volume(x).volume))
    expected = reference_volume(x.double().numpy())
    assert messages == []
    # In float32 a volume below about 1e-45 rounds to 0, which the absolute tolerance allows.
    assert value == pytest.approx(expected, rel=1e-4, abs=1e-30)


def unit_circle(n: int = 40) -> Tensor:
    angles = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


@pytest.mark.parametrize(("dtype", "scale"), extreme_scale_cases())
def test_circle_keeps_its_hole_at_extreme_magnitudes(dtype: torch.dtype, scale: float) -> None:
    circle = (unit_circle() * scale).to(dtype)
    result, messages = call_with_warnings(lambda: pmg.holes(circle, threshold=0.5 * scale))
    assert messages == []
    assert result.count == 1
    assert result.total_persistence / scale == pytest.approx(
        pmg.holes(unit_circle(), threshold=0.5).total_persistence, rel=1e-3
    )


@pytest.mark.parametrize(("dtype", "scale"), extreme_scale_cases())
def test_analyze_never_raises_at_extreme_magnitudes(dtype: torch.dtype, scale: float) -> None:
    clouds = {0: BASE.to(dtype) * scale, 1: OTHER.to(dtype) * scale}
    report, messages = call_with_warnings(lambda: pmg.analyze(clouds, k=K, metrics="all", n_projections=3))
    for metric, per_class in report.values.items():
        for label, value in per_class.items():
            if math.isnan(value):
                assert count_naming(messages, label, metric) == 1, (metric, label, messages)


# -- degenerate classes inside analyze ------------------------------------------------------------------------------


def metrics_named(message: str, label: int) -> list[str]:
    """The metric names a warning of analyze gives for class ``label``: "curvature, volume of class 3 is NaN: ..."."""
    head, found, _ = message.partition(f" of class {label} ")
    return head.split(", ") if found else []


def count_naming(messages: list[str], label: int, metric: str) -> int:
    return sum(metric in metrics_named(message, label) for message in messages)


DEGENERATE_CLASSES = {
    "nonfinite_rows": nonfinite_rows,
    "all_nonfinite": lambda: torch.full((6, D), float("nan")),
    "identical_rows": lambda: BASE[:1].repeat(M, 1),
    "one_row": lambda: BASE[:1],
    "two_rows": lambda: BASE[:2],
    "huge": lambda: BASE * 1e30,
    "tiny": lambda: BASE * 1e-30,
}


@pytest.mark.parametrize("kind", sorted(DEGENERATE_CLASSES))
def test_analyze_degenerate_class_gives_nan_with_one_warning_each(kind: str) -> None:
    degenerate = DEGENERATE_CLASSES[kind]()
    report, messages = call_with_warnings(
        lambda: pmg.analyze({0: OTHER, 1: degenerate}, k=K, metrics="all", n_projections=3)
    )
    alone = pmg.analyze({0: OTHER}, k=K, metrics="all", n_projections=3)
    for metric in report.metrics:
        value = report.values[metric][1]
        if math.isnan(value):
            assert count_naming(messages, 1, metric) == 1, (metric, messages)
        else:
            assert count_naming(messages, 1, metric) == 0, (metric, messages)
        if metric != "shape_similarity":
            assert report.values[metric][0] == alone.values[metric][0], metric
    # Every warning names the class it is about.
    assert all("class 0" in message or "class 1" in message for message in messages), messages


# -- the rows of the table of inputs that broke other tools ----------------------------------------------------------


def with_repeated_row(n_distinct: int = 150, n_repeats: int = 50, width: int = 512) -> tuple[Tensor, Tensor]:
    """``n_distinct`` Gaussian rows plus ``n_repeats`` more copies of the first, shuffled, and which are copies."""
    generator = torch.Generator().manual_seed(2)
    distinct = torch.randn(n_distinct, width, generator=generator)
    rows = torch.cat([distinct, distinct[:1].repeat(n_repeats, 1)])
    order = torch.randperm(rows.shape[0], generator=generator)
    is_copy = torch.zeros(rows.shape[0], dtype=torch.bool)
    is_copy[0] = True
    is_copy[n_distinct:] = True
    return rows[order], is_copy[order]


def numpy_duplicate_count(rows: Tensor) -> int:
    array = rows.float().numpy()
    return array.shape[0] - np.unique(array, axis=0).shape[0]


#: The kNN estimators of intrinsic dimension, called directly. Curvature, the costly one, runs through analyze.
KNN_DIMENSIONS = {
    "tle": lambda x: pmg.intrinsic_dimension(x, "tle", k=20),
    "mle": lambda x: pmg.intrinsic_dimension(x, "mle", k=20),
    "twonn": lambda x: pmg.intrinsic_dimension(x, "twonn", k=20),
}


def test_repeated_rows_are_removed_before_knn_metrics() -> None:
    # 200 rows of dimension 512, 51 of them the same row.
    rows, _ = with_repeated_row()
    distinct = torch.from_numpy(np.unique(rows.numpy(), axis=0))
    for name, call in KNN_DIMENSIONS.items():
        value, messages = call_with_warnings(lambda call=call: call(rows))
        assert math.isfinite(float(value)), name
        assert float(value) == pytest.approx(float(call(distinct)), rel=1e-5), name
        assert len(messages) == 1, messages
        assert "50 duplicate rows" in messages[0]
    report, _ = call_with_warnings(lambda: pmg.analyze({0: rows}, k=20, metrics=["curvature", "intrinsic_dimension"]))
    assert report.n_duplicates == {0: 50}
    assert math.isfinite(report.values["curvature"][0])
    assert report.values["curvature"][0] == pytest.approx(float(pmg.curvature(distinct, k=20).overall), rel=1e-5)
    assert report.values["intrinsic_dimension"][0] == pytest.approx(float(KNN_DIMENSIONS["tle"](distinct)), rel=1e-5)


def test_bfloat16_round_trip_duplicates_are_removed() -> None:
    # Near-duplicates 1e-6 apart in float32 become exact duplicates once rounded to bfloat16.
    rows, is_copy = with_repeated_row()
    near = rows + 1e-6 * torch.randn(rows.shape, generator=torch.Generator().manual_seed(3)) * is_copy[:, None]
    rounded = near.bfloat16()
    assert numpy_duplicate_count(near) == 0
    n_duplicates = numpy_duplicate_count(rounded)
    assert n_duplicates > 0
    for name, call in KNN_DIMENSIONS.items():
        value, messages = call_with_warnings(lambda call=call: call(rounded))
        assert math.isfinite(float(value)), name
        assert f"{n_duplicates} duplicate rows" in messages[0]
    report, _ = call_with_warnings(
        lambda: pmg.analyze({0: rounded}, k=20, metrics=["curvature", "intrinsic_dimension"])
    )
    assert report.n_duplicates == {0: n_duplicates}
    assert math.isfinite(report.values["curvature"][0])
    assert math.isfinite(report.values["intrinsic_dimension"][0])


def test_small_classes_get_nan_only_where_undefined() -> None:
    # Classes of 1, 2 and 3 rows with k = 20: kNN metrics need 21 rows, covariance metrics 2.
    generator = torch.Generator().manual_seed(4)
    clouds = {label: torch.randn(label, 8, generator=generator) for label in (1, 2, 3)}
    clouds[9] = torch.randn(60, 8, generator=generator)
    report, messages = call_with_warnings(lambda: pmg.analyze(clouds, k=20, metrics="all", n_projections=3))

    for label in (1, 2, 3):
        for metric in ("curvature", "intrinsic_dimension"):
            assert math.isnan(report.values[metric][label])
            assert count_naming(messages, label, metric) == 1, (label, metric)
        assert "21" in next(m for m in messages if "curvature" in metrics_named(m, label))
    for metric in ("volume", "density", "participation_ratio", "shape_similarity"):
        assert math.isnan(report.values[metric][1]), metric
        assert count_naming(messages, 1, metric) == 1, metric
        for label in (2, 3):
            assert math.isfinite(report.values[metric][label]), (metric, label)
            assert count_naming(messages, label, metric) == 0, (metric, label)
    # Two rows: one centred direction, so the participation ratio is exactly 1.
    assert report.values["participation_ratio"][2] == pytest.approx(1.0)
    assert math.isfinite(report.values["curvature"][9])


class SmallClassifier(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(8, 12, 4)


def loader(rows_per_class: dict[int, int], seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), label) for label, n in rows_per_class.items()])
    x = 3.0 * torch.eye(4, 8)[labels] + torch.randn(labels.shape[0], 8, generator=generator)
    order = torch.randperm(labels.shape[0], generator=generator)
    return DataLoader(TensorDataset(x[order], labels[order]), batch_size=8)


def quiet_trainer(tmp_path: Path, callback: pl.Callback, loggers: Any, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path,
        logger=loggers,
        callbacks=[callback],
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def test_callback_with_small_classes_and_every_metric_runs(tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    callback = ManifoldGeometryCallback(k=20, metrics=list(pmg.AVAILABLE_METRICS), expensive_every_n_epochs=0)
    trainer = quiet_trainer(tmp_path, callback, TensorBoardLogger(tmp_path, name="tb", version=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(SmallClassifier(), loader({0: 8, 1: 8, 2: 8, 3: 8}, seed=1), loader({0: 30, 1: 1, 2: 2, 3: 3}, 2))

    report = callback.last_report
    assert report is not None
    assert report.n_samples == {0: 30, 1: 1, 2: 2, 3: 3}
    degenerate = [str(w.message) for w in caught if issubclass(w.category, DegenerateInputWarning)]
    for label in (1, 2, 3):
        assert math.isnan(report.values["curvature"][label])
        assert count_naming(degenerate, label, "curvature") == 1
    assert math.isfinite(report.values["curvature"][0])
    assert math.isfinite(report.values["volume"][2])


def test_triangle_and_tight_cluster_have_no_holes() -> None:
    triangle = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    cluster = 1e-4 * torch.randn(11, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for cloud in (triangle, cluster):
        bars = ripser(cloud.numpy(), maxdim=1)["dgms"][1]
        assert not np.any(bars[:, 1] - bars[:, 0] > 0.1)
        result, messages = call_with_warnings(lambda cloud=cloud: pmg.holes(cloud))
        assert (result.count, result.total_persistence, result.mean_persistence, result.density) == (0, 0.0, 0.0, 0.0)
        assert messages == []
    holes_metrics = ["holes", "holes_total_persistence", "holes_mean_persistence", "holes_density"]
    report = pmg.analyze({0: triangle, 1: cluster}, k=2, metrics=holes_metrics)
    for metric in holes_metrics:
        assert report.values[metric] == {0: 0.0, 1: 0.0}, metric


def test_wide_float32_volume_equals_float64_closed_form() -> None:
    # 500 x 2048 centred embeddings with variance 4 per dimension, where det(I + Z^T Z / m) overflows float64.
    generator = torch.Generator().manual_seed(6)
    z = 2.0 * torch.randn(500, 2048, generator=generator)
    z = z - z.mean(dim=0)
    rows = z.double().numpy()
    # The squared singular values are the eigenvalues of the 500 x 500 Gram matrix.
    squared_singular_values = np.clip(np.linalg.eigvalsh(rows @ rows.T), 0.0, None)
    expected = 0.5 * np.log2(1.0 + squared_singular_values / 500).sum()
    assert np.sum(np.log(1.0 + squared_singular_values / 500)) > np.log(np.finfo(np.float64).max)
    result = pmg.volume(z)
    assert math.isfinite(float(result.volume))
    assert float(result.volume) == pytest.approx(expected, rel=1e-5)
    assert float(result.density) == pytest.approx(expected / 500, rel=1e-5)


class ExperimentRecorder:
    """Stands in for a logger's experiment and records every method called on it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append(name)

        return record


class RecordingLogger(Logger):
    """A logger that is not TensorBoard: it keeps the metrics it gets, and its experiment records any other output."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[dict[str, float]] = []
        self.recorder = ExperimentRecorder()

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> ExperimentRecorder:
        return self.recorder

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(dict(metrics))


def test_nan_in_histogram_is_left_out_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_analyze = manifold_geometry.analyze

    def analyze_with_nan_curvatures(*args: Any, **kwargs: Any) -> Any:
        report = real_analyze(*args, **kwargs)
        report.local_curvature[0][:3] = torch.tensor([float("nan"), float("inf"), float("nan")])
        return report

    monkeypatch.setattr(manifold_geometry, "analyze", analyze_with_nan_curvatures)
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    other = RecordingLogger()
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0)
    trainer = quiet_trainer(tmp_path, callback, [tensorboard, csv_logger, other])
    pl.seed_everything(0, verbose=False)
    with caplog.at_level(logging.INFO):
        trainer.fit(SmallClassifier(), loader({0: 8, 1: 8}, seed=1), loader({0: 24, 1: 24}, seed=2))

    events = EventAccumulator(tensorboard.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    n_points = {label: local.numel() for label, local in callback.last_report.local_curvature.items()}
    assert events.Histograms("pmg/local_curvature/0")[-1].histogram_value.num == n_points[0] - 3
    assert events.Histograms("pmg/local_curvature/1")[-1].histogram_value.num == n_points[1]
    assert any(
        "3 of" in record.getMessage() and "local_curvature/0" in record.getMessage() for record in caplog.records
    )

    tensorboard_scalars = {tag for tag in events.Tags()["scalars"] if tag.startswith("pmg/")}
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as handle:
        csv_columns = {column for column in next(csv.reader(handle)) if column.startswith("pmg/")}
    other_tags = {tag for metrics in other.metrics for tag in metrics if tag.startswith("pmg/")}
    assert "pmg/curvature/0" in tensorboard_scalars
    assert csv_columns == tensorboard_scalars
    assert other_tags == tensorboard_scalars
    assert not any(column.startswith("pmg/local_curvature") for column in csv_columns)
    # Histograms and figures go to TensorBoard only: nothing else reached the other logger's experiment.
    assert other.recorder.calls == []
