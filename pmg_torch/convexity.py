"""Nonconvexity of a perceptual manifold: how its coding volume compares with the convex hulls of random projections."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.spatial import ConvexHull, QhullError
from torch import Tensor

from ._validation import (
    DegenerateInputError,
    DegenerateInputWarning,
    check_cloud,
    check_positive_float,
    check_positive_int,
    drop_nonfinite_rows,
    nan_on_degenerate,
    nan_scalar,
    working_dtype,
)
from .volume import volume

METRIC = "nonconvexity"
OVERFLOWED = "overflowed to infinity"


def gaussian_projections(
    n_features: int,
    n_projections: int = 10,
    n_components: int = 5,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw seeded Gaussian random projection matrices.

    The entries are independent draws from N(0, 1 / n_components), the distribution scikit-learn's
    ``GaussianRandomProjection`` uses. They are drawn on the CPU in float64, so one seed gives the same matrices on
    every device.

    Args:
        n_features: ``D``, the dimension of the points to project.
        n_projections: ``P``, how many matrices to draw.
        n_components: ``c``, the dimension to project to.
        seed: seed of the draw.
        device: device of the returned tensor; the CPU by default.

    Returns:
        ``(P, D, c)`` float64 tensor. A cloud ``x`` of shape ``(m, D)`` projects to ``x @ projections[i]``.
    """
    n_features = check_positive_int(n_features, "n_features")
    n_projections = check_positive_int(n_projections, "n_projections")
    n_components = check_positive_int(n_components, "n_components")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"Expected `seed` to be an int, got {type(seed).__name__} ({seed!r}).")
    generator = torch.Generator().manual_seed(seed)
    shape = (n_projections, n_features, n_components)
    projections = torch.randn(shape, generator=generator, dtype=torch.float64) / math.sqrt(n_components)
    return projections.to(device)


def nonconvexity(
    x: Tensor, n_projections: int = 10, n_components: int = 5, alpha: float = 10000, seed: int = 0
) -> Tensor:
    r"""Measure how far a cloud's coding volume falls short of the convex hulls of its random projections.

    With :math:`H_i` the volume of the convex hull of the cloud projected by the i-th of ``n_projections`` Gaussian
    random matrices (:func:`gaussian_projections`) and :math:`V` the coding volume of :func:`pmg_torch.volume`
    (with ``d = 1``),

    .. math::

        \text{nonconvexity} = \frac{\bar H - \alpha V}{\bar H}, \qquad \bar H = \frac{1}{n} \sum_i H_i .

    Larger values mean the hulls are large compared with the volume the points occupy, which suggests a less convex
    manifold. The value is not bounded below, and ``alpha`` sets how much the volume counts against the hulls.

    Args:
        x: ``(m, D)`` points, any floating-point dtype, on any device.
        n_projections: how many random projections to average over.
        n_components: dimension of each projection, from 2 to ``D``. Qhull's time grows very fast with it: on 1000
            Gaussian points one hull takes about 0.01 s at 5 dimensions and about 1 s at 7.
        alpha: non-negative weight of the volume.
        seed: seed of the projection matrices, so that repeated calls give the same value.

    Returns:
        0-d tensor in the working dtype of ``x`` (float64 for float64 input, float32 otherwise), on its device.
        NaN when the value is undefined.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor or an argument has the wrong type.
        ValueError: if ``x`` is not ``(m, D)``, ``n_components`` is not between 2 and ``D``, or ``alpha`` is
            negative.

    Warns:
        DegenerateInputWarning: once, when rows with NaN or infinity were left out, when projections were skipped
            because their points were flat or overflowed, or when the result is NaN because no projection was left.

    Example:
        >>> cloud = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
        >>> bool(nonconvexity(cloud) == nonconvexity(cloud))
        True
    """
    x = check_cloud(x)
    n_components = check_positive_int(n_components, "n_components")
    if not 2 <= n_components <= x.shape[1]:
        raise ValueError(
            f"Expected `n_components` between 2 and D = {x.shape[1]}, got {n_components}. Qhull needs at least 2 "
            "dimensions, and a projection to more than D dimensions is flat."
        )
    projections = gaussian_projections(x.shape[1], n_projections, n_components, seed, device=x.device)
    return nonconvexity_from_projections(x, projections, alpha)


def nonconvexity_from_projections(x: Tensor, projections: Tensor, alpha: float = 10000) -> Tensor:
    """Compute :func:`nonconvexity` with given projection matrices in place of seeded random ones.

    Args:
        x: ``(m, D)`` points.
        projections: ``(P, D, c)`` matrices with ``c >= 2``; the i-th projection of ``x`` is ``x @ projections[i]``.
        alpha: non-negative weight of the volume.

    Returns:
        0-d tensor, as :func:`nonconvexity` returns.

    Raises:
        TypeError: if ``x`` or ``projections`` is not a floating-point tensor.
        ValueError: if the shapes do not fit together, or ``alpha`` is negative.

    Warns:
        DegenerateInputWarning: as :func:`nonconvexity`.
    """
    x = check_cloud(x)
    projections = _check_projections(projections, x.shape[1])
    alpha = check_positive_float(alpha, "alpha", allow_zero=True)
    return nan_on_degenerate(METRIC, lambda: _nonconvexity(x, projections, alpha), lambda: nan_scalar(x))


def _check_projections(projections: Tensor, n_features: int) -> Tensor:
    if not isinstance(projections, Tensor):
        raise TypeError(f"Expected `projections` to be a torch.Tensor, got {type(projections).__name__}.")
    if not projections.is_floating_point():
        raise TypeError(f"Expected `projections` to have a floating-point dtype, got {projections.dtype}.")
    if projections.ndim != 3 or projections.shape[0] < 1 or projections.shape[1] != n_features:
        raise ValueError(
            f"Expected `projections` of shape (P, D, c) with P >= 1 and D = {n_features}, "
            f"got {tuple(projections.shape)}."
        )
    if projections.shape[2] < 2:
        raise ValueError(
            f"Expected projections to c >= 2 dimensions, because Qhull needs 2, got c = {projections.shape[2]}."
        )
    return projections.detach()


def _nonconvexity(x: Tensor, projections: Tensor, alpha: float) -> Tensor:
    # Duplicate rows are kept, because they leave the hulls unchanged and the coding volume counts every row.
    points, n_nonfinite = drop_nonfinite_rows(x.to(working_dtype(x)))
    n_components = projections.shape[2]
    if points.shape[0] < n_components + 1:
        raise DegenerateInputError(
            f"{points.shape[0]} finite rows; a convex hull in c = {n_components} dimensions needs at least "
            f"c + 1 = {n_components + 1}"
        )

    hull_volumes, skipped = _projected_hull_volumes(points, projections.to(points.device))
    problems = []
    if n_nonfinite:
        problems.append(f"{n_nonfinite} of {x.shape[0]} rows contain NaN or infinity and were left out")
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
        n_skipped = sum(skipped.values())
        problems.append(f"{n_skipped} of {projections.shape[0]} projections were skipped: {reasons}")
    if not hull_volumes:
        raise DegenerateInputError("; ".join(problems))
    if problems:
        warnings.warn(f"{METRIC}: {'; '.join(problems)}.", DegenerateInputWarning, stacklevel=4)

    mean_hull = sum(hull_volumes) / len(hull_volumes)
    coding_volume = float(volume(points, d=1.0).volume)
    result = (mean_hull - alpha * coding_volume) / mean_hull
    return torch.tensor(result, dtype=points.dtype, device=x.device)


def _projected_hull_volumes(points: Tensor, projections: Tensor) -> tuple[list[float], dict[str, int]]:
    """Return the hull volumes of the full-dimensional projections, and how many others were skipped for each reason.

    Qhull is never given non-finite or flat point sets, because it then fails with an error (QH6154 and others)
    or returns a meaningless volume. A projection is flat when its centred points have a singular value at or below
    ``s_max * max(m, c) * eps``, numpy's ``matrix_rank`` rule, with ``eps`` of the dtype of ``points``: float32
    data that lie in a subspace are flat only to within float32 rounding.
    """
    projected = torch.einsum("md,pdc->pmc", points.to(torch.float64), projections.to(torch.float64))
    centred = projected - projected.mean(dim=1, keepdim=True)
    finite = torch.isfinite(centred).all(dim=(1, 2))
    # Scaling each projection to a largest entry of 1 keeps LAPACK's SVD clear of overflow and leaves the rank alone.
    scale = centred.abs().amax(dim=(1, 2), keepdim=True)
    usable = finite[:, None, None] & (scale > 0)
    scaled = torch.where(
        usable, centred / torch.where(usable, scale, torch.ones_like(scale)), torch.zeros_like(centred)
    )
    singular_values = torch.linalg.svdvals(scaled)
    n_points, n_components = projected.shape[1], projected.shape[2]
    tolerance = singular_values[:, :1] * max(n_points, n_components) * torch.finfo(points.dtype).eps
    full_rank = (singular_values > tolerance).all(dim=1) & (singular_values[:, 0] > 0)

    volumes: list[float] = []
    skipped: dict[str, int] = {}
    projected_cpu = projected.cpu().numpy()
    for i, (is_finite, is_full_rank) in enumerate(zip(finite.tolist(), full_rank.tolist(), strict=True)):
        reason = None
        if not is_finite:
            reason = OVERFLOWED
        elif not is_full_rank:
            reason = f"were flat (rank below c = {n_components})"
        else:
            reason = _append_hull_volume(projected_cpu[i], volumes)
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
    return volumes, skipped


def _append_hull_volume(projected: np.ndarray, volumes: list[float]) -> str | None:
    """Append the hull volume of ``projected`` to ``volumes``, or return why it cannot be used."""
    try:
        hull_volume = float(ConvexHull(projected).volume)
    except QhullError:
        # The rank check leaves only point sets that are flat to within rounding, which Qhull may still reject.
        return "were rejected by Qhull"
    if not math.isfinite(hull_volume):
        return OVERFLOWED
    if hull_volume <= 0:
        return "had a hull of zero volume"
    volumes.append(hull_volume)
    return None
