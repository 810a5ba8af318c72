"""Volume of a point cloud as the log-determinant of its regularised covariance, and its density."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._validation import (
    DegenerateInputError,
    check_cloud,
    check_positive_float,
    drop_nonfinite_rows,
    nan_scalar,
    warn_degenerate,
    warn_dropped_rows,
    working_dtype,
)
from .dimension import centred_gram


class VolumeResult(NamedTuple):
    """Volume of one cloud.

    Attributes:
        volume: 0-d, ``1/2 log2 det(I + (d/m) Z_c^T Z_c)``, in bits.
        density: 0-d, ``volume / m``.
    """

    volume: Tensor
    density: Tensor


def volume(x: Tensor, d: float = 1.0) -> VolumeResult:
    """Compute the volume and density of the cloud ``x``.

    With ``Z_c`` the centred ``(m, D)`` cloud and ``sigma_i`` its singular values::

        volume  = 1/2 log2 det(I_D + (d/m) Z_c^T Z_c) = 1/2 sum_i log2(1 + d sigma_i^2 / m)
        density = volume / m

    It is evaluated in float64 from the smaller Gram matrix of ``Z_c``: ``m x m`` when ``m < D``, else ``D x D``,
    which have the same non-zero eigenvalues ``sigma_i^2``. The sum is that of the logarithms of the diagonal of
    the Cholesky factor of ``I + (d/m) Gram``, or of ``log1p`` of the eigenvalues when rounding makes that matrix
    indefinite. It never forms the determinant, which overflows to infinity for ``D = 512`` embeddings, so the
    result is finite for every finite input. All-identical rows have no spread and give volume 0.

    Args:
        x: ``(m, D)`` points, floating point. Rows with NaN or infinity are left out, and ``m`` counts the rest.
        d: the scale ``d > 0``.

    Returns:
        :class:`VolumeResult` of 0-d tensors in the working dtype (float64 for float64 input, float32 otherwise) on
        ``x``'s device.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor or ``d`` is not a number.
        ValueError: if ``x`` is not ``(m, D)`` or ``d`` is not a finite number above 0.

    Warns:
        DegenerateInputWarning: NaN is returned when fewer than 2 finite rows remain, or the eigendecomposition
            fails, and a warning is also issued when rows were left out.

    Example:
        >>> cloud = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
        >>> volume(cloud).volume  # 1/2 log2(1 + 2 / 2) for the one singular value sqrt(2)
        tensor(0.5000, dtype=torch.float64)
    """
    x = check_cloud(x)
    d = check_positive_float(d, "d")
    finite, n_nonfinite = drop_nonfinite_rows(x)
    try:
        result = _volume(finite, d, n_nonfinite)
    except DegenerateInputError as error:
        warn_degenerate("volume", error.reason)
        return VolumeResult(nan_scalar(x), nan_scalar(x))
    warn_dropped_rows("volume", n_nonfinite, 0, finite.shape[0])
    dtype = working_dtype(x)
    return VolumeResult(result.volume.to(dtype), result.density.to(dtype))


def _volume(finite: Tensor, d: float, n_nonfinite: int) -> VolumeResult:
    m = finite.shape[0]
    if m < 2:
        dropped = f" ({n_nonfinite} rows with NaN or infinity left out)" if n_nonfinite else ""
        raise DegenerateInputError(f"{m} finite rows{dropped}; a covariance needs at least 2")
    gram = centred_gram(finite)
    # Every eigenvalue of I + (d/m) Z Z^T is at least 1, so it has a Cholesky factor L and log det = 2 sum log L_ii.
    # The factorisation takes about a third of the time of the eigenvalues. Rounding can still leave the matrix
    # indefinite once d sigma_max^2 / m reaches about 1e15, and overflow can make it infinite. The eigenvalues then
    # decide, and report a failure.
    regularised = gram * (d / m)
    regularised.diagonal().add_(1)
    factor, info = torch.linalg.cholesky_ex(regularised)
    bits = torch.log2(factor.diagonal()).sum()
    if int(info) != 0 or not torch.isfinite(bits):
        bits = _bits_from_eigenvalues(gram, d, m)
    return VolumeResult(bits, bits / m)


def _bits_from_eigenvalues(gram: Tensor, d: float, m: int) -> Tensor:
    """``1/2 sum log2(1 + d lambda / m)`` over the eigenvalues ``lambda`` of ``gram``."""
    try:
        squared_singular_values = torch.linalg.eigvalsh(gram)
    except torch.linalg.LinAlgError as error:
        raise DegenerateInputError(f"the eigendecomposition of the Gram matrix failed ({error})") from error
    # Rounding can leave eigenvalues of a positive semi-definite matrix slightly below 0.
    squared_singular_values = squared_singular_values.clamp_min(0)
    return 0.5 * torch.log1p(d * squared_singular_values / m).sum() / math.log(2)
