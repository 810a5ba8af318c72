"""Tests for the intrinsic-dimension estimators against scikit-dimension and closed forms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import skdim
import torch

from pmg_torch import (
    DegenerateInputWarning,
    intrinsic_dimension,
    intrinsic_dimension_from_neighbourhoods,
    neighbourhoods,
    participation_ratio,
)
from pmg_torch.dimension import tle_pointwise
from pmg_torch.neighbours import neighbour_offset_grams

BENCHMARK_SIZE = 400


def benchmark_manifold(name: str, seed: int = 0) -> np.ndarray:
    """One of scikit-dimension's benchmark manifolds, at its stated intrinsic and ambient dimension."""
    generator = skdim.datasets.BenchmarkManifolds(random_state=seed)
    dim, ambient, _ = generator._dict_truth[name]
    return generator.generate(name, n=BENCHMARK_SIZE, d=dim, dim=ambient)


def gaussian_in_subspace(n: int, dim: int, ambient: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(ambient, dim)))[0]
    return rng.normal(size=(n, dim)) @ basis.T + rng.normal(size=ambient)


def skdim_dimension(estimator, points: np.ndarray, **fit_kwargs) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(estimator.fit(points, **fit_kwargs).dimension_)


# -- agreement with scikit-dimension ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["M1_Sphere", "M12_Norm", "M10a_Cubic", "M7_Roll"])
def test_tle_equals_skdim_on_benchmark_manifolds(name):
    points = benchmark_manifold(name)

    ours = float(intrinsic_dimension(torch.from_numpy(points), "tle"))

    assert ours == pytest.approx(skdim_dimension(skdim.id.TLE(), points), rel=1e-6)


def test_tle_equals_skdim_on_gaussian_subspace():
    points = gaussian_in_subspace(500, dim=4, ambient=12)

    ours = float(intrinsic_dimension(torch.from_numpy(points), "tle"))

    assert ours == pytest.approx(skdim_dimension(skdim.id.TLE(), points), rel=1e-6)


def test_tle_equals_skdim_with_other_k():
    points = benchmark_manifold("M4_Nonlinear")

    ours = float(intrinsic_dimension(torch.from_numpy(points), "tle", k=10))

    assert ours == pytest.approx(skdim_dimension(skdim.id.TLE(), points, n_neighbors=10), rel=1e-6)


def test_tle_pointwise_equals_skdim_on_grid_ties():
    # On a grid several neighbours tie with the k-th, which scikit-dimension handles as a special case, and
    # reflected neighbours coincide, which both implementations drop. Same neighbourhoods, per point.
    grid = np.stack(np.meshgrid(np.arange(7), np.arange(7), np.arange(3)), axis=-1).reshape(-1, 3) * 0.5
    nb = neighbourhoods(torch.from_numpy(grid.astype(np.float64)), 20)
    points, distances, indices = nb.points.numpy(), nb.distances.numpy(), nb.indices.numpy()
    assert (distances == distances[:, -1:]).sum(axis=1).max() > 1

    with np.errstate(divide="ignore", invalid="ignore"):
        expected = [skdim.id.TLE()._idtle(points[indices[i]], distances[[i]]) for i in range(len(points))]

    np.testing.assert_allclose(tle_pointwise(nb).numpy(), expected, rtol=1e-10)


def test_tle_pointwise_equals_skdim_with_near_duplicate_neighbours():
    # From the offset Gram matrix alone, a distance of 1e-7 times the radius keeps about 8 digits, which moves
    # measurements near the drop threshold, so such pairs must be recomputed from the rows. Each neighbourhood is
    # scaled to radius 1 for scikit-dimension, whose threshold is absolute, so that both drop the same terms.
    rng = np.random.default_rng(6)
    base = rng.normal(size=(150, 5))
    points = np.concatenate([base, base[:40] + 1e-7 * rng.normal(size=(40, 5))])
    nb = neighbourhoods(torch.from_numpy(points), 20)
    rows, distances, indices = nb.points.numpy(), nb.distances.numpy(), nb.indices.numpy()
    assert (distances[:, 0] < 1e-6).sum() >= 80

    radii = distances[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        expected = [
            skdim.id.TLE()._idtle(rows[indices[i]] / radii[i], distances[[i]] / radii[i]) for i in range(len(rows))
        ]

    np.testing.assert_allclose(tle_pointwise(nb).numpy(), expected, rtol=1e-9)


def test_tle_pointwise_accepts_precomputed_offset_grams():
    nb = neighbourhoods(torch.from_numpy(benchmark_manifold("M7_Roll")), 12)

    shared = tle_pointwise(nb, offset_grams=neighbour_offset_grams(nb, scaled=True))

    torch.testing.assert_close(shared, tle_pointwise(nb), rtol=0, atol=0)


def test_tle_is_invariant_to_scale():
    # scikit-dimension compares measurements with 1e-4 in absolute units and drops all of them at this scale.
    points = torch.from_numpy(benchmark_manifold("M7_Roll"))

    tiny = float(intrinsic_dimension(points * 1e-6, "tle"))

    assert tiny == pytest.approx(float(intrinsic_dimension(points, "tle")), rel=1e-10)
    assert skdim_dimension(skdim.id.TLE(), points.numpy() * 1e-6) != pytest.approx(tiny, rel=0.01)


@pytest.mark.parametrize("name", ["M1_Sphere", "M12_Norm", "M5a_Helix1d", "M6_Nonlinear", "Mp1_Paraboloid"])
def test_mle_equals_skdim_on_benchmark_manifolds(name):
    points = benchmark_manifold(name)

    ours = float(intrinsic_dimension(torch.from_numpy(points), "mle"))

    # Same neighbours and the same closed form: measured agreement is at rounding level.
    assert ours == pytest.approx(skdim_dimension(skdim.id.MLE(), points), rel=1e-9)


@pytest.mark.parametrize("name", ["M1_Sphere", "M12_Norm", "M5a_Helix1d", "M6_Nonlinear", "Mp1_Paraboloid"])
def test_twonn_equals_skdim_on_benchmark_manifolds(name):
    # M6_Nonlinear has 36 columns, so scikit-dimension takes its path for more than 25 features there.
    points = benchmark_manifold(name)

    ours = float(intrinsic_dimension(torch.from_numpy(points), "twonn"))

    assert ours == pytest.approx(skdim_dimension(skdim.id.TwoNN(), points), rel=1e-9)


def test_knn_estimators_find_dimension_of_flat_gaussian():
    points = torch.from_numpy(gaussian_in_subspace(1000, dim=3, ambient=10))

    for method in ("tle", "mle", "twonn"):
        assert float(intrinsic_dimension(points, method)) == pytest.approx(3.0, abs=0.4), method


# -- participation ratio --------------------------------------------------------------------------------------------


def test_participation_ratio_equals_closed_form_from_covariance():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(300, 6)) * np.array([5.0, 3.0, 1.0, 1.0, 0.5, 0.1]) + 7.0
    eigenvalues = np.linalg.eigvalsh(np.cov(points, rowvar=False))
    expected = eigenvalues.sum() ** 2 / (eigenvalues**2).sum()

    ours = float(participation_ratio(torch.from_numpy(points)))

    assert ours == pytest.approx(expected, rel=1e-12)


def test_participation_ratio_wide_data():
    rng = np.random.default_rng(2)
    points = rng.normal(size=(20, 200)) @ np.diag(np.linspace(0.1, 3.0, 200))
    eigenvalues = np.linalg.eigvalsh(np.cov(points, rowvar=False))
    expected = eigenvalues.sum() ** 2 / (eigenvalues**2).sum()

    assert float(participation_ratio(torch.from_numpy(points))) == pytest.approx(expected, rel=1e-10)


def test_participation_ratio_of_isotropic_cloud_is_its_dimension():
    points = torch.from_numpy(gaussian_in_subspace(20000, dim=4, ambient=9))

    assert float(participation_ratio(points)) == pytest.approx(4.0, rel=0.02)


def test_participation_ratio_is_invariant_to_rotation_and_translation():
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(200, 5, generator=generator, dtype=torch.float64) * torch.tensor([4.0, 2.0, 1.0, 1.0, 0.2])
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64)).Q

    moved = points @ rotation.T + 50.0

    assert float(participation_ratio(moved)) == pytest.approx(float(participation_ratio(points)), rel=1e-10)


def test_pr_method_is_participation_ratio():
    points = torch.from_numpy(gaussian_in_subspace(100, dim=3, ambient=5))

    assert float(intrinsic_dimension(points, "pr")) == float(participation_ratio(points))


def test_participation_ratio_of_two_rows_is_one():
    assert float(participation_ratio(torch.tensor([[0.0, 1.0], [2.0, 5.0]]))) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("points", "reason"),
    [
        (torch.ones(1, 4), "1 finite rows"),
        (torch.ones(10, 4), "identical"),
        (torch.tensor([[1.0, 2.0], [float("nan"), 0.0]]), "1 finite rows"),
    ],
)
def test_participation_ratio_degenerate_gives_nan(points, reason):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = participation_ratio(points)

    assert torch.isnan(result)
    assert len(record) == 1
    assert issubclass(record[0].category, DegenerateInputWarning)
    assert "participation ratio" in str(record[0].message)
    assert reason in str(record[0].message)


# -- cleaning, degenerate input and arguments ------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tle", "mle"])
def test_too_few_rows_give_nan_with_one_warning(method):
    points = torch.randn(15, 4, generator=torch.Generator().manual_seed(4))

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = intrinsic_dimension(points, method, k=20)

    assert torch.isnan(result)
    assert len(record) == 1
    assert issubclass(record[0].category, DegenerateInputWarning)
    assert f"intrinsic dimension ({method})" in str(record[0].message)


def test_twonn_needs_three_distinct_rows():
    with pytest.warns(DegenerateInputWarning, match="twonn"):
        assert torch.isnan(intrinsic_dimension(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), "twonn"))


def test_twonn_on_regular_grid_is_degenerate():
    # Every point of a regular lattice has its two nearest neighbours at the same distance, so log(r2/r1) = 0.
    grid = torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0))

    with pytest.warns(DegenerateInputWarning, match="same distance"):
        assert torch.isnan(intrinsic_dimension(grid, "twonn"))


@pytest.mark.parametrize("method", ["tle", "mle", "twonn"])
def test_duplicate_rows_are_removed_and_reported(method):
    generator = torch.Generator().manual_seed(5)
    cloud = torch.randn(200, 512, generator=generator)
    cloud[150:] = cloud[0]

    with pytest.warns(DegenerateInputWarning, match="50 duplicate rows") as record:
        result = intrinsic_dimension(cloud, method)

    assert len(record) == 1
    assert torch.isfinite(result)
    assert float(result) == pytest.approx(float(intrinsic_dimension(cloud[:150], method)), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"method": "TLE"}, ValueError, "one of"),
        ({"k": 1}, ValueError, "at least 2"),
        ({"method": "mle", "k": 1}, ValueError, "at least 2"),
        ({"k": 0}, ValueError, "at least 1"),
        ({"k": True}, TypeError, "int"),
    ],
)
def test_bad_arguments_raise(kwargs, error, message):
    with pytest.raises(error, match=message):
        intrinsic_dimension(torch.randn(30, 3), **kwargs)


def test_from_neighbourhoods_rejects_other_inputs():
    with pytest.raises(TypeError, match="Neighbourhoods"):
        intrinsic_dimension_from_neighbourhoods(torch.randn(30, 3))
    with pytest.raises(ValueError, match="one of"):
        intrinsic_dimension_from_neighbourhoods(neighbourhoods(torch.randn(30, 3), 5), "pr")
    with pytest.raises(ValueError, match="at least 2"):
        intrinsic_dimension_from_neighbourhoods(neighbourhoods(torch.randn(30, 3), 1), "twonn")


# -- shared search and dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tle", "mle", "twonn"])
def test_from_neighbourhoods_equals_direct_call(method):
    points = torch.from_numpy(benchmark_manifold("M13a_Scurve"))

    shared = intrinsic_dimension_from_neighbourhoods(neighbourhoods(points, 20), method)

    assert float(shared) == float(intrinsic_dimension(points, method))


@pytest.mark.parametrize("method", ["tle", "mle", "twonn", "pr"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_agrees_with_float32(method, dtype):
    points = torch.from_numpy(gaussian_in_subspace(600, dim=5, ambient=64)).float()
    low = points.to(dtype)

    result = intrinsic_dimension(low, method)

    assert result.dtype == torch.float32
    assert float(result) == float(intrinsic_dimension(low.float(), method))
    # Rounding each coordinate to 11 (float16) or 8 (bfloat16) bits moves the estimates by under 2% here.
    assert float(result) == pytest.approx(float(intrinsic_dimension(points, method)), rel=0.05)


def test_result_is_zero_dimensional_in_working_dtype():
    points = torch.from_numpy(gaussian_in_subspace(100, dim=3, ambient=5))

    assert intrinsic_dimension(points).dtype == torch.float64
    assert intrinsic_dimension(points.float()).dtype == torch.float32
    assert intrinsic_dimension(points.float(), "mle").ndim == 0
