"""Exact k-nearest-neighbour search in torch, with bounded memory and the cleaning kNN estimators need.

Every kNN-based metric in the package (curvature, TLE, MLE, TwoNN) starts from :func:`neighbourhoods`, so that
:func:`pmg_torch.analyze` can search once per class and share the result. Curvature and TLE both work from the Gram
matrices of each point's neighbour offsets (:func:`neighbour_offset_grams`). For clouds of up to
:data:`GRAM_MAX_POINTS` distinct rows, one float64 Gram matrix of the whole cloud serves the search, the distances
and the offset Gram matrices, so that product is the only work whose cost grows with ``D``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._validation import (
    DegenerateInputError,
    check_cloud,
    check_positive_int,
    drop_nonfinite_rows,
    power_of_two_scale,
    working_dtype,
)

#: Largest number of entries of one block of the distance matrix, 2**24 (64 MiB in float32). With m points the
#: search keeps ``chunk_size * m`` distances at a time, so its memory no longer grows with ``m**2``.
MAX_BLOCK_ENTRIES = 2**24

#: Entries of one block of neighbour offsets, 2**17 (1 MiB in float64), in :func:`neighbour_offset_grams` and in
#: the distances :func:`knn` recomputes. Blocks that stay in cache made the two steps about 2 and 6 times as fast as
#: one block of every point (1000 x 512 float32 cloud, k = 20, one thread of a 2-core x86 VM).
OFFSET_BLOCK_ENTRIES = 2**17

#: Most distinct rows for which :func:`neighbourhoods` forms the float64 Gram matrix of the whole cloud. At this size
#: the matrix has :data:`MAX_BLOCK_ENTRIES` entries (128 MiB). Larger clouds get the chunked search of :func:`knn`.
GRAM_MAX_POINTS = 4096

#: Largest relative error allowed, by a rounding bound, in a squared distance taken from the cloud's Gram matrix:
#: between a point and a neighbour, or, for offset Gram matrices, between any two of a point and its neighbours. A
#: point whose bound is above it gets its values recomputed from row differences. On embeddings the bound is near
#: 1e-12 and the measured error near 1e-15. The bound exceeds the tolerance when a neighbourhood is hundreds of
#: times narrower than its distance from the cloud's mean, or contains near-duplicate rows.
GRAM_TOLERANCE = 1e-10

#: Powers of two between which :func:`neighbourhoods` leaves the rows unscaled on the Gram route: squared lengths
#: of up to 4096 rows of 2**400 columns stay far inside float64's range.
SAFE_MAGNITUDES = (2.0**-200, 2.0**200)

#: Query rows per block of the candidate ranking on the Gram route: a block of 256 rows of a 1000-point cloud
#: stays in cache, and larger blocks ran no faster.
RANKING_BLOCK_ROWS = 256

#: Largest block of candidate keys, 2**20 entries, whose neighbours are selected with numpy on the CPU: its index
#: array then takes 8 MiB. Every block of the Gram route fits (256 rows of at most 4096 points).
NUMPY_SELECTION_ENTRIES = 2**20

_EPSILON = torch.finfo(torch.float64).eps

#: Integer dtype of each floating-point width in bytes, to read a row's bits as integers.
_SAME_WIDTH_INTEGER = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class Neighbourhoods(NamedTuple):
    """The k nearest other points of each point of a cleaned cloud.

    Attributes:
        points: ``(n, D)`` the distinct finite rows of the input, in order of first appearance, in the working dtype.
        distances: ``(n, k)`` Euclidean distances to the neighbours, ascending.
        indices: ``(n, k)`` row indices into ``points`` of the neighbours; a point is never its own neighbour.
        n_duplicates: rows removed because they repeated an earlier row exactly.
        n_nonfinite: rows removed because they held NaN or infinity.
        gram: ``(n, n)`` float64 Gram matrix of ``(points - mean) / gram_scale`` when the search formed it (clouds
            of at most :data:`GRAM_MAX_POINTS` rows), else ``None``.
        gram_scale: 0-d float64 power of two by which ``gram``'s rows were divided. The Gram matrix of the centred
            rows is ``gram * gram_scale**2``. ``None`` without ``gram``.
    """

    points: Tensor
    distances: Tensor
    indices: Tensor
    n_duplicates: int
    n_nonfinite: int
    gram: Tensor | None = None
    gram_scale: Tensor | None = None

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def remove_duplicate_rows(x: Tensor) -> tuple[Tensor, int]:
    """Return the distinct rows of ``x`` in order of first appearance, and how many rows were removed.

    Exact duplicates give zero neighbour distances, which make ``log`` terms of TLE and MLE infinite and tangent
    spaces undefined, so kNN estimators work on distinct rows only.

    Args:
        x: ``(m, D)`` rows of a real dtype, ``D >= 1``. ``m = 0`` is allowed and gives ``(x, 0)``.

    Raises:
        TypeError: if ``x`` is not a tensor, or its dtype is complex.
        ValueError: if ``x`` is not two-dimensional or has no columns.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `x` to be a torch.Tensor of shape (m, D), got {type(x).__name__}.")
    if x.is_complex():
        raise TypeError(f"Expected `x` to have a real dtype, got {x.dtype}.")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"Expected `x` of shape (m, D) with D >= 1, got a tensor of shape {tuple(x.shape)}.")
    if x.shape[0] < 2:
        return x, 0
    # Rows that compare equal have the same bits once -0.0 becomes +0.0 (adding 0.0 does that), so they have the
    # same integer sum of their bits, whatever order the sum takes. Distinct sums therefore prove that no two rows
    # are equal, at a tenth of the cost of sorting whole rows. Any tie goes to the exact comparison.
    shifted = x + 0.0
    bits = shifted.view(_SAME_WIDTH_INTEGER[shifted.element_size()])
    ordered = torch.sort(bits.sum(dim=1, dtype=torch.int64)).values
    if not bool((ordered[1:] == ordered[:-1]).any()):
        return x, 0
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    n_unique = int(inverse.max()) + 1
    if n_unique == x.shape[0]:
        return x, 0
    positions = torch.arange(x.shape[0], device=x.device)
    first = torch.full((n_unique,), x.shape[0], dtype=positions.dtype, device=x.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    first, _ = torch.sort(first)
    return x[first], x.shape[0] - n_unique


def default_chunk_size(m: int) -> int:
    """Return how many query rows fit in one distance block of at most :data:`MAX_BLOCK_ENTRIES` entries."""
    return max(1, min(m, MAX_BLOCK_ENTRIES // max(m, 1)))


def knn(x: Tensor, k: int, *, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Find the ``k`` nearest other rows of every row of ``x`` by Euclidean distance.

    Candidates are ranked with the expansion ``|a|^2 + |b|^2 - 2 a.b`` one block of ``chunk_size`` query rows at a
    time, and the distances of the chosen neighbours are then recomputed directly from ``a - b``, so that rounding
    in the expansion affects at most the order of near-ties, never the returned values. A point is excluded from
    its own neighbours by index, so distinct rows at distance zero still count as neighbours of each other.

    Both steps work on the cloud divided by a power of two near its largest finite entry, and the distances are
    multiplied back. Squared float32 distances overflow above about 1e19 and underflow below about 1e-19, which
    would make every candidate tie. Dividing and multiplying by a power of two is exact, so for data in ordinary
    ranges the distances are the same bits as ``|a - b|``.

    Args:
        x: ``(m, D)`` points, floating point.
        k: neighbours per point, ``1 <= k <= m - 1``.
        chunk_size: query rows per block; by default as many as keep a block under 2**24 entries.

    Returns:
        ``(distances, indices)``, both ``(m, k)``, ascending by distance. Distances are in the working dtype
        (float64 for float64 input, float32 otherwise).

    Raises:
        ValueError: if ``k`` is not below the number of rows.
    """
    x = check_cloud(x)
    k = check_positive_int(k, "k")
    m = x.shape[0]
    if k > m - 1:
        raise ValueError(f"Expected `k` to be at most m - 1 = {m - 1} for {m} points, got k = {k}.")
    if chunk_size is None:
        chunk_size = default_chunk_size(m)
    chunk_size = check_positive_int(chunk_size, "chunk_size")

    x = x.to(working_dtype(x))
    finite = torch.isfinite(x).all(dim=1)
    scale = power_of_two_scale(torch.where(finite[:, None], x, 0))
    x = x / scale
    # The expansion loses digits in proportion to |a|^2 / |a - b|^2, so candidates are ranked on the cloud centred
    # on the mean of its finite rows. The returned distances come from the rows themselves, not from the expansion.
    centred = x - x[finite].mean(dim=0) if bool(finite.any()) else x
    squared_norms = (centred * centred).sum(dim=1)
    norms = squared_norms.sqrt()
    largest_norm = norms[finite].amax() if bool(finite.any()) else norms.new_zeros(())
    unit = 2 * x.shape[1] * torch.finfo(x.dtype).eps
    all_indices = torch.empty((m, k), dtype=torch.long, device=x.device)
    all_distances = torch.empty((m, k), dtype=x.dtype, device=x.device)
    for start in range(0, m, chunk_size):
        stop = min(start + chunk_size, m)
        # |b|^2 - 2 a.b ranks the candidates b of query a as |a - b|^2 does; one addmm forms it in one pass.
        block = torch.addmm(squared_norms[None, :], centred[start:stop], centred.T, alpha=-2.0)
        chosen, next_key = _nearest_columns(block, k, start)
        ranking = _Ranking(norms[start:stop], norms, largest_norm, unit)
        chosen = _settle_near_ties(block, chosen, next_key, ranking, x[start:stop], x)
        distances = _direct_distances(x[start:stop], x, chosen) * scale
        distances, order = torch.sort(distances, dim=1)
        all_distances[start:stop] = distances
        all_indices[start:stop] = torch.gather(chosen, 1, order)
    return all_distances, all_indices


def _nearest_columns(keys: Tensor, k: int, start: int) -> tuple[Tensor, Tensor]:
    """Return the columns of the ``k`` smallest ``keys`` of each row, unsorted, and the ``(k + 1)``-th smallest key.

    ``keys`` ``(c, m)`` belongs to query rows ``start:start + c``, and row ``i``'s own column is left out: it is
    overwritten with infinity. ``k`` is at most ``m - 1``, so the ``(k + 1)``-th key exists; it is infinite when
    ``k = m - 1``.
    """
    rows = torch.arange(keys.shape[0], device=keys.device)
    keys[rows, rows + start] = float("inf")
    if keys.device.type == "cpu" and keys.numel() <= NUMPY_SELECTION_ENTRIES:
        # numpy's introselect took about two thirds of the time of torch.topk on blocks of 256 rows of a 500 or
        # 1000-point cloud (one thread of a 2-core x86 VM). It returns an int64 index for every entry, so larger
        # blocks, whose memory is counted, go to topk.
        smallest = torch.from_numpy(np.argpartition(keys.numpy(), k, axis=1)[:, : k + 1])
        return smallest[:, :k], keys.gather(1, smallest[:, k:]).squeeze(1)
    values, smallest = torch.topk(keys, k + 1, dim=1, largest=False, sorted=True)
    return smallest[:, :k], values[:, k]


class _Ranking(NamedTuple):
    """Rounding bound of the keys ``|b|^2 - 2 a.b`` of a block of queries ``a``.

    Each key is off by at most about ``unit (|b|^2 + 2 |a| |b|)``. ``unit`` is ``2 D eps`` of the dtype the keys were
    computed in, and the norms are those of the centred rows.
    """

    query_norms: Tensor
    norms: Tensor
    largest_norm: Tensor
    unit: float


def _settle_near_ties(
    keys: Tensor, chosen: Tensor, next_key: Tensor, ranking: _Ranking, queries: Tensor, x: Tensor
) -> Tensor:
    """Return ``chosen`` ``(c, k)`` corrected where rounding in ``keys`` may have picked the wrong neighbours.

    A row is certain when the gap between its ``k``-th and ``(k + 1)``-th keys exceeds twice the largest rounding of
    any key in it. On ordinary clouds every row passes this test, at the cost of one comparison per row. For the
    others, a column is a candidate unless its key minus its rounding bound exceeds the largest key plus bound among
    the chosen. Rows with more than ``k`` candidates, such as tight clusters far from the cloud's mean or rows that
    tie, are settled by exact distances. These come from the differences of ``queries`` and the candidate rows of
    ``x``, in blocks of bounded memory. The per-entry bounds of the unsure rows take two more arrays the size of
    their keys, so a block in which every row is unsure briefly takes three times the memory of its keys.
    """
    k = chosen.shape[1]
    unit = ranking.unit
    kth_key = keys.gather(1, chosen).amax(dim=1)
    worst = unit * ranking.largest_norm * (ranking.largest_norm + 2 * ranking.query_norms)
    unsure = (next_key - kth_key <= 2 * worst).nonzero().squeeze(1)
    if unsure.numel() == 0:
        return chosen
    error = ranking.norms[None, :] * (ranking.norms[None, :] + 2 * ranking.query_norms[unsure, None]) * unit
    lower = keys[unsure] - error
    upper = (keys[unsure].gather(1, chosen[unsure]) + error.gather(1, chosen[unsure])).amax(dim=1)
    counts = (lower <= upper[:, None]).sum(dim=1)
    ambiguous = (counts > k).nonzero().squeeze(1)
    dim = x.shape[1]
    position = 0
    while position < ambiguous.numel():
        width = int(counts[ambiguous[position:]].max())
        rows_per_block = max(1, OFFSET_BLOCK_ENTRIES // (width * dim))
        block = ambiguous[position : position + rows_per_block]
        candidates = torch.topk(lower[block], width, dim=1, largest=False).indices
        rows = unsure[block]
        squared = (queries[rows, None, :] - x[candidates]).square().sum(dim=2)
        chosen[rows] = candidates.gather(1, torch.topk(squared, k, dim=1, largest=False).indices)
        position += rows_per_block
    return chosen


def _gram_search(x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Search with one float64 Gram matrix of the cloud; return ``(distances, indices, gram, scale)``.

    ``gram`` is ``(n, n)``, the Gram matrix of the rows divided by ``scale`` and centred on their mean. ``scale`` is
    1 when the largest ``|x|`` lies within :data:`SAFE_MAGNITUDES`, else the power of two of
    :func:`~pmg_torch._validation.power_of_two_scale`. Candidates are ranked by
    ``G_bb - 2 G_ab`` as in :func:`knn`, and the chosen squared distances are ``G_aa + G_bb - 2 G_ab``. Each entry
    of ``G`` is a sum of ``D`` products, rounded by at most about ``D eps |a| |b|``, so a squared distance is off by
    at most ``2 D eps (G_aa + G_bb)``. Points for which that exceeds :data:`GRAM_TOLERANCE` of a squared distance get
    their distances recomputed from the row differences, as :func:`knn` computes all of them.
    """
    n, dim = x.shape
    scaled = x.to(torch.float64)
    scale = power_of_two_scale(scaled)
    if SAFE_MAGNITUDES[0] <= scale <= SAFE_MAGNITUDES[1]:
        # Squares of these rows stay far inside float64's range, so the division is skipped.
        scale = torch.ones_like(scale)
    else:
        scaled = scaled / scale
    centred = scaled - scaled.mean(dim=0)
    gram = _symmetric_gram(centred)
    squared_norms = gram.diagonal()
    norms = squared_norms.sqrt()
    unit = 2 * dim * _EPSILON
    indices = torch.empty((n, k), dtype=torch.long, device=x.device)
    for start in range(0, n, RANKING_BLOCK_ROWS):
        stop = min(start + RANKING_BLOCK_ROWS, n)
        keys = torch.add(squared_norms, gram[start:stop], alpha=-2.0)
        chosen, next_key = _nearest_columns(keys, k, start)
        ranking = _Ranking(norms[start:stop], norms, norms.amax(), unit)
        indices[start:stop] = _settle_near_ties(keys, chosen, next_key, ranking, scaled[start:stop], scaled)
    norm_sums = squared_norms[indices].add_(squared_norms[:, None])
    squared = torch.add(norm_sums, gram.gather(1, indices), alpha=-2.0).clamp_min_(0)
    redo = (norm_sums.mul_(2 * dim * _EPSILON) > GRAM_TOLERANCE * squared).any(dim=1).nonzero().squeeze(1)
    distances = squared.sqrt_()
    if redo.numel() > 0:
        distances[redo] = _direct_distances(scaled[redo], scaled, indices[redo])
    distances, order = torch.sort(distances.mul_(scale), dim=1)
    return distances.to(working_dtype(x)), torch.gather(indices, 1, order), gram, scale


def _symmetric_gram(rows: Tensor) -> Tensor:
    """Return ``rows @ rows.T`` from three products of half the rows, mirroring the fourth.

    The block below the diagonal is the transpose of the one above it, so a quarter of the multiplications is
    saved (2.2 ms of 13.7 for 1000 x 512 float64 on one thread), and the matrix is exactly symmetric.
    """
    n = rows.shape[0]
    half = n // 2
    if half == 0:
        return rows @ rows.T
    gram = torch.empty((n, n), dtype=rows.dtype, device=rows.device)
    top, bottom = rows[:half], rows[half:]
    torch.mm(top, top.T, out=gram[:half, :half])
    torch.mm(bottom, bottom.T, out=gram[half:, half:])
    torch.mm(top, bottom.T, out=gram[:half, half:])
    gram[half:, :half] = gram[:half, half:].T
    return gram


def _direct_distances(queries: Tensor, x: Tensor, chosen: Tensor) -> Tensor:
    """Return ``|queries[i] - x[chosen[i, j]]|`` ``(c, k)``, computed from the differences in cache-sized blocks.

    The ``(rows, k, D)`` differences of a block of :data:`OFFSET_BLOCK_ENTRIES` entries fit in a CPU cache, and
    the values are the same bits as in one block.
    """
    c, k = chosen.shape
    rows_per_block = max(1, OFFSET_BLOCK_ENTRIES // (k * x.shape[1]))
    distances = torch.empty((c, k), dtype=x.dtype, device=x.device)
    for start in range(0, c, rows_per_block):
        stop = min(start + rows_per_block, c)
        differences = queries[start:stop, None, :] - x[chosen[start:stop]]
        distances[start:stop] = torch.linalg.vector_norm(differences, dim=2)
    return distances


def neighbourhoods(x: Tensor, k: int, *, chunk_size: int | None = None) -> Neighbourhoods:
    """Clean ``x`` (drop non-finite rows, then exact duplicates) and find each remaining point's ``k`` neighbours.

    Up to :data:`GRAM_MAX_POINTS` distinct rows, the search forms the float64 Gram matrix of the cloud once and keeps
    it in :attr:`Neighbourhoods.gram` for :func:`neighbour_offset_grams` and the metrics. Its squared distances are
    within :data:`GRAM_TOLERANCE` of the direct ones, relatively. Larger clouds use :func:`knn`, whose memory stays
    under one block of the distance matrix.

    Args:
        x: ``(m, D)`` points, floating point.
        k: neighbours per point.
        chunk_size: query rows per block of :func:`knn`, for clouds above :data:`GRAM_MAX_POINTS` rows.

    Raises:
        TypeError, ValueError: for a malformed ``x`` or ``k``.
        DegenerateInputError: if fewer than ``k + 1`` distinct finite rows remain. Public metrics turn this into
            NaN with a warning.
    """
    x = check_cloud(x)
    k = check_positive_int(k, "k")
    points = x.to(working_dtype(x))
    points, n_nonfinite = drop_nonfinite_rows(points)
    points, n_duplicates = remove_duplicate_rows(points)
    n = points.shape[0]
    if n < k + 1:
        details = []
        if n_duplicates:
            details.append(f"{n_duplicates} duplicate rows removed")
        if n_nonfinite:
            details.append(f"{n_nonfinite} non-finite rows removed")
        suffix = f" ({', '.join(details)})" if details else ""
        raise DegenerateInputError(f"{n} distinct finite rows{suffix}; at least k + 1 = {k + 1} are needed")
    if n <= GRAM_MAX_POINTS:
        distances, indices, gram, scale = _gram_search(points, k)
        return Neighbourhoods(points, distances, indices, n_duplicates, n_nonfinite, gram, scale)
    distances, indices = knn(points, k, chunk_size=chunk_size)
    return Neighbourhoods(points, distances, indices, n_duplicates, n_nonfinite)


def search_scale(nb: Neighbourhoods) -> Tensor:
    """Return the power of two by which lengths are divided before they are squared, 0-d float64.

    It is the search's own when it kept one: 1 at ordinary magnitudes (:data:`SAFE_MAGNITUDES`), else a power of two
    near the largest ``|x|``. Without one, it is the latter. Rows divided by it have squared lengths that neither
    overflow nor underflow float64 for any finite input, and the division changes no bits at ordinary magnitudes.
    """
    if nb.gram_scale is not None:
        return nb.gram_scale
    return power_of_two_scale(nb.points).to(torch.float64)


def neighbour_offset_grams(
    nb: Neighbourhoods,
    *,
    chunk_size: int | None = None,
    rows: tuple[int, int] | None = None,
    scaled: bool = False,
) -> Tensor:
    """Return the Gram matrix of each point's neighbour offsets, ``(n, k, k)`` in float64.

    For point ``q`` with neighbours ``x_1..x_k``, entry ``(a, b)`` is ``(x_a - q) . (x_b - q)``. The diagonal
    contains the squared neighbour distances, ``|x_a - x_b|^2`` is ``O_aa + O_bb - 2 O_ab``, and double centring
    gives the Gram matrix of the neighbours centred on their own mean.

    When ``nb`` holds the cloud's Gram matrix ``G``, ``O_ab = G_ab - G_qa - G_qb + G_qq`` costs a few gathers per
    point. Its rounding grows with the rows' distance from the cloud's mean, so a point whose rounding bound exceeds
    :data:`GRAM_TOLERANCE` of the shortest squared distance among it and its neighbours is computed from its offsets
    instead. Otherwise every matrix comes from the offsets, taken from the rows before any product, so rounding is
    relative to the neighbourhood's radius, not to the distance from the origin.

    Args:
        nb: the output of :func:`neighbourhoods`.
        chunk_size: points per block; by default as many as keep the ``(chunk, k, D)`` offsets under
            :data:`OFFSET_BLOCK_ENTRIES`.
        rows: ``(start, stop)`` to compute the matrices of points ``start:stop`` only, so that a caller working
            in blocks needs no ``(n, k, k)`` tensor; all points by default.
        scaled: return the matrices of the rows divided by :func:`search_scale`, which neither overflow nor
            underflow whatever the magnitude of the data. Metrics that do not change with scale use these.

    Returns:
        ``(stop - start, k, k)`` float64 tensor on the device of ``nb.points``.
    """
    points = nb.points
    dim = points.shape[1]
    k = nb.k
    first, last = (0, points.shape[0]) if rows is None else rows
    if chunk_size is None:
        chunk_size = max(1, OFFSET_BLOCK_ENTRIES // (k * dim))
    scale = search_scale(nb)
    if nb.gram is not None:
        grams, redo = _offset_grams_from_gram(nb.gram, nb.indices[first:last], first, dim)
        for start in range(0, redo.numel(), chunk_size):
            block = redo[start : start + chunk_size]
            grams[block] = _direct_offset_grams(points, nb.indices, block + first, scale)
    else:
        grams = torch.empty((last - first, k, k), dtype=torch.float64, device=points.device)
        for start in range(first, last, chunk_size):
            stop = min(start + chunk_size, last)
            positions = torch.arange(start, stop, device=points.device)
            grams[start - first : stop - first] = _direct_offset_grams(points, nb.indices, positions, scale)
    return grams if scaled else grams.mul_(scale.square())


def neighbourhood_spreads(nb: Neighbourhoods, *, scaled: bool = False) -> Tensor:
    """Return ``|M_i|_F^2``, the sum of squared distances of each point's neighbours from their own mean, ``(n,)``.

    It equals ``sum_a |x_a|^2 - |sum_a x_a|^2 / k`` over the ``k`` neighbours, which the cloud's Gram matrix gives
    from ``k^2 + k`` of its entries, with no ``(k, D)`` neighbourhood formed. The subtraction loses digits when the
    neighbours lie far from the cloud's mean compared with their spread, so points whose rounding bound exceeds
    :data:`GRAM_TOLERANCE` of the result, and clouds without a Gram matrix, take it from the offset Gram matrices.

    NOTE: the offset Gram matrices are rounded relative to the squared distance from the point to its farthest
    neighbour. Neighbours packed far tighter than that distance therefore get a spread accurate only to about
    ``1e-16`` of it, not of the spread itself.

    Args:
        nb: the output of :func:`neighbourhoods`.
        scaled: return it for the rows divided by :func:`search_scale`, as :func:`neighbour_offset_grams` does.

    Returns:
        ``(n,)`` float64 tensor on the device of ``nb.points``.
    """
    scale = search_scale(nb)
    n, k = nb.indices.shape
    if nb.gram is None:
        offset_grams = neighbour_offset_grams(nb, scaled=True)
        spreads = torch.diagonal(offset_grams, dim1=1, dim2=2).sum(dim=1) - offset_grams.sum(dim=(1, 2)) / k
    else:
        gram = nb.gram
        index_dtype = torch.int32 if n * n < 2**31 else torch.long
        columns = nb.indices.to(index_dtype)
        flat = (columns * n)[:, :, None] + columns[:, None, :]
        totals = gram.view(-1).index_select(0, flat.view(-1)).view(n, k * k).sum(dim=1)
        squared_norms = gram.diagonal()[nb.indices].sum(dim=1)
        spreads = squared_norms - totals / k
        redo = (2 * nb.points.shape[1] * _EPSILON * squared_norms > GRAM_TOLERANCE * spreads).nonzero().squeeze(1)
        if redo.numel() > 0:
            offset_grams = _direct_offset_grams(nb.points, nb.indices, redo, scale)
            spreads[redo] = torch.diagonal(offset_grams, dim1=1, dim2=2).sum(dim=1) - offset_grams.sum(dim=(1, 2)) / k
    spreads = spreads.clamp_min_(0)
    return spreads if scaled else spreads.mul_(scale.square())


def _direct_offset_grams(points: Tensor, indices: Tensor, positions: Tensor, scale: Tensor) -> Tensor:
    """``(c, k, k)`` offset Gram matrices of the points at ``positions`` divided by ``scale``, from the offsets."""
    offsets = points[indices[positions]].to(torch.float64)
    offsets -= points[positions, None, :].to(torch.float64)
    offsets /= scale
    return torch.bmm(offsets, offsets.transpose(1, 2))


def _offset_grams_from_gram(gram: Tensor, indices: Tensor, first: int, dim: int) -> tuple[Tensor, Tensor]:
    """Offset Gram matrices of points ``first:first + c`` from the cloud's Gram matrix, in its units, and the points
    to redo.

    ``O_ab = G_ab - G_qa - G_qb + G_qq``, gathered with ``k^2 + k + 1`` entries of ``G`` per point. Each of the four
    terms is rounded by at most about ``D eps max |x|^2`` over the point and its neighbours (centred rows), and a
    squared distance among them combines up to four entries of ``O``. A point is returned in ``redo`` (positions
    relative to ``first``), for the caller to recompute from offsets, when that bound exceeds
    :data:`GRAM_TOLERANCE` of the shortest squared distance among the point and its neighbours. Near-duplicate
    neighbours therefore send their point to the offsets, where TLE's differences of nearly equal radii keep their
    digits.
    """
    n = gram.shape[0]
    c, k = indices.shape
    # One index_select on the flattened matrix gathers the k x k blocks several times faster than advanced indexing.
    index_dtype = torch.int32 if n * n < 2**31 else torch.long
    flat = (indices.to(index_dtype) * n)[:, :, None] + indices.to(index_dtype)[:, None, :]
    grams = gram.view(-1).index_select(0, flat.view(-1)).view(c, k, k)
    towards = gram[first : first + c].gather(1, indices)
    squared_norms = gram.diagonal()
    own = squared_norms[first : first + c]
    grams.sub_(towards[:, :, None]).sub_(towards[:, None, :]).add_(own[:, None, None])

    largest = torch.maximum(squared_norms[indices].amax(dim=1), own)
    squared_distances = torch.diagonal(grams, dim1=1, dim2=2)
    between = torch.add(squared_distances[:, :, None], grams, alpha=-2.0).add_(squared_distances[:, None, :])
    between.diagonal(dim1=1, dim2=2).fill_(math.inf)
    shortest = torch.minimum(between.amin(dim=(1, 2)), squared_distances.amin(dim=1))
    redo = (16 * dim * _EPSILON * largest > GRAM_TOLERANCE * shortest).nonzero().squeeze(1)
    return grams, redo


def neighbour_pairs(indices: Tensor) -> tuple[Tensor, Tensor]:
    """List each neighbour relation once: the unordered pairs ``{i, j}`` with ``j`` among the neighbours of ``i``.

    A pair of mutual neighbours appears twice in ``indices`` but once here, so symmetric quantities such as the
    angle between two tangent spaces are computed once per pair.

    Args:
        indices: ``(n, k)`` neighbour indices, as in :attr:`Neighbourhoods.indices`.

    Returns:
        ``(pairs, slots)``: ``pairs`` is ``(p, 2)`` with ``pairs[:, 0] < pairs[:, 1]``, sorted; ``slots`` is
        ``(n, k)`` and ``pairs[slots[i, s]]`` is ``{i, indices[i, s]}``.
    """
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device)[:, None].expand(n, k)
    low = torch.minimum(rows, indices)
    high = torch.maximum(rows, indices)
    keys, slots = torch.unique((low * n + high).reshape(-1), return_inverse=True)
    pairs = torch.stack([keys // n, keys % n], dim=1)
    return pairs, slots.reshape(n, k)
