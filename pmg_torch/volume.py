"""Volume of a point cloud as the log-determinant of its regularised covariance, and its density."""

from __future__ import annotations

import math
import sys
from typing import NamedTuple

import torch
from torch import Tensor

from ._validation import (
    DegenerateInputError,
    check_cloud,
    check_positive_float,
    drop_nonfinite_rows,
    nan_scalar,
    power_of_two_scale,
    warn_degenerate,
    warn_dropped_rows,
    working_dtype,
)
from .dimension import centred_gram

#: Volumes below this many bits are recomputed from eigenvalues, because the Cholesky diagonal resolves each term
#: only to about 1e-16 in absolute terms. With 1e4 terms, the relative error of an accepted value is estimated at 2e-8
#: at most.
MIN_CHOLESKY_BITS = 1e-4

#: Range of the largest diagonal entry within which a Gram matrix is used as computed. Outside it, the Gram matrix is
#: recomputed from the cloud divided by a power of two, so that extra pass over the cloud runs only at extreme scales.
GRAM_RANGE = (2.0**-500, 2.0**500)

#: Largest ``d tr(Z_c^T Z_c) / m``, an upper bound of ``d sigma_max^2 / m``, for which the Cholesky factor is used.
#: Up to it, the rounding remainders of zero eigenvalues change the volume by an estimated 1e-5 bits each at most,
#: for ``max(m, D) <= 512``. Past it, the eigenvalues are computed and the remainders set to 0.
MAX_CHOLESKY_TRACE = 1e8

#: Largest ``|log(d s^2 lambda / m)|`` of a term computed from the product itself: inside it, the product is a
#: normal float64 (``log`` of the largest and smallest normal numbers is about 709.8 and -708.4).
MAX_PRODUCT_LOG = 700.0


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
    indefinite or the volume is below :data:`MIN_CHOLESKY_BITS`. It never forms the determinant, which overflows to
    infinity for ``D = 512`` embeddings. The Gram matrix is that of the cloud divided by a power of two ``s`` that
    brings its largest entry into ``[1, 2)``, with ``s^2`` moved into the coefficient, and where ``d s^2 / m`` leaves
    the float64 range each term is ``log(1 + e^t)`` of ``t = log(d s^2 lambda_i / m)``. So the result is finite for
    every finite input, and at ordinary magnitudes the scaling changes no bits. All-identical rows have no spread and
    give volume 0.

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
    points = finite.to(torch.float64)
    gram = centred_gram(points)
    scale = 1.0
    if not _is_in_safe_range(gram):
        # Gram entries are squares of the data, which overflow float64 beyond about 1e154 and underflow below
        # 1e-154. The cloud is divided by a power of two s, exactly, and s^2 moves into the coefficient d/m.
        scale = float(power_of_two_scale(points))
        gram = centred_gram(points / scale)
    coefficient = d / m * scale * scale
    bits = _bits_from_cholesky(gram, coefficient)
    if bits is None:
        bits = _bits_from_eigenvalues(gram, d, (m, points.shape[1]), scale)
    return VolumeResult(bits, bits / m)


def _is_in_safe_range(gram: Tensor) -> bool:
    """Return whether the largest diagonal entry of ``gram``, which bounds every entry, lies in :data:`GRAM_RANGE`."""
    # Inside these bounds the entries that move the volume, down to 1e-16 of the largest, are normal numbers, and
    # the largest is far from overflow. An overflowed Gram matrix has an infinite diagonal entry and fails the test.
    largest = float(gram.diagonal().max())
    return GRAM_RANGE[0] <= largest <= GRAM_RANGE[1]


def _bits_from_cholesky(gram: Tensor, coefficient: float) -> Tensor | None:
    """``1/2 log2 det(I + coefficient * gram)`` from a Cholesky factor, or None where that would be inaccurate."""
    # A coefficient that overflowed or fell below the smallest normal float64 is left to the eigenvalue path.
    if not sys.float_info.min <= coefficient < math.inf:
        return None
    # Past MAX_CHOLESKY_TRACE the rounding noise in the zero eigenvalues of a rank-deficient cloud would add
    # visible bits, which only the eigenvalues can leave out.
    if coefficient * float(gram.diagonal().sum()) > MAX_CHOLESKY_TRACE:
        return None
    # Every eigenvalue of I + (d/m) Z Z^T is at least 1, so it has a Cholesky factor L and log det = 2 sum log L_ii.
    # The factorisation takes about a third of the time of the eigenvalues. If rounding leaves the matrix
    # indefinite, the caller falls back to the eigenvalues, which report any failure.
    regularised = gram * coefficient
    regularised.diagonal().add_(1)
    factor, info = torch.linalg.cholesky_ex(regularised)
    bits = torch.log2(factor.diagonal()).sum()
    if int(info) != 0 or not torch.isfinite(bits):
        return None
    # Each L_ii carries an absolute rounding error near the float64 epsilon, so a small volume, where every L_ii
    # is close to 1, would lose its digits. The eigenvalues with log1p resolve it.
    if bits < MIN_CHOLESKY_BITS:
        return None
    return bits


def _bits_from_eigenvalues(gram: Tensor, d: float, shape: tuple[int, int], scale: float) -> Tensor:
    """``1/2 sum log2(1 + d scale^2 lambda / m)`` over the eigenvalues ``lambda`` of ``gram`` of an ``(m, D)`` cloud."""
    m = shape[0]
    try:
        squared_singular_values = torch.linalg.eigvalsh(gram)
    except torch.linalg.LinAlgError as error:
        raise DegenerateInputError(f"the eigendecomposition of the Gram matrix failed ({error})") from error
    # The float64 Gram matrix fixes its eigenvalues only to about max(m, D) eps lambda_max, so smaller ones are
    # indistinguishable from the exact zeros of a rank-deficient cloud (a centred cloud with m <= D has at least one)
    # and are set to 0. Otherwise, at a large d lambda_max / m, each rounding remainder would add bits: about 41 for 8
    # Gaussian points in 50 dimensions at d = 1e40. This also clears the slightly negative eigenvalues of rounding.
    noise_floor = max(shape) * torch.finfo(torch.float64).eps * squared_singular_values[-1]
    squared_singular_values = torch.where(squared_singular_values > noise_floor, squared_singular_values, 0.0)
    squared_scale = scale * scale
    if sys.float_info.min <= squared_scale < math.inf:
        # In this order the products are the same bits as d lambda / m for the unscaled cloud, unless one of them
        # overflows or turns subnormal.
        products = d * squared_singular_values * squared_scale / m
        positive = products[products > 0]
        if bool(torch.isfinite(products).all()) and bool((positive >= sys.float_info.min).all()):
            return 0.5 * torch.log1p(products).sum() / math.log(2)
    return 0.5 * _log1p_of_scaled(squared_singular_values, d, m, scale).sum() / math.log(2)


def _log1p_of_scaled(values: Tensor, d: float, m: int, scale: float) -> Tensor:
    """``log(1 + d scale^2 values / m)`` for non-negative ``values``, where the product may leave float64.

    With ``d scale^2 = mantissa 2^power`` and ``y = (mantissa / m) values``, a term whose product ``y 2^power`` is a
    normal float64 is ``log1p`` of that product, formed exactly by steps of powers of two. Any other term is
    ``log(1 + e^t)`` with ``t = log(y) + power log(2)``, which is ``t`` for the large terms. Terms below about 1e-304
    carry a relative error of up to about 700 float64 epsilons, from the rounding of ``t``. A zero value gives
    ``t = -inf`` and a term of 0.
    """
    mantissa, exponent = math.frexp(d)
    power = exponent + 2 * (math.frexp(scale)[1] - 1)
    reduced = values * (mantissa / m)
    exponents = torch.log(reduced) + power * math.log(2)
    in_range = exponents.abs() < MAX_PRODUCT_LOG
    products = torch.where(in_range, reduced, 0.0)
    # Each step multiplies by a power of two that is a normal float64, and every intermediate of a kept product
    # lies between y and the final product, so no step rounds.
    remaining = power
    while remaining != 0:
        step = max(-1000, min(1000, remaining))
        products = products * 2.0**step
        remaining -= step
    large_or_tiny = torch.logaddexp(torch.zeros_like(exponents), exponents)
    return torch.where(in_range, torch.log1p(products), large_or_tiny)
