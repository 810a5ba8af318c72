"""Tests of pmg_torch.compat against numpy transcriptions of the original package's five functions.

Each ``original_*`` function below restates, in plain numpy, what the numpy package ``perceptual_manifold_geometry``
computes, slips included (without its prints and plots). The tests show where the two agree and where, and why,
they differ. The README section "Coming from perceptual_manifold_geometry" lists each difference with its test.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import skdim
import torch
from ripser import ripser
from scipy.spatial import ConvexHull
from sklearn.neighbors import NearestNeighbors
from sklearn.random_projection import GaussianRandomProjection

import pmg_torch as pmg
from pmg_torch import DegenerateInputWarning
from pmg_torch.convexity import nonconvexity_from_projections
from pmg_torch.topology import MAX_RIPSER_POINTS

# -- the original's formulas, transcribed -------------------------------------------------------------------------


def original_concavity(data: np.ndarray, k: int = 20) -> float:
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(data)
    _, indices = neighbours.kneighbors(data)
    means = []
    for i in range(len(data)):
        neighbour_points = data[indices[i]]
        # The slip: this drops the first feature column, not the point itself.
        eigenvalues = np.linalg.eigvals(np.cov(neighbour_points[:, 1:].T))
        means.append(np.mean(eigenvalues))
    return float(np.real(np.mean(means)))


def original_volume(z: np.ndarray, d: float = 1.0) -> tuple[float, float]:
    m, n_features = z.shape
    centred = z - z.mean(axis=0)
    volume = 0.5 * np.log2(np.linalg.det(np.eye(n_features) + d / m * centred.T @ centred))
    return float(volume), float(volume / m)


def original_holes(x: np.ndarray, threshold: float = 0.1) -> tuple[int, float, float, float]:
    diagram = ripser(x)["dgms"][1]
    persistence = diagram[:, 1] - diagram[:, 0]
    kept = diagram[persistence > threshold]
    total = float(np.sum(kept[:, 1] - kept[:, 0]))
    mean = float(np.mean(kept[:, 1] - kept[:, 0]))
    # The slip: precedence divides by the max death and then subtracts the min birth.
    density = total / np.max(kept[:, 1]) - np.min(kept[:, 0])
    return len(kept), total, mean, float(density)


def original_covariance_dimension(x: np.ndarray) -> float:
    gram = x.T @ x
    # The slip: ** squares element by element, and x is not centred.
    return float(np.trace(gram) ** 2 / np.trace(gram**2))


def original_nonconvexity(x: np.ndarray, components: list[np.ndarray], alpha: float = 10000) -> float:
    """The original's formula given its projection matrices, as sklearn stores them: ``(n_components, D)``."""
    volume, _ = original_volume(x)
    hulls = [ConvexHull(x @ matrix.T).volume for matrix in components]
    mean_hull = float(np.mean(hulls))
    return (mean_hull - alpha * volume) / mean_hull


# -- the corrected formulas, as plain per-point numpy loops ------------------------------------------------------


def reference_concavity(data: np.ndarray, k: int) -> float:
    means = []
    for i in range(len(data)):
        distances = np.linalg.norm(data - data[i], axis=1)
        distances[i] = np.inf
        neighbour_points = data[np.argsort(distances)[:k]]
        means.append(np.mean(np.linalg.eigvalsh(np.cov(neighbour_points.T))))
    return float(np.mean(means))


def reference_participation_ratio(x: np.ndarray) -> float:
    covariance = np.cov(x, rowvar=False)
    eigenvalues = np.linalg.eigvalsh(covariance)
    return float(eigenvalues.sum() ** 2 / np.sum(eigenvalues**2))


def gaussian_cloud(m: int, n_features: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, n_features)) * np.linspace(2.0, 0.5, n_features)


def random_rotation(n_features: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n_features, n_features)))
    return q * np.sign(np.diag(r))


def noisy_circles(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0.0, 2.0 * np.pi, 120)
    circle = np.c_[np.cos(angles), np.sin(angles)]
    shifted = 0.5 * circle[:60] + np.array([3.0, 0.0])
    return np.vstack([circle[60:], shifted]) + 0.03 * rng.standard_normal((120, 2))


# -- quantify_overall_concavity ------------------------------------------------------------------------------------


def test_concavity_matches_reference_loop() -> None:
    data = gaussian_cloud(80, 5, seed=0)
    assert pmg.quantify_overall_concavity(data, k=10) == pytest.approx(reference_concavity(data, 10), rel=1e-10)


def test_original_concavity_ignores_first_column() -> None:
    # All variance along the first feature: the original drops that column, and so reports almost nothing.
    rng = np.random.default_rng(1)
    data = np.c_[rng.uniform(-10.0, 10.0, 100), 1e-3 * rng.standard_normal((100, 3))]
    ours = pmg.quantify_overall_concavity(data, k=10)
    assert ours == pytest.approx(reference_concavity(data, 10), rel=1e-10)
    assert original_concavity(data, k=10) < 1e-5
    assert ours > 1e-2


def test_concavity_removes_duplicate_rows() -> None:
    data = gaussian_cloud(60, 4, seed=18)
    with_duplicates = np.vstack([data, data[:15]])
    expected = reference_concavity(data, 8)
    with pytest.warns(DegenerateInputWarning, match="concavity left out 15 duplicate rows"):
        value = pmg.quantify_overall_concavity(with_duplicates, k=8)
    assert value == pytest.approx(expected, rel=1e-10)
    assert reference_concavity(with_duplicates, 8) < 0.9 * expected


def test_concavity_few_rows_give_nan() -> None:
    with pytest.warns(DegenerateInputWarning, match="concavity is NaN") as record:
        value = pmg.quantify_overall_concavity(gaussian_cloud(15, 3, seed=2), k=20)
    assert len(record) == 1
    assert math.isnan(value)


def test_concavity_rejects_k_below_two() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        pmg.quantify_overall_concavity(gaussian_cloud(15, 3, seed=3), k=1)


# -- calculate_volume ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1.0, 0.25])
def test_volume_equals_original_below_overflow(d: float) -> None:
    z = gaussian_cloud(60, 8, seed=4)
    volume, density = pmg.calculate_volume(z, d=d)
    expected_volume, expected_density = original_volume(z, d=d)
    assert volume == pytest.approx(expected_volume, rel=1e-10)
    assert density == pytest.approx(expected_density, rel=1e-10)


def test_volume_finite_where_det_overflows() -> None:
    # 300 samples of dimension 256 with variance 64: det(I + C) is about 2**1300, beyond float64's 2**1024.
    rng = np.random.default_rng(5)
    z = 8.0 * rng.standard_normal((300, 256))
    with np.errstate(over="ignore"):
        original, _ = original_volume(z)
    assert original == math.inf
    centred = z - z.mean(axis=0)
    _, log_det = np.linalg.slogdet(np.eye(256) + centred.T @ centred / 300)
    volume, density = pmg.calculate_volume(z)
    assert volume == pytest.approx(0.5 * log_det / math.log(2.0), rel=1e-9)
    assert density == pytest.approx(volume / 300, rel=1e-12)


# -- estimate_holes_ripser -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_holes_match_original_persistence(seed: int) -> None:
    x = noisy_circles(seed)
    count, total, mean, _ = pmg.estimate_holes_ripser(x)
    expected_count, expected_total, expected_mean, _ = original_holes(x)
    assert count == expected_count == 2
    assert total == pytest.approx(expected_total, rel=1e-6)
    assert mean == pytest.approx(expected_mean, rel=1e-6)


def test_holes_density_divides_by_span() -> None:
    x = noisy_circles(2)
    _, total, _, density = pmg.estimate_holes_ripser(x)
    diagram = ripser(x)["dgms"][1]
    kept = diagram[diagram[:, 1] - diagram[:, 0] > 0.1]
    span = float(kept[:, 1].max() - kept[:, 0].min())
    assert density == pytest.approx(total / span, rel=1e-6)
    assert original_holes(x)[3] == pytest.approx(total / kept[:, 1].max() - kept[:, 0].min(), rel=1e-6)
    assert density != pytest.approx(original_holes(x)[3], rel=1e-3)


@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_holes_without_bars_give_zeros() -> None:
    triangle = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3.0) / 2.0]])
    with pytest.raises(ValueError):
        original_holes(triangle)
    assert pmg.estimate_holes_ripser(triangle) == (0, 0.0, 0.0, 0.0)


def test_holes_do_not_subsample() -> None:
    # The original gave ripser every point, so the compatible function must too, even above pmg.holes' default cap.
    x = gaussian_cloud(MAX_RIPSER_POINTS + 20, 8, seed=19)
    count, total, _, _ = pmg.estimate_holes_ripser(x)
    expected_count, expected_total, _, _ = original_holes(x)
    assert count == expected_count
    assert total == pytest.approx(expected_total, rel=1e-6)
    assert pmg.holes(torch.tensor(x)).total_persistence != pytest.approx(expected_total, rel=1e-3)


def test_diagram_drawn_without_show(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail_show(*args: object, **kwargs: object) -> None:
        raise AssertionError("plt.show() must not be called")

    monkeypatch.setattr(plt, "show", fail_show)
    x = noisy_circles(4)
    figures_before = set(plt.get_fignums())
    with_plot = pmg.estimate_holes_ripser(x, Persistence_diagrams=True)
    new_figures = set(plt.get_fignums()) - figures_before
    assert with_plot == pmg.estimate_holes_ripser(x)
    assert len(new_figures) == 1
    figure = plt.figure(new_figures.pop())
    axes = figure.axes[0]
    n_bars = len(ripser(x)["dgms"][1])
    assert axes.collections[0].get_offsets().shape == (n_bars, 2)
    assert "2 holes" in axes.get_title()
    plt.close(figure)


# -- estimate_intrinsic_dimension ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning:skdim")
def test_tle_equals_scikit_dimension() -> None:
    x = gaussian_cloud(200, 6, seed=6)
    expected = skdim.id.TLE().fit(x).dimension_
    assert pmg.estimate_intrinsic_dimension(x, method="TLE") == pytest.approx(expected, rel=1e-6)


@pytest.mark.filterwarnings("ignore::RuntimeWarning:skdim")
def test_tle_removes_duplicate_rows() -> None:
    x = gaussian_cloud(100, 4, seed=20)
    with_duplicates = np.vstack([x, x[:10]])
    expected = skdim.id.TLE().fit(x).dimension_
    with pytest.warns(DegenerateInputWarning, match="10 duplicate rows"):
        value = pmg.estimate_intrinsic_dimension(with_duplicates, method="TLE")
    assert value == pytest.approx(expected, rel=1e-6)
    assert skdim.id.TLE().fit(with_duplicates).dimension_ != pytest.approx(expected, rel=1e-6)


def test_covariance_equals_participation_ratio_of_centred_data() -> None:
    x = gaussian_cloud(150, 5, seed=7) + 3.0
    expected = reference_participation_ratio(x)
    assert pmg.estimate_intrinsic_dimension(x, method="Covariance") == pytest.approx(expected, rel=1e-10)


def test_covariance_matches_original_when_uncorrelated() -> None:
    # With centred columns that are orthogonal, X^T X is diagonal, so squaring it element by element changes
    # nothing and the two formulas coincide.
    raw = gaussian_cloud(100, 4, seed=8)
    q, _ = np.linalg.qr(raw - raw.mean(axis=0))
    x = q * np.array([4.0, 2.0, 1.0, 0.5])
    expected = original_covariance_dimension(x)
    assert pmg.estimate_intrinsic_dimension(x, method="Covariance") == pytest.approx(expected, rel=1e-10)


def test_covariance_is_rotation_invariant() -> None:
    x = gaussian_cloud(150, 5, seed=9)
    rotated = x @ random_rotation(5, seed=10)
    ours = pmg.estimate_intrinsic_dimension(x, method="Covariance")
    assert pmg.estimate_intrinsic_dimension(rotated, method="Covariance") == pytest.approx(ours, rel=1e-10)
    assert original_covariance_dimension(rotated) != pytest.approx(original_covariance_dimension(x), rel=1e-2)


def test_method_names_ignore_letter_case() -> None:
    x = gaussian_cloud(100, 4, seed=11)
    assert pmg.estimate_intrinsic_dimension(x, "tle") == pmg.estimate_intrinsic_dimension(x, "TLE")
    assert pmg.estimate_intrinsic_dimension(x, "covariance") == pmg.estimate_intrinsic_dimension(x, "Covariance")


def test_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match=r"one of \['TLE', 'Covariance'\], got 'PCA'"):
        pmg.estimate_intrinsic_dimension(gaussian_cloud(50, 3, seed=12), method="PCA")


# -- estimate_nonconvexity -----------------------------------------------------------------------------------------


def test_nonconvexity_matches_original_formula() -> None:
    x = gaussian_cloud(120, 6, seed=13)
    components = [GaussianRandomProjection(n_components=5, random_state=s).fit(x).components_ for s in range(4)]
    projections = torch.tensor(np.stack([matrix.T for matrix in components]))
    ours = float(nonconvexity_from_projections(torch.tensor(x), projections, alpha=10000))
    assert ours == pytest.approx(original_nonconvexity(x, components), rel=1e-10)


def test_nonconvexity_is_seeded() -> None:
    x = gaussian_cloud(120, 6, seed=14)
    first = pmg.estimate_nonconvexity(x)
    assert pmg.estimate_nonconvexity(x) == first
    assert first == float(pmg.nonconvexity(torch.tensor(x), seed=0))
    unseeded = [GaussianRandomProjection(n_components=5).fit(x).components_ for _ in range(10)]
    other_unseeded = [GaussianRandomProjection(n_components=5).fit(x).components_ for _ in range(10)]
    assert original_nonconvexity(x, unseeded) != original_nonconvexity(x, other_unseeded)


# -- common behaviour ----------------------------------------------------------------------------------------------

CALLS = {
    "quantify_overall_concavity": lambda data: pmg.quantify_overall_concavity(data, k=10),
    "calculate_volume": pmg.calculate_volume,
    "estimate_holes_ripser": pmg.estimate_holes_ripser,
    "estimate_intrinsic_dimension": pmg.estimate_intrinsic_dimension,
    "estimate_intrinsic_dimension_covariance": lambda data: pmg.estimate_intrinsic_dimension(data, "Covariance"),
    "estimate_nonconvexity": pmg.estimate_nonconvexity,
}


@pytest.mark.parametrize("name", list(CALLS))
def test_prints_nothing(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    CALLS[name](gaussian_cloud(80, 6, seed=17))
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


@pytest.mark.parametrize("name", list(CALLS))
def test_numpy_and_tensor_inputs_agree(name: str) -> None:
    data = gaussian_cloud(60, 6, seed=15)
    from_numpy = CALLS[name](data)
    assert CALLS[name](torch.tensor(data)) == from_numpy
    assert CALLS[name](torch.tensor(data, dtype=torch.float32)) == pytest.approx(from_numpy, rel=1e-4, abs=1e-6)
    assert CALLS[name](data.tolist()) == from_numpy


@pytest.mark.parametrize("name", list(CALLS))
def test_return_python_numbers(name: str) -> None:
    result = CALLS[name](gaussian_cloud(60, 6, seed=16))
    values = result if isinstance(result, tuple) else (result,)
    assert all(type(value) in (int, float) for value in values)
    if name == "estimate_holes_ripser":
        assert [type(value) for value in values] == [int, float, float, float]
    if name == "calculate_volume":
        assert len(values) == 2


def test_original_signatures_are_kept() -> None:
    import inspect

    expected = {
        "quantify_overall_concavity": "(data: 'Any', k: 'int' = 20) -> 'float'",
        "calculate_volume": "(Z: 'Any', d: 'float' = 1.0) -> 'tuple[float, float]'",
        "estimate_holes_ripser": (
            "(X: 'Any', threshold: 'float' = 0.1, Persistence_diagrams: 'bool' = False) "
            "-> 'tuple[int, float, float, float]'"
        ),
        "estimate_intrinsic_dimension": "(X: 'Any', method: 'str' = 'TLE') -> 'float'",
        "estimate_nonconvexity": (
            "(X: 'Any', n_projections: 'int' = 10, n_components: 'int' = 5, alpha: 'float' = 10000) -> 'float'"
        ),
    }
    for name, signature in expected.items():
        assert str(inspect.signature(getattr(pmg, name))) == signature


def test_non_numeric_input_raises_type_error() -> None:
    with pytest.raises(TypeError, match="array of numbers"):
        pmg.calculate_volume([["a", "b"], ["c", "d"]])
    with pytest.raises(ValueError, match="shape"):
        pmg.calculate_volume(np.zeros(5))
