"""Curvature of a point cloud from the angles between the local tangent spaces of neighbouring points.

Two methods share one neighbour search (:func:`pmg_torch.neighbourhoods`):

* ``"tangent"`` measures bending: the mean principal angle between the tangent spaces of a point and of each of
  its neighbours. A flat affine subspace gives 0, and the value does not change under rotation, translation or
  uniform scaling.
* ``"reference"`` reproduces the formula of the published curvature code (Ma et al., CVPR 2023), so that numbers
  can be compared with those papers. It measures how spread out neighbourhoods are, not bending, and it changes
  with the scale of the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import Tensor

from ._validation import (
    DegenerateInputError,
    check_choice,
    check_cloud,
    check_positive_int,
    drop_nonfinite_rows,
    warn_degenerate,
    warn_dropped_rows,
    working_dtype,
)
from .dimension import tle_pointwise
from .neighbours import (
    MAX_BLOCK_ENTRIES,
    OFFSET_BLOCK_ENTRIES,
    Neighbourhoods,
    neighbour_offset_grams,
    neighbour_pairs,
    neighbourhood_spreads,
    neighbourhoods,
    remove_duplicate_rows,
    search_scale,
)

METHODS = ("tangent", "reference")

#: Singular values of a neighbourhood below this fraction of its largest count as rounding noise when the default
#: tangent dimension is capped at the numerical rank. The float64 Gram eigenvalues put the noise floor near 1e-7,
#: and float32 coordinates add about 1e-7 times the distance from the origin over the neighbourhood's spread.
RANK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}

#: Most distinct rows for which float32 and half input take the Gram route of the tangent method, where one
#: ``n x n`` float64 Gram matrix of the cloud replaces every product of length ``D`` between tangent bases. At this
#: size the matrix has :data:`pmg_torch.neighbours.MAX_BLOCK_ENTRIES` entries (128 MiB).
GRAM_ROUTE_MAX_POINTS = 4096

#: Largest error, in radians, that rounding may leave in the mean principal angle of a pair of neighbours. Pairs
#: whose angles come from cosines and may exceed it are measured again from residuals. float64 input gets 0, so all
#: of its angles come from residuals and match per-point references to about 1e-12. float32 rounding moves each row
#: by up to 6e-8 of its norm. When rows lie ten times as far from the origin as a neighbourhood is wide, that turns
#: a tangent direction by about 6e-7 radians, so 1e-6 is at the scale of the input's own precision.
ANGLE_TOLERANCE = {torch.float64: 0.0, torch.float32: 1e-6}

#: Entries of one block of the pair computations (gathered Gram blocks or bases), 2**20 (8 MiB in float64). Larger
#: blocks ran slower, and much smaller ones pay the fixed cost of each batched call too often.
PAIR_BLOCK_ENTRIES = 2**20

_EPSILON = torch.finfo(torch.float64).eps

#: Minimum number of matrices per thread for which :func:`_split_over_threads` starts threads. 256 small
#: eigenproblems take about a millisecond, far longer than starting a thread.
_MATRICES_PER_THREAD = 256

_Solution = TypeVar("_Solution")


class CurvatureResult(NamedTuple):
    """Curvature of one cloud.

    Attributes:
        overall: 0-d, the mean of ``local``.
        local: ``(n,)`` one value per distinct finite row of the input, in order of first appearance.
    """

    overall: Tensor
    local: Tensor


def curvature(
    x: Tensor, k: int = 20, method: str = "tangent", tangent_dim: int | None = None, *, chunk_size: int | None = None
) -> CurvatureResult:
    """Compute the curvature of the cloud ``x`` from the angles between neighbouring tangent spaces.

    For point ``i``, ``M_i`` is the ``(k, D)`` matrix of its ``k`` nearest other points, centred on their mean.

    ``method="tangent"`` (default): the tangent space ``T_i`` is spanned by the top ``t = tangent_dim`` right
    singular vectors of ``M_i``. With ``theta_1..theta_t`` the principal angles between ``T_i`` and ``T_j``::

        local_i = mean_{j in kNN(i)} mean_l theta_l(T_i, T_j),        overall = mean_i local_i

    in radians, from 0 (flat) to pi/2. Flat affine subspaces give 0, a sphere gives a positive value that shrinks
    as sampling gets denser, and the value is invariant to rotation, translation and uniform scaling.

    ``method="reference"``: the formula of the published code. With the thin SVD ``M_i = U_i S_i V_i^T``::

        angle_ij = arccos(clip(sum(svdvals(U_i^T U_j)) / (|S_i|_2 |S_j|_2), -1, 1))

    and the same means. ``U_i`` lives in neighbour-index space, not in the ambient space, so this measures how
    spread out the neighbourhoods are rather than how the data bend. When ``k <= D``, ``U_i`` is a square
    orthogonal matrix and the numerator is exactly ``k``, so the angle depends only on the Frobenius norms of
    ``M_i`` and ``M_j``. The value changes with the scale of the data, and a flat plane is not 0: it ranges from 0
    while neighbourhoods are small (the ratio clips at 1) to nearly pi/2 once they are large.

    Rows with NaN or infinity and exact duplicate rows are left out first (one :class:`DegenerateInputWarning`
    reports how many); ``local`` has one entry per remaining row.

    The linear algebra runs in float64. For float64 input every principal angle comes from the residual between
    two orthonormal bases in ``R^D``, so flat subspaces give 0 to about 1e-15. float32 and half input with at most
    4096 distinct rows goes through the float64 Gram matrix of the whole cloud instead, whose cost does not grow
    with ``D`` past that one product. Each pair's mean angle is then accurate to 1e-6 radians: pairs that rounding
    could move further are measured again from residuals. Measured errors on curved clouds are near 1e-8.

    Args:
        x: ``(m, D)`` points, floating point.
        k: neighbours per point, at least 2.
        method: ``"tangent"`` or ``"reference"``.
        tangent_dim: ``t`` for ``"tangent"``, in ``[1, min(k, D)]``. ``None`` (default) takes the TLE intrinsic
            dimension of the same neighbourhoods, rounded to the nearest integer and clamped to ``[1, min(k - 1,
            D - 1)]`` and to the median numerical rank of the neighbourhoods (singular values above 1e-6 of the
            largest for float64 input, 1e-3 otherwise), so that a flat subspace never gets more tangent directions
            than it has. TLE can be off by more than 0.5: it underestimates flat subspaces above about 5
            dimensions when points are few (8 dimensions from 200 points read as 6.7), and overestimates curved
            surfaces when ``k`` is small (a sphere with ``k = 5`` reads as 2.9). Pass ``tangent_dim`` when the
            dimension is known.
        chunk_size: points per block in the neighbour search and the per-point linear algebra, and pairs of
            neighbours per block among tangent bases in ``R^D``. By default blocks are sized to stay in cache or
            under 2**24 entries; the Gram route sizes its own blocks.

    Returns:
        :class:`CurvatureResult` in the working dtype (float64 for float64 input, float32 otherwise) on ``x``'s
        device. The linear algebra runs in float64.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor, or ``k``, ``tangent_dim`` or ``chunk_size`` is not an
            int.
        ValueError: if ``x`` is not ``(m, D)``, ``k < 2``, ``method`` is unknown, ``tangent_dim`` is outside
            ``[1, min(k, D)]`` or given with ``method="reference"``.

    Warns:
        DegenerateInputWarning: when the result is NaN (fewer than ``k + 1`` distinct finite rows), or when rows
            were left out.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> plane = torch.rand(300, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        ...     2, 5, generator=generator, dtype=torch.float64
        ... )
        >>> float(curvature(plane, k=10).overall) < 1e-6
        True
    """
    x = check_cloud(x)
    k = _check_k(k)
    method = check_choice(method, "method", METHODS)
    tangent_dim = _check_tangent_dim(tangent_dim, method, k, x.shape[1])
    if chunk_size is not None:
        chunk_size = check_positive_int(chunk_size, "chunk_size")
    try:
        nb = neighbourhoods(x, k, chunk_size=chunk_size)
        result = _curvature(nb, method, tangent_dim, chunk_size)
    except DegenerateInputError as error:
        warn_degenerate("curvature", error.reason)
        return _nan_result(x)
    warn_dropped_rows("curvature", nb.n_nonfinite, nb.n_duplicates, nb.points.shape[0])
    return result


def curvature_from_neighbourhoods(
    nb: Neighbourhoods,
    method: str = "tangent",
    tangent_dim: int | None = None,
    *,
    local_dimensions: Tensor | None = None,
) -> CurvatureResult:
    """Compute the curvature from a finished neighbour search; see :func:`curvature` for the definitions.

    Args:
        nb: the output of :func:`pmg_torch.neighbourhoods`, with ``nb.k >= 2``.
        method: ``"tangent"`` or ``"reference"``.
        tangent_dim: as in :func:`curvature`.
        local_dimensions: ``(n,)`` the pointwise TLE estimates of ``nb`` (:func:`pmg_torch.dimension.tle_pointwise`)
            when the caller has them, for the default tangent dimension; computed here when ``None``.

    Returns:
        :class:`CurvatureResult` in the dtype of ``nb.points`` on its device.

    Raises:
        TypeError: if ``nb`` is not a :class:`~pmg_torch.Neighbourhoods`.
        ValueError: for an unknown ``method``, ``nb.k < 2``, or a ``tangent_dim`` outside ``[1, min(k, D)]``.
        DegenerateInputError: if an eigendecomposition fails.
    """
    if not isinstance(nb, Neighbourhoods):
        raise TypeError(f"Expected `nb` to be a Neighbourhoods from pmg_torch.neighbourhoods, got {type(nb).__name__}.")
    k = _check_k(nb.k)
    method = check_choice(method, "method", METHODS)
    tangent_dim = _check_tangent_dim(tangent_dim, method, k, nb.points.shape[1])
    return _curvature(nb, method, tangent_dim, None, local_dimensions)


def default_tangent_dim(nb: Neighbourhoods, eigenvalues: Tensor, local_dimensions: Tensor | None = None) -> int:
    """Choose the tangent dimension: rounded TLE, clamped to ``[1, min(k - 1, D - 1)]`` and to the numerical rank.

    A tangent space as wide as the ambient space contains every other one, so every angle would be 0: the clamp to
    ``D - 1`` keeps a sphere in R^3 curved when TLE reads it as 3-dimensional. ``eigenvalues`` ``(n, k)`` are
    those of each neighbourhood's Gram matrix ``M_i M_i^T``, descending. ``local_dimensions`` ``(n,)`` are the
    pointwise TLE estimates when the caller has them (:func:`pmg_torch.dimension.tle_pointwise`). See the
    ``tangent_dim`` argument of :func:`curvature` for when this choice is off.
    """
    dim = nb.points.shape[1]
    singular_values = eigenvalues.clamp_min(0).sqrt()
    tolerance = RANK_TOLERANCE.get(nb.points.dtype, RANK_TOLERANCE[torch.float32])
    ranks = (singular_values > tolerance * singular_values[:, :1]).sum(dim=1)
    median_rank = int(ranks.median())
    if local_dimensions is None:
        local_dimensions = tle_pointwise(nb)
    estimate = float(local_dimensions.mean())
    rounded = math.floor(estimate + 0.5) if math.isfinite(estimate) else 1
    return max(1, min(rounded, nb.k - 1, max(dim - 1, 1), median_rank))


def _curvature(
    nb: Neighbourhoods,
    method: str,
    tangent_dim: int | None,
    chunk_size: int | None,
    local_dimensions: Tensor | None = None,
) -> CurvatureResult:
    try:
        if method == "reference":
            local = _reference_local_curvature(nb, chunk_size)
        else:
            local = _tangent_local_curvature(nb, tangent_dim, chunk_size, local_dimensions)
    except torch.linalg.LinAlgError as error:
        raise DegenerateInputError(f"a neighbourhood's decomposition failed ({error})") from error
    dtype = nb.points.dtype
    return CurvatureResult(local.mean().to(dtype), local.to(dtype))


def _tangent_local_curvature(
    nb: Neighbourhoods, tangent_dim: int | None, chunk_size: int | None, local_dimensions: Tensor | None
) -> Tensor:
    """Mean principal angle between each point's tangent space and its neighbours', ``(n,)`` in float64.

    Each unordered pair of neighbours is measured once, because the angles between ``T_i`` and ``T_j`` do not
    depend on the order. float32 and half input of at most :data:`GRAM_ROUTE_MAX_POINTS` rows take the Gram route
    (:func:`_gram_route_angles`), and the pairs it cannot measure to :data:`ANGLE_TOLERANCE` are measured again from
    residuals in ``R^D``. Other input builds every tangent basis in ``R^D`` and takes the angles from cosines when
    their rounding stays within the tolerance, from residuals otherwise.
    """
    # Angles do not change with scale, so the lengths are taken in the search's units, which neither overflow nor
    # underflow at any magnitude of the data.
    offset_grams = neighbour_offset_grams(nb, chunk_size=chunk_size, scaled=True)
    eigenvalues, eigenvectors = _neighbourhood_spectra(offset_grams)
    if tangent_dim is None:
        if local_dimensions is None:
            local_dimensions = tle_pointwise(nb, offset_grams=offset_grams)
        tangent_dim = default_tangent_dim(nb, eigenvalues, local_dimensions)
    left_vectors = eigenvectors[:, :, :tangent_dim]
    pairs, slots = neighbour_pairs(nb.indices)
    points = nb.points.to(torch.float64)
    tolerance = ANGLE_TOLERANCE.get(nb.points.dtype, ANGLE_TOLERANCE[torch.float32])

    if nb.points.dtype != torch.float64 and points.shape[0] <= GRAM_ROUTE_MAX_POINTS:
        singular_values = eigenvalues[:, :tangent_dim].clamp_min(0).sqrt()
        gram = _cloud_gram(nb)
        angles, unreliable = _gram_route_angles(
            gram, points.shape[1], nb.indices, pairs, singular_values, left_vectors, tolerance
        )
        redo = unreliable.nonzero().squeeze(1)
        if redo.numel() > 0:
            involved, redo_pairs = torch.unique(pairs[redo], return_inverse=True)
            bases = _tangent_bases(points, nb.indices[involved], left_vectors[involved], chunk_size)
            angles[redo] = _residual_angles(bases, redo_pairs, chunk_size)
    else:
        bases = _tangent_bases(points, nb.indices, left_vectors, chunk_size)
        if math.sqrt(_basis_cosine_error(tangent_dim, points.shape[1])) <= tolerance:
            angles = _basis_angles(bases, pairs, chunk_size)
        else:
            angles = _residual_angles(bases, pairs, chunk_size)
    return angles[slots].mean(dim=1)


def _neighbourhood_spectra(offset_grams: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decompose each ``k x k`` Gram matrix ``M_i M_i^T``; return ``(n, k)`` values and ``(n, k, k)`` vectors.

    Both are sorted by descending eigenvalue. ``M_i M_i^T`` is the double-centred offset Gram matrix, because
    centring on the neighbours' mean removes the point itself. The ``k x k`` Gram is much cheaper than a ``k x D``
    SVD when ``D >> k``, and its eigenvectors are the left singular vectors of ``M_i``.
    """
    centred = offset_grams - offset_grams.mean(dim=1, keepdim=True)
    centred = centred - centred.mean(dim=2, keepdim=True)
    eigenvalues, eigenvectors = _split_over_threads(torch.linalg.eigh, centred)
    return eigenvalues.flip(-1), eigenvectors.flip(-1)


def _centred_neighbourhoods(points: Tensor, indices: Tensor) -> Tensor:
    """``(c, k, D)``: each point's neighbours, centred on their own mean."""
    neighbours = points[indices]
    return neighbours - neighbours.mean(dim=1, keepdim=True)


def _tangent_bases(points: Tensor, indices: Tensor, left_vectors: Tensor, chunk_size: int | None) -> Tensor:
    """Orthonormal tangent bases ``(c, t, D)``, one basis vector a row, from the top ``t`` left singular vectors.

    ``indices`` ``(c, k)`` and ``left_vectors`` ``(c, k, t)`` belong to the ``c`` points whose bases are needed.
    ``M_i^T u_l = s_l v_l``, so ``M_i^T U_t`` spans the top right singular vectors. A QR factorisation makes the
    basis orthonormal without dividing by ``s_l``, which may be zero when ``t`` exceeds the neighbourhood's rank.
    The extra directions are then arbitrary, and so are the angles they contribute.
    """
    dim = points.shape[1]
    c, k, t = left_vectors.shape
    bases = torch.empty((c, t, dim), dtype=torch.float64, device=points.device)
    for start, stop in _chunks(c, k * dim, chunk_size, OFFSET_BLOCK_ENTRIES):
        centred = _centred_neighbourhoods(points, indices[start:stop])
        spanning = centred.transpose(1, 2) @ left_vectors[start:stop]
        bases[start:stop] = torch.linalg.qr(spanning).Q.transpose(1, 2)
    return bases


def _cloud_gram(nb: Neighbourhoods) -> Tensor:
    """Return the float64 Gram matrix of the centred cloud divided by :func:`~pmg_torch.neighbours.search_scale`.

    It is the search's own matrix when the search formed one.
    """
    if nb.gram is not None:
        return nb.gram
    centred = nb.points.to(torch.float64) / search_scale(nb)
    centred = centred - centred.mean(dim=0)
    return centred @ centred.T


def _gram_route_angles(
    gram: Tensor,
    dim: int,
    indices: Tensor,
    pairs: Tensor,
    singular_values: Tensor,
    left_vectors: Tensor,
    tolerance: float,
) -> tuple[Tensor, Tensor]:
    """Mean principal angle of each pair from the Gram matrix ``G = X_c X_c^T`` of the centred cloud, ``(p,)``.

    With ``W_i = C U_t S_t^-1`` (``C`` the ``k x k`` centring matrix), the tangent basis is ``T_i = X_{N_i}^T W_i``,
    so ``T_a^T T_b = W_a^T G[N_a, N_b] W_b`` takes ``k x k`` entries of ``G`` instead of products of length ``D``.
    The only work that grows with ``D`` is ``G`` itself, ``2 n^2 D`` in float64.

    Returns:
        ``(angles, unreliable)``, both ``(p,)``. A pair is unreliable when rounding may have moved its mean angle
        by more than ``tolerance``. :func:`_sines_from_cosines` states how an error in the squared sines moves an
        angle.
    """
    k = indices.shape[1]
    t = left_vectors.shape[2]
    weights, rounding = _gram_route_weights(gram, dim, indices, singular_values, left_vectors)

    angles = torch.empty(pairs.shape[0], dtype=torch.float64, device=gram.device)
    unreliable = torch.empty(pairs.shape[0], dtype=torch.bool, device=gram.device)
    for start, stop in _chunks(pairs.shape[0], k * k, None, PAIR_BLOCK_ENTRIES):
        first, second = pairs[start:stop, 0], pairs[start:stop, 1]
        blocks = _gram_blocks(gram, indices[first], indices[second])
        cosines = weights[first].transpose(1, 2) @ blocks @ weights[second]
        # On float32 clouds from a 4000-point line to 512-D embeddings, 8 t times the larger rounding estimate was
        # at least twice the measured error of the squared sines. The last term covers forming I - P^T P.
        error = 8 * t * torch.maximum(rounding[first], rounding[second])[:, None] + 4 * t * _EPSILON
        sines = _sines_from_cosines(cosines)
        angles[start:stop] = torch.arcsin(sines).mean(dim=1)
        error_bound = torch.minimum(error.sqrt(), error / (2 * sines)).mean(dim=1)
        unreliable[start:stop] = error_bound > tolerance
    return angles, unreliable


def _gram_route_weights(
    gram: Tensor, dim: int, indices: Tensor, singular_values: Tensor, left_vectors: Tensor
) -> tuple[Tensor, Tensor]:
    """Return the weights ``W_i`` ``(n, k, t)`` of the Gram route and an estimate of each one's rounding, ``(n,)``.

    ``G`` is rounded relative to the squared norms of the centred rows, so ``W_a^T G[N_a, N_b] W_b`` is off by up
    to about ``eps sqrt(D) (|x|_max / s_t)^2``, with ``|x|_max`` the largest norm in the neighbourhood and ``s_t``
    its ``t``-th singular value. The departure of each basis from orthonormality, ``|W_i^T G[N_i, N_i] W_i - I|``,
    is a second, measured estimate; the larger of the two is returned. A neighbourhood whose ``t``-th singular
    value is below 1e-6 of its largest gets weights 0 and an infinite estimate, so its pairs are always
    recomputed.
    """
    n, k = indices.shape
    t = left_vectors.shape[2]
    full_rank = singular_values[:, -1] > RANK_TOLERANCE[torch.float64] * singular_values[:, 0]
    weights = torch.where(full_rank[:, None, None], left_vectors / singular_values[:, None, :], 0)
    weights = weights - weights.mean(dim=1, keepdim=True)

    largest_norms = gram.diagonal().sqrt()[indices].amax(dim=1)
    rounding = _EPSILON * math.sqrt(dim) * (largest_norms / singular_values[:, -1]).square()
    identity = torch.eye(t, dtype=torch.float64, device=gram.device)
    for start, stop in _chunks(n, k * k, None, PAIR_BLOCK_ENTRIES):
        own_blocks = _gram_blocks(gram, indices[start:stop], indices[start:stop])
        overlap = weights[start:stop].transpose(1, 2) @ own_blocks @ weights[start:stop]
        defect = (overlap - identity).abs().amax(dim=(1, 2))
        rounding[start:stop] = torch.maximum(rounding[start:stop], defect)
    return weights, torch.where(full_rank, rounding, math.inf)


def _gram_blocks(gram: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """``(c, k, k)`` blocks ``gram[rows[i]][:, columns[i]]``, gathered through one flat index.

    One ``index_select`` on the flattened matrix, with an int32 index, took about a third of the time of indexing
    with two broadcast int64 index tensors. ``gram`` has at most 2**24 entries on this route, so int32 suffices.
    """
    n = gram.shape[0]
    c, k = rows.shape
    flat = (rows.to(torch.int32) * n)[:, :, None] + columns.to(torch.int32)[:, None, :]
    return gram.view(-1).index_select(0, flat.view(-1)).view(c, k, k)


def _basis_angles(bases: Tensor, pairs: Tensor, chunk_size: int | None) -> Tensor:
    """Mean principal angle of each pair from the cosines ``T_a^T T_b`` of orthonormal bases ``(n, t, D)``, ``(p,)``.

    Accurate to ``sqrt(e)`` near 0, with ``e`` from :func:`_basis_cosine_error`; :func:`_residual_angles` is
    accurate to working precision at three times the cost.
    """
    n, t, dim = bases.shape
    angles = torch.empty(pairs.shape[0], dtype=torch.float64, device=bases.device)
    for start, stop in _chunks(pairs.shape[0], 2 * t * dim, chunk_size, PAIR_BLOCK_ENTRIES):
        cosines = bases[pairs[start:stop, 0]] @ bases[pairs[start:stop, 1]].transpose(1, 2)
        angles[start:stop] = torch.arcsin(_sines_from_cosines(cosines)).mean(dim=1)
    return angles


def _basis_cosine_error(tangent_dim: int, dim: int) -> float:
    """Bound on the absolute error of squared sines taken from the cosines of float64 QR bases in ``R^dim``.

    QR leaves the bases orthonormal to a few units of rounding, and each cosine is a sum of ``dim`` products.
    """
    return 4 * tangent_dim * math.sqrt(dim) * _EPSILON


def _sines_from_cosines(cosines: Tensor) -> Tensor:
    """``(c, t)`` sines of the principal angles, ascending, from ``(c, t, t)`` cosine matrices ``P = T_a^T T_b``.

    The squared sines are the eigenvalues of ``I - P^T P``. Near 0 they have cancelled: an absolute error ``e`` in
    them moves an angle ``theta`` by about ``e / (2 sin theta)``, and by up to ``sqrt(e)`` when ``theta`` is 0.
    """
    identity = torch.eye(cosines.shape[-1], dtype=cosines.dtype, device=cosines.device)
    squared_sines = _split_over_threads(torch.linalg.eigvalsh, identity - cosines.transpose(1, 2) @ cosines)
    return squared_sines.clamp_(0, 1).sqrt_()


def _residual_angles(bases: Tensor, pairs: Tensor, chunk_size: int | None) -> Tensor:
    """Mean principal angle of each pair from the residual of one basis against the other, ``(p,)``.

    The cosines of the principal angles lose half their digits near 1, so a flat subspace would come out near 1e-8
    instead of 0. The squared sines are also the eigenvalues of ``R^T R`` with ``R = T_b - T_a (T_a^T T_b)``, and
    forming ``R`` before its Gram matrix keeps small sines accurate to working precision. ``arcsin`` then loses
    digits only near pi/2, where an absolute error near 1e-8 does not matter.
    """
    n, t, dim = bases.shape
    angles = torch.empty(pairs.shape[0], dtype=torch.float64, device=bases.device)
    for start, stop in _chunks(pairs.shape[0], 3 * t * dim, chunk_size, PAIR_BLOCK_ENTRIES):
        first = bases[pairs[start:stop, 0]]
        second = bases[pairs[start:stop, 1]]
        # Row l of the cosine matrix contains the products of the second basis's l-th vector with the first basis.
        cosines = second @ first.transpose(1, 2)
        residual = second.baddbmm_(cosines, first, alpha=-1)
        squared_sines = _split_over_threads(torch.linalg.eigvalsh, residual @ residual.transpose(1, 2)).clamp_(0, 1)
        angles[start:stop] = torch.arcsin(squared_sines.sqrt_()).mean(dim=1)
    return angles


def _reference_local_curvature(nb: Neighbourhoods, chunk_size: int | None) -> Tensor:
    """Mean over neighbours of the published code's angle, ``(n,)``; see :func:`curvature`.

    ``|S_i|_2`` is the Frobenius norm of ``M_i``. When ``k <= D`` only these norms are needed, and
    :func:`~pmg_torch.neighbours.neighbourhood_spreads` gives them without forming any ``(k, D)`` neighbourhood.
    For ``k > D`` the thin ``U_i`` (``k x D``) spans the column space of ``M_i``, so an orthonormal basis from QR
    gives the same singular values of ``U_i^T U_j`` without an SVD. If a neighbourhood has rank below ``D``, the
    SVD's extra columns of ``U_i`` are an arbitrary completion, so the published formula itself is not well defined
    there, and neither is this one.
    """
    points = nb.points.to(torch.float64)
    indices = nb.indices
    n, dim = points.shape
    k = indices.shape[1]
    column_bases = None
    scale = torch.ones((), dtype=torch.float64, device=points.device)
    if k <= dim:
        # The norms are taken in the search's units, so neither they nor their products overflow or underflow. The
        # scale goes back in with the ratio, which the clip then keeps in [0, 1].
        norms = neighbourhood_spreads(nb, scaled=True).sqrt_()
        scale = search_scale(nb)
    else:
        norms = torch.empty(n, dtype=torch.float64, device=points.device)
        column_bases = torch.empty((n, k, dim), dtype=torch.float64, device=points.device)
        for start, stop in _chunks(n, k * dim, chunk_size):
            centred = _centred_neighbourhoods(points, indices[start:stop])
            norms[start:stop] = torch.linalg.matrix_norm(centred)
            column_bases[start:stop] = torch.linalg.qr(centred).Q

    local = torch.empty(n, dtype=torch.float64, device=points.device)
    for start, stop in _chunks(n, k * k * dim if column_bases is not None else k, chunk_size):
        neighbour_indices = indices[start:stop]
        if column_bases is None:
            # U_i and U_j are square orthogonal, so U_i^T U_j is orthogonal and its k singular values are all 1.
            overlap = torch.full(neighbour_indices.shape, float(k), dtype=torch.float64, device=points.device)
        else:
            cross = torch.einsum("cad,ckae->ckde", column_bases[start:stop], column_bases[neighbour_indices])
            overlap = torch.linalg.svdvals(cross).sum(dim=-1)
        ratio = overlap / (norms[start:stop, None] * norms[neighbour_indices]) / scale.square()
        undefined = ratio.isnan()
        if bool(undefined.any()):
            # The product of the norms underflowed while the scale's square overflowed (rows from 1e-100 to 1e200),
            # giving inf / inf. The logarithms give the ratio instead, and the clip takes it to 0 or 1.
            logs = overlap.log() - norms[start:stop, None].log() - norms[neighbour_indices].log() - 2 * scale.log()
            ratio = torch.where(undefined, logs.exp(), ratio)
        local[start:stop] = torch.arccos(ratio.clamp(-1, 1)).mean(dim=1)
    return local


def _split_over_threads(solve: Callable[[Tensor], _Solution], matrices: Tensor) -> _Solution:
    """Apply a batched ``torch.linalg`` decomposition to ``matrices`` ``(b, q, q)``, split over torch's CPU threads.

    For a batch of small matrices on the CPU, torch 2.13 calls LAPACK for one matrix after another on one thread:
    with two torch threads and torch's MKL LAPACK, a batched ``eigvalsh`` used as much CPU time as wall time. The
    solver releases the GIL, so parts of the batch given to ``torch.get_num_threads()`` Python threads run at once,
    and each matrix's result does not depend on the split. Other devices, and batches too small to pay for the
    threads, are passed through.
    """
    n_threads = min(torch.get_num_threads(), matrices.shape[0] // _MATRICES_PER_THREAD)
    if matrices.device.type != "cpu" or n_threads < 2:
        return solve(matrices)
    parts = matrices.tensor_split(n_threads)
    with ThreadPoolExecutor(max_workers=n_threads - 1) as pool:
        others = [pool.submit(solve, part) for part in parts[1:]]
        solutions: list[Any] = [solve(parts[0])] + [other.result() for other in others]
    if isinstance(solutions[0], Tensor):
        return cast(_Solution, torch.cat(solutions))
    # torch.linalg returns several results as a named tuple type, built from one sequence.
    joined = tuple(torch.cat(pieces) for pieces in zip(*solutions, strict=True))
    return cast(_Solution, type(solutions[0])(joined))


def _chunks(
    n: int, entries_per_item: int, chunk_size: int | None, block_entries: int = MAX_BLOCK_ENTRIES
) -> list[tuple[int, int]]:
    """Split ``range(n)`` into blocks of ``chunk_size`` items, by default as many as keep ``block_entries`` a block."""
    if chunk_size is None:
        chunk_size = max(1, block_entries // max(entries_per_item, 1))
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _check_k(k: int) -> int:
    k = check_positive_int(k, "k")
    if k < 2:
        raise ValueError(f"Expected `k` to be at least 2 for curvature (one centred neighbour is all zeros), got {k}.")
    return k


def _check_tangent_dim(tangent_dim: int | None, method: str, k: int, dim: int) -> int | None:
    if tangent_dim is None:
        return None
    if method != "tangent":
        raise ValueError(f"Expected `tangent_dim` to be None for method={method!r}, got {tangent_dim!r}.")
    tangent_dim = check_positive_int(tangent_dim, "tangent_dim")
    upper = min(k, dim)
    if tangent_dim > upper:
        raise ValueError(
            f"Expected `tangent_dim` in [1, min(k, D)] = [1, {upper}] for k = {k} and D = {dim}, got {tangent_dim}."
        )
    return tangent_dim


def _nan_result(x: Tensor) -> CurvatureResult:
    """NaN overall and one NaN per distinct finite row, so ``local`` keeps its documented length."""
    dtype = working_dtype(x)
    finite, _ = drop_nonfinite_rows(x.to(dtype))
    n_distinct = remove_duplicate_rows(finite)[0].shape[0]
    nan = torch.tensor(float("nan"), dtype=dtype, device=x.device)
    return CurvatureResult(nan, torch.full((n_distinct,), float("nan"), dtype=dtype, device=x.device))
