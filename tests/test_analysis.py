"""Tests of analyze and ManifoldReport against known geometry, numpy formulas, scikit-dimension and ripser."""

from __future__ import annotations

import importlib
import json
import math
import warnings

import numpy as np
import pytest
import torch
from ripser import ripser
from skdim.id import TLE
from torch import nn

import pmg_torch.analysis as analysis
from pmg_torch import DegenerateInputWarning, EmbeddingCapture
from pmg_torch.analysis import AVAILABLE_METRICS, DEFAULT_METRICS, ManifoldReport, analyze
from pmg_torch.convexity import nonconvexity
from pmg_torch.curvature import curvature
from pmg_torch.dimension import intrinsic_dimension, participation_ratio
from pmg_torch.shape import shape_similarity
from pmg_torch.topology import holes
from pmg_torch.volume import volume

K = 10
WIDTH = 6


def _basis(n_columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator, dtype=torch.float64))
    return q[:, :n_columns].T


def plane(m: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coordinates = torch.rand(m, 2, generator=generator, dtype=torch.float64) * 2 - 1
    return coordinates @ _basis(2, seed + 100) + 3.0


def sphere(m: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(m, 3, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=1, keepdim=True) @ _basis(3, seed + 100)


def circle(m: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    angles = torch.rand(m, generator=generator, dtype=torch.float64) * 2 * math.pi
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    points = points + 0.02 * torch.randn(m, 2, generator=generator, dtype=torch.float64)
    return points @ _basis(2, seed + 100)


def blob(m: int, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, WIDTH, generator=generator, dtype=torch.float64) * torch.linspace(0.5, 2.0, WIDTH)


@pytest.fixture(scope="module")
def clouds() -> dict[int, torch.Tensor]:
    return {0: plane(60), 1: sphere(70), 2: circle(50), 3: blob(40)}


@pytest.fixture(scope="module")
def full_analysis(clouds) -> tuple[ManifoldReport, list[str]]:
    names = {0: "plane", 1: "sphere", 2: "circle", 3: "blob"}
    return _analyze_recording(clouds, k=K, metrics="all", class_names=names)


@pytest.fixture(scope="module")
def full_report(full_analysis) -> ManifoldReport:
    return full_analysis[0]


def _degenerate_messages(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DegenerateInputWarning)]


def _analyze_recording(*args, **kwargs) -> tuple[ManifoldReport, list[str]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = analyze(*args, **kwargs)
    return report, _degenerate_messages(record)


def test_default_metrics_in_report(clouds):
    report = analyze(clouds, k=K)
    assert report.metrics == list(DEFAULT_METRICS)
    assert report.classes == [0, 1, 2, 3]
    assert report.n_samples == {0: 60, 1: 70, 2: 50, 3: 40}


def test_flat_projections_give_nan_nonconvexity(full_analysis):
    report, messages = full_analysis
    # The plane, sphere and circle span 2 or 3 dimensions, so every 5-dimensional projection of them is flat.
    for label, name in ((0, "plane"), (1, "sphere"), (2, "circle")):
        assert math.isnan(report.values["nonconvexity"][label])
        expected = f"nonconvexity of class {label} ({name}) is NaN: 10 of 10 projections were skipped"
        assert sum(message.startswith(expected) for message in messages) == 1
    assert math.isfinite(report.values["nonconvexity"][3])
    assert len(messages) == 3


def test_volume_matches_closed_form(full_report, clouds):
    for label, x in clouds.items():
        centred = x.numpy() - x.numpy().mean(axis=0)
        singular_values = np.linalg.svd(centred, compute_uv=False)
        expected = 0.5 * np.sum(np.log2(1 + singular_values**2 / x.shape[0]))
        assert full_report.values["volume"][label] == pytest.approx(expected, rel=1e-6)
        assert full_report.values["density"][label] == pytest.approx(expected / x.shape[0], rel=1e-6)


# scikit-dimension divides by zero on the exactly flat plane and warns, yet its TLE value stays finite.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_intrinsic_dimension_matches_skdim_tle(full_report, clouds):
    for label, x in clouds.items():
        expected = TLE().fit(x.numpy(), n_neighbors=K).dimension_
        assert full_report.values["intrinsic_dimension"][label] == pytest.approx(expected, rel=1e-6)


def test_participation_ratio_matches_numpy(full_report, clouds):
    for label, x in clouds.items():
        covariance = np.cov(x.numpy(), rowvar=False)
        expected = np.trace(covariance) ** 2 / np.trace(covariance @ covariance)
        assert full_report.values["participation_ratio"][label] == pytest.approx(expected, rel=1e-6)


def test_flat_class_has_zero_curvature(full_report, clouds):
    assert abs(full_report.values["curvature"][0]) < 1e-6
    report = analyze({0: clouds[0], 1: clouds[1]}, k=K, metrics=["curvature"], tangent_dim=2)
    assert abs(report.values["curvature"][0]) < 1e-6
    assert report.values["curvature"][1] > 0.05
    assert report.values["curvature"][1] == pytest.approx(float(curvature(clouds[1], k=K, tangent_dim=2).overall))


def test_circle_class_has_one_hole_like_ripser(full_report, clouds):
    diagram = ripser(clouds[2].numpy(), maxdim=1)["dgms"][1]
    persistence = diagram[:, 1] - diagram[:, 0]
    assert full_report.values["holes"][2] == int((persistence > 0.1).sum()) == 1
    assert full_report.values["holes_total_persistence"][2] == pytest.approx(persistence[persistence > 0.1].sum(), 1e-5)
    np.testing.assert_allclose(np.sort(full_report.persistence_diagrams[2], axis=0), np.sort(diagram, axis=0), 1e-5)


def test_values_equal_direct_metric_calls(full_report, clouds):
    for label, x in clouds.items():
        values = {metric: full_report.values[metric][label] for metric in AVAILABLE_METRICS}
        direct_curvature = curvature(x, k=K)
        assert values["curvature"] == pytest.approx(float(direct_curvature.overall), abs=1e-9)
        torch.testing.assert_close(full_report.local_curvature[label], direct_curvature.local.float())
        assert values["volume"] == pytest.approx(float(volume(x).volume), rel=1e-9)
        assert values["intrinsic_dimension"] == pytest.approx(float(intrinsic_dimension(x, "tle", k=K)), rel=1e-9)
        assert values["participation_ratio"] == pytest.approx(float(participation_ratio(x)), rel=1e-9)
        direct_holes = holes(x, threshold=0.1)
        assert values["holes"] == direct_holes.count
        assert values["holes_mean_persistence"] == pytest.approx(direct_holes.mean_persistence)
        assert values["holes_density"] == pytest.approx(direct_holes.density)
        if label == 3:
            assert values["nonconvexity"] == pytest.approx(float(nonconvexity(x, n_components=5, seed=0)), rel=1e-9)


def test_shape_similarity_matrix_and_class_means(full_report, clouds):
    similarity = full_report.similarity
    assert similarity.shape == (4, 4)
    for i in range(4):
        for j in range(4):
            expected = float(shape_similarity(clouds[i], clouds[j]))
            assert float(similarity[i, j]) == pytest.approx(expected, abs=1e-9)
    for i in range(4):
        others = [float(similarity[i, j]) for j in range(4) if j != i]
        assert full_report.values["shape_similarity"][i] == pytest.approx(sum(others) / 3)


def test_input_forms_give_same_values(clouds):
    rows = torch.cat(list(clouds.values()))
    labels = torch.cat([torch.full((x.shape[0],), label) for label, x in clouds.items()])
    permutation = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))
    from_tensor = analyze(rows[permutation], labels[permutation], k=K, metrics=["volume", "participation_ratio"])
    from_mapping = analyze(clouds, k=K, metrics=["volume", "participation_ratio"])
    for metric in ("volume", "participation_ratio"):
        for label in clouds:
            assert from_tensor.values[metric][label] == pytest.approx(from_mapping.values[metric][label], rel=1e-9)


def test_capture_input_equals_its_embeddings(clouds):
    model = nn.Sequential(nn.Identity(), nn.Linear(WIDTH, 4))
    rows = torch.cat(list(clouds.values())).float()
    labels = torch.cat([torch.full((x.shape[0],), label) for label, x in clouds.items()])
    with EmbeddingCapture(model, max_per_class=1000) as capture:
        for start in range(0, rows.shape[0], 32):
            capture.set_labels(labels[start : start + 32])
            model(rows[start : start + 32])
    from_capture = analyze(capture, k=K)
    from_mapping = analyze(capture.embeddings, k=K)
    assert from_capture.values == from_mapping.values


def test_knn_search_runs_once_per_class(clouds, monkeypatch):
    calls = []
    original = analysis.neighbourhoods

    def counting(x, k):
        calls.append(x.shape[0])
        return original(x, k)

    monkeypatch.setattr(analysis, "neighbourhoods", counting)
    analyze(clouds, k=K, metrics=["curvature", "intrinsic_dimension"])
    assert sorted(calls) == [40, 50, 60, 70]


def test_pointwise_tle_computed_once_per_class(clouds, monkeypatch):
    # The package exports functions named like these modules, so the modules are looked up by name.
    curvature_module = importlib.import_module("pmg_torch.curvature")
    dimension_module = importlib.import_module("pmg_torch.dimension")
    calls = []
    original = dimension_module.tle_pointwise

    def counting(nb, *args, **kwargs):
        calls.append(nb.points.shape[0])
        return original(nb, *args, **kwargs)

    for module in (analysis, curvature_module, dimension_module):
        monkeypatch.setattr(module, "tle_pointwise", counting)
    report = analyze(clouds, k=K, metrics=["curvature", "intrinsic_dimension"])

    assert sorted(calls) == [40, 50, 60, 70]
    for label, cloud in clouds.items():
        assert report.values["curvature"][label] == pytest.approx(float(curvature(cloud, k=K).overall), rel=1e-12)
        expected = float(intrinsic_dimension(cloud, "tle", k=K))
        assert report.values["intrinsic_dimension"][label] == pytest.approx(expected, rel=1e-12)


def test_holes_metrics_share_one_ripser_run(clouds, monkeypatch):
    calls = []
    original = analysis.holes

    def counting(x, **options):
        calls.append(x.shape[0])
        return original(x, **options)

    monkeypatch.setattr(analysis, "holes", counting)
    report = analyze(clouds, k=K, metrics=[name for name in AVAILABLE_METRICS if name.startswith("holes")])
    assert sorted(calls) == [40, 50, 60, 70]
    assert sorted(report.persistence_diagrams) == [0, 1, 2, 3]


def test_id_method_pr_gives_participation_ratio(clouds):
    report = analyze(clouds, k=K, metrics=["intrinsic_dimension", "participation_ratio"], id_method="pr")
    assert report.values["intrinsic_dimension"] == report.values["participation_ratio"]


def test_small_class_gives_nan_with_one_warning(clouds):
    small = {**clouds, 7: plane(4, seed=9)}
    report, messages = _analyze_recording(small, k=K, class_names={7: "seven"})
    assert math.isnan(report.values["curvature"][7])
    assert math.isnan(report.values["intrinsic_dimension"][7])
    assert math.isfinite(report.values["volume"][7])
    assert 7 not in report.local_curvature
    assert len(messages) == 1
    assert messages[0].startswith("curvature, intrinsic_dimension of class 7 (seven) are NaN: 4 distinct finite rows")
    assert math.isfinite(report.values["curvature"][1])


def test_duplicates_left_out_of_knn_metrics_only(clouds):
    x = clouds[1]
    with_duplicates = torch.cat([x, x[:5]])
    report = analyze({1: with_duplicates}, k=K, metrics=["curvature", "volume"])
    assert report.n_duplicates == {1: 5}
    assert report.values["curvature"][1] == pytest.approx(float(curvature(x, k=K).overall), abs=1e-12)
    assert report.values["volume"][1] == pytest.approx(float(volume(with_duplicates).volume), rel=1e-12)
    assert report.local_curvature[1].shape == (70,)


def test_nonfinite_rows_left_out_with_one_warning(clouds):
    x = clouds[0].clone()
    x[[3, 8]] = torch.tensor([math.nan, math.inf], dtype=torch.float64)[:, None]
    report, messages = _analyze_recording({0: x}, k=K, metrics=["curvature", "volume"])
    finite = torch.cat([x[:3], x[4:8], x[9:]])
    assert report.n_nonfinite == {0: 2}
    assert report.n_samples == {0: 60}
    assert report.values["volume"][0] == pytest.approx(float(volume(finite).volume), rel=1e-12)
    assert report.values["curvature"][0] == pytest.approx(float(curvature(finite, k=K).overall), abs=1e-12)
    assert messages == ["class 0: 2 of 60 rows contain NaN or infinity and were left out of every metric."]


def test_identical_rows_give_nan_knn_metrics():
    x = torch.ones(30, 4)
    report, messages = _analyze_recording({5: x}, k=K, metrics=["curvature", "participation_ratio"])
    assert report.n_duplicates == {5: 29}
    assert math.isnan(report.values["curvature"][5])
    assert math.isnan(report.values["participation_ratio"][5])
    assert len([m for m in messages if "curvature" in m]) == 1
    assert len([m for m in messages if "participation_ratio" in m]) == 1


@pytest.mark.parametrize("m", [0, 1, 2, 3, 12])
@pytest.mark.parametrize("width", [1, 2, 6])
def test_any_shape_never_raises(m, width):
    x = torch.randn(m, width, generator=torch.Generator().manual_seed(m * 10 + width))
    other = torch.randn(15, width, generator=torch.Generator().manual_seed(1))
    report, messages = _analyze_recording({0: x, 1: other}, k=3, metrics="all", holes_max_points=20)
    for metric in AVAILABLE_METRICS:
        assert isinstance(report.values[metric][0], float)
        if math.isnan(report.values[metric][0]):
            assert sum(metric in message and "class 0" in message for message in messages) == 1, (metric, messages)


def test_single_class_shape_similarity_is_nan(clouds):
    report, messages = _analyze_recording({0: clouds[0]}, k=K, metrics=["shape_similarity"])
    assert math.isnan(report.values["shape_similarity"][0])
    assert report.similarity.shape == (1, 1)
    assert messages == [
        "shape_similarity of class 0 is NaN: it is the only class, and the metric compares a class with the others"
    ]


def test_empty_input_gives_empty_report():
    capture = EmbeddingCapture(nn.Linear(2, 2))
    report, messages = _analyze_recording(capture)
    assert report.classes == []
    assert report.metrics == list(DEFAULT_METRICS)
    assert len(messages) == 1


def test_unknown_metric_lists_available():
    with pytest.raises(ValueError, match=r"Unknown metric names \['curvatur'\]; the available metrics are") as error:
        analyze({0: plane(30)}, metrics=["curvatur"])
    assert "holes_density" in str(error.value)


@pytest.mark.parametrize(
    ("embeddings", "labels", "error", "match"),
    [
        (torch.zeros(4, 2), None, ValueError, "`labels` are required"),
        ({0: torch.zeros(4, 2)}, torch.zeros(4), ValueError, "must be None"),
        ([torch.zeros(4, 2)], None, TypeError, "Expected `embeddings`"),
        (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long), ValueError, r"labels of shape \(4,\)"),
        (torch.zeros(4, 2), torch.zeros(4), TypeError, "integer labels"),
        (torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long), TypeError, "floating-point"),
        ({0: torch.zeros(4, 2), 1: torch.zeros(4, 3)}, None, ValueError, "same number of columns"),
        ({0: torch.zeros(4)}, None, ValueError, r"shape \(m, D\)"),
        ({"a": torch.zeros(4, 2)}, None, TypeError, "integer class labels"),
    ],
)
def test_bad_inputs_raise(embeddings, labels, error, match):
    with pytest.raises(error, match=match):
        analyze(embeddings, labels)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"k": 0}, "`k`"),
        ({"k": 1}, "`k` of at least 2"),
        ({"holes_max_points": 2}, "holes_max_points"),
        ({"tangent_dim": 7}, "tangent_dim"),
        ({"curvature_method": "bent"}, "curvature_method"),
        ({"id_method": "TLE"}, "id_method"),
        ({"volume_scale": 0.0}, "volume_scale"),
        ({"holes_threshold": -1.0}, "holes_threshold"),
        ({"n_projections": 0}, "n_projections"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        analyze({0: plane(30)}, **options)


def test_report_mean_skips_nan():
    report = _hand_report()
    assert report.mean("curvature") == pytest.approx(0.375)
    assert math.isnan(report.mean("volume"))
    with pytest.raises(ValueError, match="no metric 'holes'"):
        report.mean("holes")


def test_report_scalars_use_sanitised_names():
    scalars = _hand_report().scalars()
    assert list(scalars) == [
        "pmg/curvature/cat",
        "pmg/curvature/big_dog",
        "pmg/curvature/mean_9",
        "pmg/curvature/mean",
        "pmg/volume/cat",
        "pmg/volume/big_dog",
        "pmg/volume/mean_9",
        "pmg/volume/mean",
    ]
    assert scalars["pmg/curvature/big_dog"] == 0.25
    assert math.isnan(scalars["pmg/volume/mean"])


def test_report_table_layout():
    table = _hand_report().table(extra_columns={"accuracy": {0: 0.9, 4: 0.75}})
    lines = table.splitlines()
    assert lines[0].split() == ["class", "rows", "duplicates", "curvature", "volume", "accuracy"]
    assert lines[1].split() == ["cat", "10", "0", "0.5", "nan", "0.9"]
    assert lines[2].split() == ["big", "dog", "3", "2", "0.25", "nan", "0.75"]
    assert lines[3].split() == ["mean", "5", "0", "nan", "nan", "-"]
    assert lines[4].split() == ["mean", "0.375", "nan", "0.825"]
    assert len({len(line) for line in lines[:4]}) == 1


def test_report_to_dict_is_strict_json(full_report):
    document = json.loads(json.dumps(full_report.to_dict(), allow_nan=False))
    assert document["classes"] == [0, 1, 2, 3]
    assert document["class_names"]["2"] == "circle"
    assert document["values"]["volume"]["1"] == pytest.approx(full_report.values["volume"][1])
    assert document["values"]["nonconvexity"]["0"] is None
    assert len(document["similarity"]) == 4
    assert document["settings"]["k"] == K
    assert document["persistence_diagrams"]["2"]
    hand = json.loads(json.dumps(_hand_report().to_dict(), allow_nan=False))
    assert hand["values"]["volume"] == {"0": None, "4": None, "9": None}
    assert hand["means"]["curvature"] == pytest.approx(0.375)


def _hand_report() -> ManifoldReport:
    nan = float("nan")
    return ManifoldReport(
        classes=[0, 4, 9],
        class_names={0: "cat", 4: "big dog", 9: "mean"},
        values={"curvature": {0: 0.5, 4: 0.25, 9: nan}, "volume": {0: nan, 4: nan, 9: nan}},
        n_samples={0: 10, 4: 3, 9: 5},
        n_duplicates={0: 0, 4: 2, 9: 0},
        n_nonfinite={0: 0, 4: 0, 9: 0},
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_matches_cpu(clouds):
    metrics = ["curvature", "volume", "intrinsic_dimension", "participation_ratio", "shape_similarity"]
    on_cpu = analyze(clouds, k=K, metrics=metrics)
    on_cuda = analyze({label: x.cuda() for label, x in clouds.items()}, k=K, metrics=metrics)
    for metric in metrics:
        for label in clouds:
            assert on_cuda.values[metric][label] == pytest.approx(on_cpu.values[metric][label], rel=1e-6, abs=1e-9)
    assert on_cuda.local_curvature[1].device.type == "cpu"
