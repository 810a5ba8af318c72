"""Tests of pmg_torch.convexity: nonconvexity against a numpy transcription of its formula on the same projections."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial import ConvexHull

import pmg_torch.convexity as convexity
from pmg_torch import DegenerateInputWarning
from pmg_torch.convexity import gaussian_projections, nonconvexity, nonconvexity_from_projections


def cloud(m: int, n_features: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(2.0, 0.5, n_features, dtype=torch.float64)
    return torch.randn(m, n_features, generator=generator, dtype=torch.float64) * scales


def numpy_nonconvexity(x: np.ndarray, projections: np.ndarray, alpha: float) -> float:
    """The formula in plain numpy float64: coding volume through det, hull volumes through scipy."""
    m, n_features = x.shape
    centred = x - x.mean(axis=0)
    coding_volume = 0.5 * np.log2(np.linalg.det(np.eye(n_features) + centred.T @ centred / m))
    hulls = [ConvexHull(x @ matrix).volume for matrix in projections]
    mean_hull = float(np.mean(hulls))
    return (mean_hull - alpha * coding_volume) / mean_hull


def test_matches_numpy_formula() -> None:
    x = cloud(150, 8, seed=0)
    projections = gaussian_projections(8, n_projections=6, n_components=4, seed=3)
    value = nonconvexity_from_projections(x, projections, alpha=50.0)
    expected = numpy_nonconvexity(x.numpy(), projections.numpy(), alpha=50.0)
    assert float(value) == pytest.approx(expected, rel=1e-10)


def test_default_uses_seeded_projections() -> None:
    x = cloud(120, 6, seed=1)
    projections = gaussian_projections(6, n_projections=10, n_components=5, seed=0)
    expected = numpy_nonconvexity(x.numpy(), projections.numpy(), alpha=10000)
    assert float(nonconvexity(x)) == pytest.approx(expected, rel=1e-10)


def test_seed_reproduces_value() -> None:
    x = cloud(100, 6, seed=2)
    assert float(nonconvexity(x, seed=5)) == float(nonconvexity(x, seed=5))
    assert float(nonconvexity(x, seed=5)) != float(nonconvexity(x, seed=6))


def test_projections_match_sklearn_distribution() -> None:
    projections = gaussian_projections(4000, n_projections=5, n_components=4, seed=0)
    assert projections.shape == (5, 4000, 4)
    assert projections.dtype == torch.float64
    # 80000 draws of N(0, 1/4): the mean and variance are within a few standard errors of 0 and 0.25.
    assert abs(float(projections.mean())) < 5 * math.sqrt(0.25 / projections.numel())
    assert float(projections.var()) == pytest.approx(0.25, rel=0.02)
    torch.testing.assert_close(projections, gaussian_projections(4000, 5, 4, seed=0), rtol=0, atol=0)


def test_alpha_zero_gives_one() -> None:
    assert float(nonconvexity(cloud(60, 5, seed=3), alpha=0)) == 1.0


def test_larger_alpha_lowers_value() -> None:
    x = cloud(80, 5, seed=4)
    values = [float(nonconvexity(x, alpha=alpha)) for alpha in (1.0, 10.0, 100.0)]
    assert values[0] > values[1] > values[2]


def test_flat_projection_is_skipped() -> None:
    x = cloud(100, 6, seed=5)
    projections = gaussian_projections(6, n_projections=4, n_components=3, seed=1)
    flat = projections.clone()
    flat[2, :, 2] = flat[2, :, 0]  # two equal columns: the third projection lies in a plane
    with pytest.warns(DegenerateInputWarning, match="1 of 4 projections were skipped: 1 were flat") as record:
        value = nonconvexity_from_projections(x, flat, alpha=10.0)
    assert len(record) == 1
    kept = projections[[0, 1, 3]]
    assert float(value) == pytest.approx(numpy_nonconvexity(x.numpy(), kept.numpy(), alpha=10.0), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flat_projections_never_reach_qhull(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    ranks_seen: list[int] = []
    real_hull = convexity.ConvexHull

    def recording_hull(points: np.ndarray) -> ConvexHull:
        ranks_seen.append(int(np.linalg.matrix_rank(points - points.mean(axis=0))))
        return real_hull(points)

    monkeypatch.setattr(convexity, "ConvexHull", recording_hull)
    # Points in a 3-dimensional subspace of R^8 project to rank 3 at most, below n_components = 5.
    basis = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    subspace_points = (cloud(100, 3, seed=6) @ basis.T).to(dtype)
    with pytest.warns(DegenerateInputWarning, match="nonconvexity is NaN: .*10 of 10 projections") as record:
        value = nonconvexity(subspace_points)
    assert len(record) == 1
    assert torch.isnan(value)
    assert ranks_seen == []

    nonconvexity(cloud(100, 8, seed=7).to(dtype))
    assert ranks_seen == [5] * 10


def test_identical_rows_give_nan_with_warning() -> None:
    with pytest.warns(DegenerateInputWarning, match="flat") as record:
        value = nonconvexity(torch.ones(30, 6, dtype=torch.float64))
    assert len(record) == 1
    assert torch.isnan(value)


def test_too_few_rows_give_nan_with_warning() -> None:
    with pytest.warns(DegenerateInputWarning, match="5 finite rows; .* at least c \\+ 1 = 6") as record:
        value = nonconvexity(cloud(5, 8, seed=8))
    assert len(record) == 1
    assert torch.isnan(value)


def test_overflowing_projection_gives_nan() -> None:
    # Every row is 1e308 times a sign pattern: finite, but the projected coordinates exceed the float64 range.
    signs = torch.randint(0, 2, (40, 6), generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    huge = 1e308 * signs
    with pytest.warns(DegenerateInputWarning, match="overflowed") as record:
        value = nonconvexity(huge)
    assert len(record) == 1
    assert torch.isnan(value)


def test_nonfinite_rows_are_left_out_with_warning() -> None:
    x = cloud(80, 6, seed=10)
    corrupted = torch.cat([x, torch.tensor([[float("inf")] * 6], dtype=torch.float64)])
    with pytest.warns(DegenerateInputWarning, match="1 of 81 rows contain NaN or infinity") as record:
        value = nonconvexity(corrupted, alpha=10.0)
    assert len(record) == 1
    assert float(value) == pytest.approx(float(nonconvexity(x, alpha=10.0)), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input_agrees_with_float64(dtype: torch.dtype) -> None:
    x = cloud(120, 6, seed=11)
    reference = float(nonconvexity(x, alpha=10.0))
    value = nonconvexity(x.to(dtype), alpha=10.0)
    assert value.dtype == torch.float32
    assert value.device == x.device
    # bfloat16 keeps 8 significant bits, so hull volumes and the coding volume move by about a percent.
    assert float(value) == pytest.approx(reference, rel=5e-2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_components": 1}, ValueError, "between 2 and D = 6"),
        ({"n_components": 7}, ValueError, "between 2 and D = 6"),
        ({"n_projections": 0}, ValueError, "n_projections"),
        ({"alpha": -1.0}, ValueError, "alpha"),
        ({"seed": "0"}, TypeError, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        nonconvexity(cloud(20, 6, seed=12), **kwargs)


def test_bad_projections_raise() -> None:
    x = cloud(20, 6, seed=13)
    with pytest.raises(ValueError, match="D = 6"):
        nonconvexity_from_projections(x, torch.randn(3, 5, 2))
    with pytest.raises(ValueError, match="c >= 2"):
        nonconvexity_from_projections(x, torch.randn(3, 6, 1))
    with pytest.raises(TypeError, match="floating-point"):
        nonconvexity_from_projections(x, torch.ones(3, 6, 2, dtype=torch.long))
