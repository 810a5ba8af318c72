"""Exact k-nearest-neighbour search in torch, with bounded memory and the cleaning kNN estimators need.

Every kNN-based metric in the package (curvature, TLE, MLE, TwoNN) starts from :func:`neighbourhoods`, so that
:func:`pmg_torch.analyze` can search once per class and share the result. Curvature and TLE both work from the Gram
matrices of each point's neighbour offsets (:func:`neighbour_offset_grams`), the only step of theirs whose cost grows
with ``D``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._validation import DegenerateInputError, check_cloud, check_positive_int, drop_nonfinite_rows, working_dtype

#: Largest number of entries of one block of the distance matrix, 2**24 (64 MiB in float32). With m points the
#: search keeps ``chunk_size * m`` distances at a time, so its memory no longer grows with ``m**2``.
MAX_BLOCK_ENTRIES = 2**24

#: Entries of one block of neighbour offsets, 2**17 (1 MiB in float64), in :func:`neighbour_offset_grams` and in
#: the distances :func:`knn` recomputes. Blocks that stay in cache made the two steps about 2 and 6 times as fast as
#: one block of every point (1000 x 512 float32 cloud, k = 20, one thread of a 2-core x86 VM).
OFFSET_BLOCK_ENTRIES = 2**17


class Neighbourhoods(NamedTuple):
    """The k nearest other points of each point of a cleaned cloud.

    Attributes:
        points: ``(n, D)`` the distinct finite rows of the input, in order of first appearance, in the working dtype.
        distances: ``(n, k)`` Euclidean distances to the neighbours, ascending.
        indices: ``(n, k)`` row indices into ``points`` of the neighbours; a point is never its own neighbour.
        n_duplicates: rows removed because they repeated an earlier row exactly.
        n_nonfinite: rows removed because they held NaN or infinity.
    """

    points: Tensor
    distances: Tensor
    indices: Tensor
    n_duplicates: int
    n_nonfinite: int

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
    scale = _power_of_two_scale(x, finite)
    x = x / scale
    # The expansion loses digits in proportion to |a|^2 / |a - b|^2, so candidates are ranked on the cloud centred
    # on the mean of its finite rows. The returned distances come from the rows themselves, not from the expansion.
    centred = x - x[finite].mean(dim=0) if bool(finite.any()) else x
    squared_norms = (centred * centred).sum(dim=1)
    all_indices = torch.empty((m, k), dtype=torch.long, device=x.device)
    all_distances = torch.empty((m, k), dtype=x.dtype, device=x.device)
    for start in range(0, m, chunk_size):
        stop = min(start + chunk_size, m)
        block = squared_norms[start:stop, None] + squared_norms[None, :] - 2.0 * (centred[start:stop] @ centred.T)
        rows = torch.arange(stop - start, device=x.device)
        block[rows, rows + start] = float("inf")
        chosen = torch.topk(block, k, dim=1, largest=False, sorted=False).indices
        distances = _direct_distances(x[start:stop], x, chosen) * scale
        distances, order = torch.sort(distances, dim=1)
        all_distances[start:stop] = distances
        all_indices[start:stop] = torch.gather(chosen, 1, order)
    return all_distances, all_indices


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


def _power_of_two_scale(x: Tensor, finite: Tensor) -> Tensor:
    """Return the largest power of two not above the largest finite ``|x|`` (0.5 when that is 0), as a 0-d tensor.

    Dividing by it leaves every finite entry below 2 in magnitude, and the scale itself stays representable even
    when the largest entry is close to the dtype's maximum.
    """
    magnitude = torch.where(finite[:, None], x.abs(), 0).amax()
    _, exponent = torch.frexp(magnitude)
    return torch.ldexp(torch.ones_like(magnitude), exponent - 1)


def neighbourhoods(x: Tensor, k: int, *, chunk_size: int | None = None) -> Neighbourhoods:
    """Clean ``x`` (drop non-finite rows, then exact duplicates) and find each remaining point's ``k`` neighbours.

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
    distances, indices = knn(points, k, chunk_size=chunk_size)
    return Neighbourhoods(points, distances, indices, n_duplicates, n_nonfinite)


def neighbour_offset_grams(
    nb: Neighbourhoods, *, chunk_size: int | None = None, rows: tuple[int, int] | None = None
) -> Tensor:
    """Return the Gram matrix of each point's neighbour offsets, ``(n, k, k)`` in float64.

    For point ``q`` with neighbours ``x_1..x_k``, entry ``(a, b)`` is ``(x_a - q) . (x_b - q)``. The diagonal
    contains the squared neighbour distances, ``|x_a - x_b|^2`` is ``O_aa + O_bb - 2 O_ab``, and double centring
    gives the Gram matrix of the neighbours centred on their own mean. The offsets are taken from the rows before
    any product, so rounding is relative to the neighbourhood's radius, not to the distance from the origin.

    Args:
        nb: the output of :func:`neighbourhoods`.
        chunk_size: points per block; by default as many as keep the ``(chunk, k, D)`` offsets under
            :data:`OFFSET_BLOCK_ENTRIES`.
        rows: ``(start, stop)`` to compute the matrices of points ``start:stop`` only, so that a caller working
            in blocks needs no ``(n, k, k)`` tensor; all points by default.

    Returns:
        ``(stop - start, k, k)`` float64 tensor on the device of ``nb.points``.
    """
    points = nb.points
    dim = points.shape[1]
    k = nb.k
    first, last = (0, points.shape[0]) if rows is None else rows
    if chunk_size is None:
        chunk_size = max(1, OFFSET_BLOCK_ENTRIES // (k * dim))
    grams = torch.empty((last - first, k, k), dtype=torch.float64, device=points.device)
    for start in range(first, last, chunk_size):
        stop = min(start + chunk_size, last)
        offsets = points[nb.indices[start:stop]].to(torch.float64)
        offsets -= points[start:stop, None, :].to(torch.float64)
        torch.bmm(offsets, offsets.transpose(1, 2), out=grams[start - first : stop - first])
    return grams


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
