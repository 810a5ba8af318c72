"""Holes of a perceptual manifold: persistent homology in dimension 1, computed by ripser."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from ripser import ripser
from torch import Tensor

from ._validation import (
    check_cloud,
    check_positive_float,
    check_positive_int,
    drop_nonfinite_rows,
    power_of_two_scale,
    warn_dropped_rows,
    working_dtype,
)
from .neighbours import remove_duplicate_rows

#: Default cap on the number of points given to ripser. The Vietoris-Rips complex up to triangles has O(m**3)
#: simplices, so ripser's time and memory grow very fast with m. Measured with ripser 0.6.15 on 2 CPU cores, the
#: slowest case tried was a noisy circle in the plane: 1.2 s at 500 points, 3.7 s at 700 and 12.5 s at 1000.
#: 512-dimensional Gaussian clouds took 0.25 s at 500 points.
MAX_RIPSER_POINTS = 500


class HolesResult(NamedTuple):
    """The H1 bars of a cloud whose persistence (death − birth) exceeds a threshold.

    Attributes:
        count: number of H1 bars whose persistence exceeds the threshold.
        total_persistence: sum of the persistence of those bars.
        mean_persistence: ``total_persistence / count``, or 0.0 when ``count`` is 0.
        density: ``total_persistence / (max death − min birth)`` over those bars, or 0.0 when ``count`` is 0.
        diagram: ``(b, 2)`` float64 array of (birth, death) of every H1 bar of the points given to ripser, above the
            threshold or not, so that another threshold can be applied without running ripser again.
    """

    # The field shadows tuple.count, which mypy reports, but `count` is the public name of this figure.
    count: int  # type: ignore[assignment]
    total_persistence: float
    mean_persistence: float
    density: float
    diagram: np.ndarray


def holes(x: Tensor, threshold: float = 0.1, max_points: int | None = MAX_RIPSER_POINTS, seed: int = 0) -> HolesResult:
    r"""Count the holes of a point cloud as the long-lived bars of its H1 persistence diagram.

    ripser computes the H1 persistence diagram of the Vietoris-Rips filtration on the Euclidean distances of the
    points. A bar :math:`(b_j, d_j)` with persistence :math:`p_j = d_j - b_j > \text{threshold}` counts as a hole:

    .. math::

        \text{count} = |J|, \quad \text{total} = \sum_{j \in J} p_j, \quad
        \text{mean} = \text{total} / |J|, \quad
        \text{density} = \frac{\text{total}}{\max_{j \in J} d_j - \min_{j \in J} b_j}.

    Rows with NaN or infinity are left out with a warning, and exact duplicate rows are removed, which does not
    change the H1 diagram. When more than ``max_points`` distinct rows remain, a seeded uniform subsample of
    ``max_points`` rows is used, because ripser's time and memory grow roughly with the cube of the point count (see
    :data:`MAX_RIPSER_POINTS`). The distances are computed in float64 in torch on the device of ``x``, but ripser
    rounds them to float32, so births and deaths carry float32 precision. The points are divided by a power of two
    before ripser and the diagram is multiplied back, so clouds of any finite magnitude keep their holes.

    No bar above the threshold is a valid result, and every figure is then 0. Fewer than 3 distinct finite points
    cannot enclose a hole, so they also give zeros.

    Args:
        x: ``(m, D)`` points, any floating-point dtype, on any device.
        threshold: minimum persistence, exclusive, for a bar to count as a hole; ``>= 0``, in the units of ``x``.
        max_points: at most this many points go to ripser (``>= 3``); ``None`` gives ripser every distinct point.
        seed: seed of the subsample, used only when there are more than ``max_points`` distinct points.

    Returns:
        A :class:`HolesResult` of Python numbers and the full H1 diagram.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor, or an argument has the wrong type.
        ValueError: if ``x`` is not ``(m, D)``, ``threshold`` is negative or not finite, or ``max_points < 3``.

    Warns:
        DegenerateInputWarning: when rows with NaN or infinity were left out.

    Example:
        >>> angles = torch.linspace(0, 2 * torch.pi, 61)[:-1]
        >>> circle = torch.stack([angles.cos(), angles.sin()], dim=1)
        >>> holes(circle).count
        1
    """
    x = check_cloud(x)
    threshold = check_positive_float(threshold, "threshold", allow_zero=True)
    if max_points is not None:
        max_points = check_positive_int(max_points, "max_points")
        if max_points < 3:
            raise ValueError(
                f"Expected `max_points` to be at least 3, the fewest points that enclose a hole, got {max_points}."
            )
    seed = _check_seed(seed)

    points = _distinct_finite_points(x)
    if points.shape[0] < 3:
        return _no_holes(np.empty((0, 2)))
    if max_points is not None and points.shape[0] > max_points:
        points = _subsample(points, max_points, seed)
    diagram = _h1_diagram(points)
    return _summarise(diagram, threshold)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expected `seed` to be an int, got {type(seed).__name__} ({seed!r}).")
    return seed


def _distinct_finite_points(x: Tensor) -> Tensor:
    points, n_nonfinite = drop_nonfinite_rows(x.to(working_dtype(x)))
    # Duplicates are removed without a warning because they leave the H1 diagram unchanged.
    warn_dropped_rows("holes", n_nonfinite, 0, points.shape[0], stacklevel=4)
    points, _ = remove_duplicate_rows(points)
    return points


def _subsample(points: Tensor, n: int, seed: int) -> Tensor:
    # The permutation is drawn on the CPU so that one seed picks the same rows on every device.
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(points.shape[0], generator=generator)[:n]
    chosen, _ = torch.sort(chosen)
    return points[chosen.to(points.device)]


def _h1_diagram(points: Tensor) -> np.ndarray:
    """Return the H1 diagram of ``points`` in their own units, whatever their magnitude."""
    # Squared differences overflow float64 beyond about 1e154, and ripser rounds distances to float32, which represents
    # magnitudes from about 1e-38 to 3e38 only. Dividing the points by a power of two s is exact and brings their
    # largest entry into [1, 2), so every distance is below 4 sqrt(D). Only distances under about 1e-38 times the
    # largest entry still lose precision in float32. Multiplying the diagram by s is exact wherever it stays finite.
    points = points.to(torch.float64)
    scale = power_of_two_scale(points)
    points = points / scale
    distances = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
    # ripser switches to its sparse code path when any diagonal entry is non-zero, so make the zeros exact.
    distances.fill_diagonal_(0.0)
    result = ripser(distances.cpu().numpy(), maxdim=1, distance_matrix=True)
    diagram = np.asarray(result["dgms"][1], dtype=np.float64).reshape(-1, 2)
    return diagram * float(scale)


def _no_holes(diagram: np.ndarray) -> HolesResult:
    return HolesResult(count=0, total_persistence=0.0, mean_persistence=0.0, density=0.0, diagram=diagram)


def _summarise(diagram: np.ndarray, threshold: float) -> HolesResult:
    persistence = diagram[:, 1] - diagram[:, 0]
    long_bars = diagram[persistence > threshold]
    if long_bars.shape[0] == 0:
        return _no_holes(diagram)
    total = float(persistence[persistence > threshold].sum())
    span = float(long_bars[:, 1].max() - long_bars[:, 0].min())
    return HolesResult(
        count=int(long_bars.shape[0]),
        total_persistence=total,
        mean_persistence=total / long_bars.shape[0],
        density=total / span,
        diagram=diagram,
    )
