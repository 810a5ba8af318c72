"""The five functions of the numpy package ``perceptual_manifold_geometry``, with its names and signatures.

Code written for that package runs after changing its import to ``import pmg_torch as pmg``. Each function accepts a
numpy array or a tensor (on any device), computes in float64, returns Python numbers, and prints nothing. The values
equal the original's wherever the original computes the formula it states. They differ where the original has a
slip, and each difference is listed, with the test that shows it, in the README section "Coming from
perceptual_manifold_geometry".
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._validation import check_cloud, check_positive_int, nan_on_degenerate, warn_dropped_rows
from .convexity import nonconvexity
from .dimension import intrinsic_dimension, participation_ratio
from .neighbours import MAX_BLOCK_ENTRIES, neighbourhoods
from .topology import holes
from .volume import volume

#: Method names of :func:`estimate_intrinsic_dimension`, matched case-insensitively.
INTRINSIC_DIMENSION_METHODS = ("TLE", "Covariance")


def quantify_overall_concavity(data: Any, k: int = 20) -> float:
    r"""Return the mean variance of each point's neighbourhood, the original package's "overall concavity".

    For point i with k nearest other points :math:`p_1, \dots, p_k` and their sample
    covariance :math:`C_i = \frac{1}{k-1} \sum_j (p_j - \bar p)(p_j - \bar p)^\top`, the value is

    .. math::

        \frac{1}{m} \sum_i \frac{\operatorname{tr} C_i}{D},

    the mean over points of the mean eigenvalue of :math:`C_i`. The original took the point itself among its
    ``k + 1`` neighbours and, by a slip, dropped the first feature column instead of the point. Rows with NaN or
    infinity and exact duplicate rows are left out first, with a warning, because a duplicate would be its copy's
    neighbour at distance zero.

    Args:
        data: ``(m, D)`` array or tensor.
        k: neighbours per point, at least 2.

    Returns:
        The value as a float; NaN, with a warning, if fewer than ``k + 1`` distinct finite rows remain.

    Warns:
        DegenerateInputWarning: when rows were left out, or when the result is NaN.

    Raises:
        TypeError, ValueError: if ``data`` is not an ``(m, D)`` array of numbers, or ``k < 2``.
    """
    x = _as_float64_cloud(data, "data")
    k = check_positive_int(k, "k")
    if k < 2:
        raise ValueError(
            f"Expected `k` to be at least 2, because a sample covariance of k points divides by k - 1, got {k}."
        )
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    return float(nan_on_degenerate("concavity", lambda: _mean_neighbourhood_variance(x, k), lambda: nan))


def calculate_volume(Z: Any, d: float = 1.0) -> tuple[float, float]:
    r"""Return the coding volume :math:`\tfrac12 \log_2 \det(I_D + \tfrac{d}{m} Z_c^\top Z_c)` and volume / m.

    Equal to the original's value wherever its ``det`` stays finite. Where ``det`` overflows to infinity (for example
    300 samples of dimension 256 with variance 64), this returns the finite value from :func:`pmg_torch.volume`.

    Args:
        Z: ``(m, D)`` array or tensor.
        d: the scale ``d``.

    Returns:
        ``(volume, density)`` as floats.
    """
    x = _as_float64_cloud(Z, "Z")
    result = volume(x, d=d)
    return float(result.volume), float(result.density)


def estimate_holes_ripser(
    X: Any,
    threshold: float = 0.1,
    Persistence_diagrams: bool = False,
) -> tuple[int, float, float, float]:
    """Count the H1 bars of ``X`` whose persistence exceeds ``threshold``, as :func:`pmg_torch.holes` does.

    Like the original, every distinct point goes to ripser, with no subsample; use :func:`pmg_torch.holes` for a
    bounded run time. The density is ``total / (max death − min birth)``; the original divided first and
    subtracted after, by operator precedence. With no bar above the threshold this returns zeros where the original
    raised an error.

    With ``Persistence_diagrams=True`` the H1 diagram is drawn on a new pyplot figure: every bar as a point
    (birth, death) coloured by persistence, the diagonal, and the threshold line ``death = birth + threshold``.
    ``plt.show()`` is not called, so a script keeps running. A notebook shows the figure after the cell, and a
    script shows it with ``plt.show()``.

    Args:
        X: ``(m, D)`` array or tensor.
        threshold: minimum persistence, exclusive, for a bar to count as a hole.
        Persistence_diagrams: whether to draw the diagram.

    Returns:
        ``(count, total_persistence, mean_persistence, density)`` as an int and three floats.
    """
    x = _as_float64_cloud(X, "X")
    result = holes(x, threshold=threshold, max_points=None)
    if Persistence_diagrams:
        _draw_persistence_diagram(result.diagram, threshold)
    return result.count, result.total_persistence, result.mean_persistence, result.density


def estimate_intrinsic_dimension(X: Any, method: str = "TLE") -> float:
    """Estimate the intrinsic dimension of ``X`` by TLE or by the participation ratio of the covariance.

    ``method="TLE"`` gives :func:`pmg_torch.intrinsic_dimension` with ``method="tle"`` and ``k=20``, equal to
    scikit-dimension's ``TLE()`` on data without duplicate rows. ``method="Covariance"`` gives the participation
    ratio ``(tr C)² / tr(C²)`` of the covariance of the centred data, which rotating the data leaves unchanged. The
    original squared ``XᵀX`` element by element and did not centre, and it ran TLE for any unknown name.

    Args:
        X: ``(m, D)`` array or tensor.
        method: ``"TLE"`` or ``"Covariance"``, in any letter case.

    Returns:
        The estimate as a float; NaN, with a warning, where the estimator is undefined.

    Raises:
        ValueError: for any other ``method``.
    """
    names = {name.lower(): name for name in INTRINSIC_DIMENSION_METHODS}
    if not isinstance(method, str) or method.lower() not in names:
        raise ValueError(f"Expected `method` to be one of {list(INTRINSIC_DIMENSION_METHODS)}, got {method!r}.")
    x = _as_float64_cloud(X, "X")
    if names[method.lower()] == "Covariance":
        return float(participation_ratio(x))
    return float(intrinsic_dimension(x, method="tle", k=20))


def estimate_nonconvexity(
    X: Any,
    n_projections: int = 10,
    n_components: int = 5,
    alpha: float = 10000,
) -> float:
    """Return :func:`pmg_torch.nonconvexity` of ``X`` with ``seed=0``.

    The original drew its projections without a seed, so its value changed from call to call. This one is the
    same on every call.

    Args:
        X: ``(m, D)`` array or tensor.
        n_projections: how many random projections to average over.
        n_components: dimension of each projection.
        alpha: weight of the coding volume.

    Returns:
        The value as a float; NaN, with a warning, when every projection was flat.
    """
    x = _as_float64_cloud(X, "X")
    return float(nonconvexity(x, n_projections=n_projections, n_components=n_components, alpha=alpha, seed=0))


def _as_float64_cloud(data: Any, name: str) -> Tensor:
    """Convert an array or tensor of real numbers to a detached float64 tensor of shape ``(m, D)``."""
    if isinstance(data, Tensor):
        if data.is_complex() or data.dtype == torch.bool:
            raise TypeError(f"Expected `{name}` to contain real numbers, got dtype {data.dtype}.")
        return check_cloud(data.detach().to(torch.float64), name)
    if data is None:
        # numpy would read None as a 0-d NaN and report only the shape.
        raise TypeError(f"Expected `{name}` to be an (m, D) array of numbers, got NoneType.")
    try:
        array = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"Expected `{name}` to be an (m, D) array of numbers, got {type(data).__name__}: {error}"
        ) from None
    return check_cloud(torch.from_numpy(array), name)


def _mean_neighbourhood_variance(x: Tensor, k: int) -> Tensor:
    nb = neighbourhoods(x, k)
    n_points, n_features = nb.points.shape
    warn_dropped_rows("concavity", nb.n_nonfinite, nb.n_duplicates, n_points, stacklevel=6)
    per_point = torch.empty(n_points, dtype=nb.points.dtype, device=nb.points.device)
    # Gathering the neighbours of a block of rows holds rows * k * D numbers, so blocks keep that bounded.
    rows_per_block = max(1, MAX_BLOCK_ENTRIES // (k * n_features))
    for start in range(0, n_points, rows_per_block):
        stop = min(start + rows_per_block, n_points)
        neighbours = nb.points[nb.indices[start:stop]]
        centred = neighbours - neighbours.mean(dim=1, keepdim=True)
        per_point[start:stop] = centred.square().sum(dim=(1, 2)) / ((k - 1) * n_features)
    return per_point.mean()


def _draw_persistence_diagram(diagram: np.ndarray, threshold: float) -> None:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots()
    persistence = diagram[:, 1] - diagram[:, 0]
    points = axes.scatter(diagram[:, 0], diagram[:, 1], c=persistence, cmap="viridis", s=16)
    figure.colorbar(points, ax=axes, label="persistence (death − birth)")
    top = float(diagram.max()) if diagram.size else 1.0
    axes.plot([0.0, top], [0.0, top], color="grey", linewidth=1, label="death = birth")
    axes.plot(
        [0.0, top],
        [threshold, top + threshold],
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"threshold {threshold:g}",
    )
    n_holes = int((persistence > threshold).sum())
    axes.set(xlabel="birth", ylabel="death", title=f"H1 persistence diagram: {n_holes} holes above the threshold")
    axes.legend(loc="lower right")
