"""Reference implementations that pmg-torch is timed and checked against.

Each one is written the way the published code or the reference library computes the quantity: a per-point numpy
float64 loop for the reference curvature, scikit-dimension's estimators, ``ripser.ripser`` called directly, and the
closed form of the volume in numpy. None of them imports pmg-torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import ripser
import skdim
from sklearn.neighbors import NearestNeighbors


def neighbour_table(x: np.ndarray, k: int) -> np.ndarray:
    """Return ``(n, k)`` indices of each row's ``k`` nearest other rows, from one scikit-learn query over all rows."""
    _, indices = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return _without_self(indices, np.arange(x.shape[0]))


class PerPointQuery:
    """The ``k`` nearest other rows of one row per call, from a scikit-learn query for that row alone.

    The published curvature loop finds neighbours this way, once for each point and once more for each neighbour
    of each point.
    """

    def __init__(self, x: np.ndarray, k: int) -> None:
        self.x = x
        self.model = NearestNeighbors(n_neighbors=k + 1).fit(x)

    def __call__(self, i: int) -> np.ndarray:
        _, indices = self.model.kneighbors(self.x[i : i + 1])
        return _without_self(indices, np.array([i]))[0]


def _without_self(indices: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Drop each row from its own ``k + 1`` neighbours by index rather than by rank.

    A distinct row at distance zero may be returned before the row itself. Where the row is missing from its own
    list (such ties), the farthest of the ``k + 1`` is dropped instead.
    """
    is_other = indices != rows[:, None]
    lacks_self = is_other.all(axis=1)
    is_other[lacks_self, -1] = False
    return indices[is_other].reshape(len(rows), indices.shape[1] - 1)


def centred_svd(x: np.ndarray, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the thin SVD factors ``U`` (k x min(k, D)) and singular values of a point's centred neighbours."""
    rows = x[neighbours]
    u, singular_values, _ = np.linalg.svd(rows - rows.mean(axis=0), full_matrices=False)
    return u, singular_values


def reference_local_curvature(
    x: np.ndarray, neighbours_of: Callable[[int], np.ndarray], points: np.ndarray
) -> np.ndarray:
    """Return the published curvature formula's local value at each of ``points``, one point at a time.

    For point i with neighbours N(i), ``U_i`` and ``S_i`` come from the thin SVD of its centred neighbours, and
    its local value is the mean over j in N(i) of
    ``arccos(clip(sum(svdvals(U_i^T U_j)) / (|S_i|_2 |S_j|_2), -1, 1))``. As in the published loop, the
    neighbours and the SVD of each neighbour j are found again for every point that has j as a neighbour.

    Args:
        x: ``(n, D)`` points in float64.
        neighbours_of: returns the ``k`` neighbour indices of one point: a row of :func:`neighbour_table`, or a
            :class:`PerPointQuery`.
        points: indices of the points to evaluate.
    """
    local = np.empty(len(points))
    for position, i in enumerate(points):
        neighbours = neighbours_of(i)
        u_i, s_i = centred_svd(x, neighbours)
        angles = np.empty(len(neighbours))
        for slot, j in enumerate(neighbours):
            u_j, s_j = centred_svd(x, neighbours_of(j))
            overlap = np.linalg.svd(u_i.T @ u_j, compute_uv=False).sum()
            cosine = overlap / (np.linalg.norm(s_i) * np.linalg.norm(s_j))
            angles[slot] = np.arccos(np.clip(cosine, -1.0, 1.0))
        local[position] = angles.mean()
    return local


def reference_volume(z: np.ndarray, d: float = 1.0) -> float:
    """Return ``1/2 log2 det(I_D + (d/m) Z_c^T Z_c)`` in float64 through ``slogdet`` of the D x D matrix."""
    m, ambient_dim = z.shape
    centred = z - z.mean(axis=0)
    sign, log_det = np.linalg.slogdet(np.eye(ambient_dim) + (d / m) * (centred.T @ centred))
    if sign <= 0:
        raise ValueError(f"Expected a positive determinant, got sign {sign}.")
    return 0.5 * log_det / np.log(2.0)


def published_volume(z: np.ndarray, d: float = 1.0) -> float:
    """Return the volume as the published code computes it, through ``det``, which overflows to inf in float64
    once the eigenvalue product passes about 1.8e308."""
    m, ambient_dim = z.shape
    centred = z - z.mean(axis=0)
    with np.errstate(over="ignore"):
        return float(0.5 * np.log2(np.linalg.det(np.eye(ambient_dim) + (d / m) * (centred.T @ centred))))


class HoleSummary(NamedTuple):
    """Dimension-1 persistence bars longer than the threshold, summarised."""

    n_holes: int
    total_persistence: float
    mean_persistence: float
    density: float


def reference_holes(points: np.ndarray, threshold: float) -> HoleSummary:
    """Summarise the H1 bars of ``ripser.ripser(points, maxdim=1)`` whose persistence exceeds ``threshold``.

    The density is the total persistence over ``(max death - min birth)`` of those bars. No such bar gives zeros.
    """
    bars = ripser.ripser(points, maxdim=1)["dgms"][1]
    bars = bars[np.isfinite(bars[:, 1])]
    persistence = bars[:, 1] - bars[:, 0]
    holes = bars[persistence > threshold]
    if len(holes) == 0:
        return HoleSummary(0, 0.0, 0.0, 0.0)
    lengths = holes[:, 1] - holes[:, 0]
    total = float(lengths.sum())
    return HoleSummary(len(holes), total, float(lengths.mean()), total / float(holes[:, 1].max() - holes[:, 0].min()))


def skdim_dimension(method: str, x: np.ndarray, k: int) -> float:
    """Return scikit-dimension's global estimate.

    ``TLE`` and ``MLE`` run with ``n_neighbors=k`` and combine the local values their default way, TLE by the mean
    and MLE by the harmonic mean. ``TwoNN`` runs with its defaults.
    """
    if method == "tle":
        return float(skdim.id.TLE().fit(x, n_neighbors=k).dimension_)
    if method == "mle":
        return float(skdim.id.MLE().fit(x, n_neighbors=k).dimension_)
    if method == "twonn":
        return float(skdim.id.TwoNN().fit(x).dimension_)
    raise ValueError(f"Expected `method` to be one of ['tle', 'mle', 'twonn'], got {method!r}.")
