"""Tests of pmg_torch.shape: agreement of principal axes, checked against numpy eigendecompositions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from pmg_torch import DegenerateInputWarning
from pmg_torch.shape import principal_axes, shape_similarity, shape_similarity_matrix

SCALES = torch.tensor([5.0, 3.0, 2.0, 1.0], dtype=torch.float64)


def anisotropic_cloud(m: int, seed: int, scales: torch.Tensor = SCALES) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(m, scales.shape[0], generator=generator, dtype=torch.float64) * scales


def plane_rotation(n_features: int, angle: float, axes: tuple[int, int] = (0, 1)) -> torch.Tensor:
    rotation = torch.eye(n_features, dtype=torch.float64)
    i, j = axes
    rotation[i, i] = rotation[j, j] = math.cos(angle)
    rotation[i, j], rotation[j, i] = -math.sin(angle), math.sin(angle)
    return rotation


def numpy_similarity(x: np.ndarray, y: np.ndarray) -> float:
    """Eigendecompose both covariances with numpy, sort by eigenvalue descending, and average |v_x,i . v_y,i|."""
    _, x_vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    _, y_vectors = np.linalg.eigh(np.cov(y, rowvar=False))
    x_vectors, y_vectors = x_vectors[:, ::-1], y_vectors[:, ::-1]
    return float(np.mean([abs(x_vectors[:, i] @ y_vectors[:, i]) for i in range(x.shape[1])]))


def test_cloud_with_itself_is_maximal() -> None:
    x = anisotropic_cloud(200, seed=0)
    others = [anisotropic_cloud(200, seed=1) @ plane_rotation(4, angle) for angle in (0.2, 0.7, 1.2)]
    assert float(shape_similarity(x, x)) == pytest.approx(1.0, abs=1e-12)
    for other in others:
        assert float(shape_similarity(x, other)) < float(shape_similarity(x, x))


def test_matches_numpy_eigendecomposition() -> None:
    x = anisotropic_cloud(300, seed=2)
    y = anisotropic_cloud(250, seed=3) @ plane_rotation(4, 0.4, axes=(1, 3))
    assert float(shape_similarity(x, y)) == pytest.approx(numpy_similarity(x.numpy(), y.numpy()), abs=1e-10)


def test_rotated_copy_scores_lower() -> None:
    x = anisotropic_cloud(300, seed=4)
    angle = math.pi / 6
    rotated = x @ plane_rotation(4, angle).T
    # Rotating by 30 degrees in the plane of the two largest axes turns each of them by cos(30 degrees).
    expected = (2 * math.cos(angle) + 2) / 4
    assert float(shape_similarity(x, rotated)) == pytest.approx(expected, abs=1e-10)
    assert float(shape_similarity(x, rotated)) < 1.0


def test_translation_and_scale_change_nothing() -> None:
    x = anisotropic_cloud(200, seed=5)
    y = anisotropic_cloud(200, seed=6) @ plane_rotation(4, 0.3).T
    reference = float(shape_similarity(x, y))
    assert float(shape_similarity(3.0 * x + 7.0, y - 2.0)) == pytest.approx(reference, abs=1e-10)


@pytest.mark.parametrize("m", [200, 3], ids=["more_rows_than_features", "fewer_rows_than_features"])
def test_flipped_eigenvector_signs_change_nothing(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    x = anisotropic_cloud(m, seed=7)
    y = anisotropic_cloud(200, seed=8) @ plane_rotation(4, 0.5).T
    reference = float(shape_similarity(x, y))
    unflipped = principal_axes(x).axes
    original_eigh = torch.linalg.eigh

    def eigh_with_flipped_signs(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eigenvalues, eigenvectors = original_eigh(a)
        signs = torch.tensor([-1.0, 1.0, -1.0, -1.0], dtype=eigenvectors.dtype)[: eigenvectors.shape[1]]
        return eigenvalues, eigenvectors * signs

    monkeypatch.setattr(torch.linalg, "eigh", eigh_with_flipped_signs)
    flipped = principal_axes(x).axes
    assert torch.allclose(flipped.abs(), unflipped.abs())
    assert not torch.allclose(flipped, unflipped)
    assert float(shape_similarity(x, y)) == pytest.approx(reference, abs=1e-12)


def test_symmetric_in_arguments() -> None:
    x = anisotropic_cloud(150, seed=9)
    y = anisotropic_cloud(180, seed=10) @ plane_rotation(4, 0.8, axes=(0, 2)).T
    assert float(shape_similarity(x, y)) == pytest.approx(float(shape_similarity(y, x)), abs=1e-12)


def test_dead_feature_columns_change_nothing() -> None:
    # Dead ReLU units give all-zero columns, whose eigenvectors are arbitrary; only ranked axes must count.
    x = anisotropic_cloud(100, seed=11)
    y = anisotropic_cloud(100, seed=12) @ plane_rotation(4, 0.6).T
    padded_x = torch.cat([x, torch.zeros(100, 6, dtype=torch.float64)], dim=1)
    padded_y = torch.cat([y, torch.zeros(100, 6, dtype=torch.float64)], dim=1)
    assert float(shape_similarity(padded_x, padded_y)) == pytest.approx(float(shape_similarity(x, y)), abs=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m", [50, 4])
def test_rank_equals_subspace_dimension(dtype: torch.dtype, m: int) -> None:
    # A cloud spread over a 3-dimensional subspace of R^6 that is not aligned with the axes.
    basis = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64))[0]
    x = (anisotropic_cloud(m, seed=15, scales=SCALES[:3]) @ basis.T).to(dtype)
    assert principal_axes(x).axes.shape == (6, min(3, m - 1))


def test_few_samples_use_ranked_axes() -> None:
    generator = torch.Generator().manual_seed(13)
    x = torch.randn(6, 20, generator=generator, dtype=torch.float64)
    y = torch.randn(9, 20, generator=generator, dtype=torch.float64)
    assert principal_axes(x).axes.shape == (20, 5)
    assert principal_axes(y).axes.shape == (20, 8)
    x_vectors = np.linalg.eigh(np.cov(x.numpy(), rowvar=False))[1][:, ::-1]
    y_vectors = np.linalg.eigh(np.cov(y.numpy(), rowvar=False))[1][:, ::-1]
    expected = np.mean(np.abs(np.sum(x_vectors[:, :5] * y_vectors[:, :5], axis=0)))
    assert float(shape_similarity(x, y)) == pytest.approx(expected, abs=1e-10)


def test_matrix_is_symmetric_with_unit_diagonal() -> None:
    clouds = {label: anisotropic_cloud(120, seed=20 + label) @ plane_rotation(4, 0.3 * label).T for label in range(5)}
    matrix = shape_similarity_matrix(clouds)
    assert matrix.shape == (5, 5)
    torch.testing.assert_close(matrix, matrix.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.diagonal(matrix), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_matrix_entries_equal_pairwise_similarity() -> None:
    clouds = [anisotropic_cloud(100 + 10 * c, seed=30 + c) @ plane_rotation(4, 0.25 * c).T for c in range(4)]
    clouds.append(torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    matrix = shape_similarity_matrix(clouds)
    for a in range(5):
        for b in range(5):
            assert float(matrix[a, b]) == pytest.approx(float(shape_similarity(clouds[a], clouds[b])), abs=1e-10)


def test_matrix_degenerate_class_is_nan() -> None:
    clouds = {
        "cat": anisotropic_cloud(50, seed=40),
        "dog": anisotropic_cloud(1, seed=41),
        "eel": anisotropic_cloud(50, seed=42),
    }
    with pytest.warns(DegenerateInputWarning, match="class dog") as record:
        matrix = shape_similarity_matrix(clouds)
    assert len(record) == 1
    assert torch.isnan(matrix[1]).all()
    assert torch.isnan(matrix[:, 1]).all()
    assert not torch.isnan(matrix[[0, 2]][:, [0, 2]]).any()


def test_identical_rows_give_nan_with_warning() -> None:
    x = anisotropic_cloud(50, seed=43)
    same = torch.ones(10, 4, dtype=torch.float64)
    with pytest.warns(DegenerateInputWarning, match="identical") as record:
        value = shape_similarity(x, same)
    assert len(record) == 1
    assert torch.isnan(value)


def test_nonfinite_rows_are_left_out_with_warning() -> None:
    x = anisotropic_cloud(80, seed=44)
    y = anisotropic_cloud(80, seed=45) @ plane_rotation(4, 0.5).T
    corrupted = torch.cat([y, torch.full((2, 4), float("nan"), dtype=torch.float64)])
    with pytest.warns(DegenerateInputWarning, match=r"shape similarity \(y\) left out 2 rows with NaN or infinity"):
        value = shape_similarity(x, corrupted)
    assert float(value) == pytest.approx(float(shape_similarity(x, y)), abs=1e-12)


def test_different_dimensions_raise() -> None:
    with pytest.raises(ValueError, match="same dimension D"):
        shape_similarity(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="same dimension D"):
        shape_similarity_matrix([torch.randn(10, 3), torch.randn(10, 3), torch.randn(10, 5)])


def test_empty_or_wrong_clouds_raise() -> None:
    with pytest.raises(ValueError, match="at least one cloud"):
        shape_similarity_matrix({})
    with pytest.raises(TypeError, match="mapping"):
        shape_similarity_matrix(torch.randn(3, 10, 4))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating-point"):
        shape_similarity(torch.ones(5, 2, dtype=torch.long), torch.randn(5, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input_agrees_with_float64(dtype: torch.dtype) -> None:
    x = anisotropic_cloud(200, seed=46)
    y = anisotropic_cloud(200, seed=47) @ plane_rotation(4, 0.4).T
    value = shape_similarity(x.to(dtype), y.to(dtype))
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(shape_similarity(x, y)), abs=2e-2)


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300])
@pytest.mark.parametrize("m", [200, 3], ids=["more_rows_than_features", "fewer_rows_than_features"])
def test_extreme_scale_changes_nothing(scale: float, m: int) -> None:
    # The Gram matrix of entries near 1e200 overflows float64, and that of entries near 1e-200 underflows to 0.
    x = anisotropic_cloud(m, seed=48)
    y = anisotropic_cloud(m, seed=49) @ plane_rotation(4, 0.4).T
    reference = float(shape_similarity(x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = shape_similarity(x * scale, y * scale)
    assert float(value) == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("exponent", [600, -600, 1])
@pytest.mark.parametrize("m", [200, 3], ids=["more_rows_than_features", "fewer_rows_than_features"])
def test_power_of_two_scale_gives_identical_axes(exponent: int, m: int) -> None:
    # Scaling by a power of two is exact, so the axes are the same bits as for the unscaled cloud.
    x = anisotropic_cloud(m, seed=50)
    assert torch.equal(principal_axes(x * 2.0**exponent).axes, principal_axes(x).axes)


def test_matrix_at_extreme_scales_matches_unscaled() -> None:
    clouds = {label: anisotropic_cloud(60, seed=51 + label) * 10.0 ** (250 * (label - 1)) for label in range(3)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matrix = shape_similarity_matrix(clouds)
    torch.testing.assert_close(torch.diagonal(matrix), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    unscaled = shape_similarity_matrix([anisotropic_cloud(60, seed=51 + label) for label in range(3)])
    torch.testing.assert_close(matrix, unscaled, rtol=0, atol=1e-12)
