"""Tests for volume and density against the determinant formula and its singular-value closed form."""

from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
import torch

from pmg_torch import DegenerateInputWarning, volume
from pmg_torch.volume import MIN_CHOLESKY_BITS


def closed_form_volume(points: np.ndarray, d: float = 1.0) -> float:
    """``1/2 sum log2(1 + d sigma^2 / m)`` from numpy's singular values of the centred points, in float64."""
    centred = points.astype(np.float64) - points.astype(np.float64).mean(axis=0)
    singular_values = np.linalg.svd(centred, compute_uv=False)
    return 0.5 * float(np.sum(np.log2(1 + d * singular_values**2 / len(points))))


def scaled_reference_volume(points: np.ndarray, scale: float, d: float = 1.0) -> float:
    """The closed form for the cloud ``points * scale`` of generic (Gaussian) points, summed in 50-digit mpmath.

    numpy's singular values of the unscaled centred points give ``sigma_i``, and each term
    ``log2(1 + d scale^2 sigma_i^2 / m)`` is evaluated with mpmath's ``log1p``, whose exponent range has no limit.
    Centred generic points have rank ``min(m - 1, D)`` exactly, so only that many singular values count. The others
    are rounding remainders near 1e-16 sigma_max, which at a large ``d scale^2`` would add bits that are not there.
    """
    m, dim = points.shape
    centred = points - points.mean(axis=0)
    singular_values = np.linalg.svd(centred, compute_uv=False)[: min(m - 1, dim)]
    with mpmath.workdps(50):
        coefficient = mpmath.mpf(d) * mpmath.mpf(scale) ** 2 / len(points)
        bits = sum(mpmath.log1p(coefficient * mpmath.mpf(float(sigma)) ** 2) for sigma in singular_values)
        return float(bits / (2 * mpmath.log(2)))


def determinant_volume(points: np.ndarray, d: float = 1.0) -> float:
    """The original formula, through the determinant of the ``D x D`` matrix."""
    m, dim = points.shape
    centred = points - points.mean(axis=0)
    return 0.5 * float(np.log2(np.linalg.det(np.eye(dim) + d / m * centred.T @ centred)))


@pytest.mark.parametrize(("m", "dim"), [(50, 8), (8, 50)], ids=["m>D", "m<D"])
@pytest.mark.parametrize("d", [1.0, 0.25, 3.0])
def test_volume_equals_singular_value_closed_form(m, dim, d):
    points = np.random.default_rng(0).normal(size=(m, dim)) * 2.0 + 5.0

    result = volume(torch.from_numpy(points), d=d)

    assert float(result.volume) == pytest.approx(closed_form_volume(points, d), rel=1e-12)


@pytest.mark.parametrize(("m", "dim"), [(40, 6), (6, 40)], ids=["m>D", "m<D"])
def test_volume_equals_determinant_formula_where_it_is_finite(m, dim):
    points = np.random.default_rng(1).normal(size=(m, dim))
    expected = determinant_volume(points, d=2.0)
    assert math.isfinite(expected)

    assert float(volume(torch.from_numpy(points), d=2.0).volume) == pytest.approx(expected, rel=1e-10)


def test_volume_is_finite_where_determinant_overflows():
    # Centred 500 x 2048 float32 embeddings with per-dimension variance near 4: det(I + Z^T Z / m) overflows.
    generator = torch.Generator().manual_seed(2)
    embeddings = 2.0 * torch.randn(500, 2048, generator=generator)
    embeddings = embeddings - embeddings.mean(dim=0)
    centred = embeddings.double().numpy()
    with np.errstate(over="ignore"):
        assert math.isinf(np.linalg.det(np.eye(2048) + centred.T @ centred / 500))

    result = volume(embeddings)

    assert result.volume.dtype == torch.float32
    assert torch.isfinite(result.volume)
    assert float(result.volume) == pytest.approx(closed_form_volume(embeddings.numpy()), rel=1e-6)


def test_eigenvalue_fallback_equals_cholesky_path(monkeypatch):
    # The Cholesky factorisation of I + (d/m) Z^T Z fails only when rounding makes it indefinite, which takes
    # d sigma_max^2 / m of about 1e15 or more. Here the failure is simulated, and the fallback must agree.
    points = torch.randn(80, 12, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 3.0
    expected = float(volume(points, d=0.5).volume)
    factorise = torch.linalg.cholesky_ex

    def failing_cholesky(matrix):
        factor, info = factorise(matrix)
        return factor, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_cholesky)

    assert float(volume(points, d=0.5).volume) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(closed_form_volume(points.numpy(), d=0.5), rel=1e-12)


def test_density_is_volume_per_row():
    points = torch.randn(37, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    result = volume(points)

    assert float(result.density) == pytest.approx(float(result.volume) / 37, rel=1e-15)


def test_volume_is_invariant_to_translation_and_rotation():
    generator = torch.Generator().manual_seed(4)
    points = torch.randn(60, 7, generator=generator, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(7, 7, generator=generator, dtype=torch.float64)).Q

    moved = points @ rotation.T - 1000.0

    assert float(volume(moved).volume) == pytest.approx(float(volume(points).volume), rel=1e-10)


def test_volume_grows_with_spread_and_scale():
    points = torch.randn(100, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    assert float(volume(2 * points).volume) > float(volume(points).volume)
    assert float(volume(points, d=2.0).volume) > float(volume(points).volume)


def test_identical_rows_have_zero_volume():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = volume(torch.ones(10, 3))

    assert float(result.volume) == 0.0
    assert float(result.density) == 0.0


def test_two_rows_are_enough():
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)

    # One singular value, sqrt(2): 1/2 log2(1 + 2 / 2).
    assert float(volume(points).volume) == pytest.approx(0.5)


def test_nonfinite_rows_are_left_out_and_reported():
    points = torch.randn(30, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with_bad_rows = torch.cat([points[:10], torch.tensor([[float("inf"), 0, 0, 0], [float("nan")] * 4]), points[10:]])

    with pytest.warns(DegenerateInputWarning, match="2 rows with NaN or infinity") as record:
        result = volume(with_bad_rows)

    assert len(record) == 1
    assert float(result.volume) == pytest.approx(float(volume(points).volume), rel=1e-14)


@pytest.mark.parametrize(
    "points",
    [torch.ones(1, 5), torch.tensor([[1.0, 2.0], [float("nan"), 1.0]]), torch.full((4, 3), float("nan"))],
    ids=["one row", "one finite row", "no finite row"],
)
def test_fewer_than_two_finite_rows_give_nan(points):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = volume(points)

    assert torch.isnan(result.volume)
    assert torch.isnan(result.density)
    assert len(record) == 1
    assert issubclass(record[0].category, DegenerateInputWarning)
    assert "volume" in str(record[0].message)
    assert "at least 2" in str(record[0].message)


@pytest.mark.parametrize(
    ("d", "error"),
    [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("1", TypeError), (None, TypeError)],
)
def test_bad_scale_raises(d, error):
    with pytest.raises(error, match="`d`"):
        volume(torch.randn(10, 3), d=d)


def test_bad_input_raises():
    with pytest.raises(TypeError, match="torch.Tensor"):
        volume(np.zeros((10, 3)))
    with pytest.raises(ValueError, match="shape"):
        volume(torch.zeros(2, 3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_agrees_with_float32(dtype):
    points = 2.0 * torch.randn(300, 2048, generator=torch.Generator().manual_seed(7))
    low = points.to(dtype)

    result = volume(low)

    assert result.volume.dtype == torch.float32
    assert float(result.volume) == pytest.approx(float(volume(low.float()).volume), rel=1e-6)
    # Rounding each coordinate to 11 or 8 bits changes each singular value by far less than 0.1%.
    assert float(result.volume) == pytest.approx(float(volume(points).volume), rel=1e-3)


@pytest.mark.parametrize(("m", "dim"), [(40, 6), (6, 40)], ids=["m>D", "m<D"])
@pytest.mark.parametrize(
    ("scale", "d"),
    [(1e200, 1.0), (1e200, 1e-300), (1e300, 1.0), (1e-200, 1e300), (1e-300, 1e300)],
    ids=["1e200", "1e200-small-d", "1e300", "1e-200-large-d", "1e-300-large-d"],
)
def test_volume_at_extreme_scale_matches_mpmath(m, dim, scale, d):
    points = np.random.default_rng(9).normal(size=(m, dim))
    scaled = torch.from_numpy(points) * scale

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = volume(scaled, d=d)

    # The reference uses the unscaled singular values, so it also absorbs the rounding of points * scale.
    expected = scaled_reference_volume(points, scale, d)
    assert expected > 0.0
    assert float(result.volume) == pytest.approx(expected, rel=1e-12, abs=0)
    assert float(result.density) == pytest.approx(expected / m, rel=1e-12, abs=0)


@pytest.mark.parametrize(("exponent", "d"), [(520, 2.0**20), (-520, 2.0**-20)])
def test_scale_moved_into_d_keeps_volume(exponent, d):
    # volume(s x, d / s^2) = volume(x, d). With s = 2^520 the Gram matrix of s x overflows float64, and with
    # s = 2^-520 it is subnormal. d is chosen so that d / s^2 is still a normal float64.
    points = torch.randn(50, 7, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    scaled = volume(points * 2.0**exponent, d=math.ldexp(d, -2 * exponent))

    assert float(scaled.volume) == pytest.approx(float(volume(points, d=d).volume), rel=1e-14, abs=0)


def test_overflowing_cloud_has_finite_volume():
    # The Gram matrix of entries near 1e300 is infinite, and so is d sigma^2 / m. Each term is then log(1 + e^t).
    points = torch.randn(20, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * 1e300

    result = volume(points)

    assert torch.isfinite(result.volume)
    assert float(result.volume) == pytest.approx(
        scaled_reference_volume(points.numpy() / 1e300, 1e300), rel=1e-12, abs=0
    )


def test_extreme_identical_rows_give_zero():
    for scale in (1e300, 1e-300):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = volume(torch.full((6, 3), scale, dtype=torch.float64))

        assert float(result.volume) == 0.0


@pytest.mark.parametrize("d", [1e-6, 1e-12, 1e-100])
def test_small_volume_keeps_its_digits(d):
    # Below MIN_CHOLESKY_BITS every Cholesky diagonal entry is within about 1e-4 of 1, and its rounding would cost
    # digits. A cloud of 60 points in 5 dimensions has volume near 3.6 d bits.
    points = np.random.default_rng(12).normal(size=(60, 5))

    result = float(volume(torch.from_numpy(points), d=d).volume)

    assert result < MIN_CHOLESKY_BITS
    assert result == pytest.approx(scaled_reference_volume(points, 1.0, d), rel=1e-13, abs=0)


def test_rank_deficient_large_d_ignores_noise():
    # 8 points in 50 dimensions span 7 directions. At d = 1e40 the rounding remainder of the eighth eigenvalue of
    # the 8 x 8 Gram matrix, if counted, adds about 41 bits to the 475 of the other seven.
    points = np.random.default_rng(13).normal(size=(8, 50))

    result = float(volume(torch.from_numpy(points), d=1e40).volume)

    assert result == pytest.approx(scaled_reference_volume(points, 1.0, 1e40), rel=1e-12, abs=0)
