"""Shape similarity of perceptual manifolds: how well the principal axes of two classes line up."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._validation import (
    DegenerateInputError,
    check_cloud,
    drop_nonfinite_rows,
    power_of_two_scale,
    warn_degenerate,
    warn_dropped_rows,
    working_dtype,
)

METRIC = "shape similarity"

#: Maximum number of entries of one block of pairwise axis products in :func:`shape_similarity_matrix`.
MAX_BLOCK_ENTRIES = 2**24


class PrincipalAxes(NamedTuple):
    """The eigenvectors of a cloud's covariance that the data determine.

    Attributes:
        axes: ``(D, r)`` float64 unit eigenvectors as columns, by eigenvalue descending; ``r`` is the numerical rank.
        n_nonfinite: rows left out because they contained NaN or infinity.
    """

    axes: Tensor
    n_nonfinite: int


def shape_similarity(x: Tensor, y: Tensor) -> Tensor:
    r"""Measure how well the principal axes of two clouds line up, from 0 (orthogonal) to 1 (the same axes).

    With :math:`v^{(x)}_i` the unit eigenvector of the covariance of ``x`` with the i-th largest eigenvalue (and the
    same for ``y``),

    .. math::

        \text{similarity}(x, y) = \frac{1}{r} \sum_{i=1}^{r} \left| v^{(x)}_i \cdot v^{(y)}_i \right|,
        \qquad r = \min(\operatorname{rank} C_x, \operatorname{rank} C_y).

    The absolute value makes the result independent of the sign each eigenvector happens to get. The sum stops at
    the smaller numerical rank because eigenvectors beyond a covariance's rank are an arbitrary basis of its null
    space, which changes between devices and LAPACK builds. A class of m < D samples has rank at most m − 1. Dividing
    by r (the published definition sums without dividing) keeps the value in [0, 1] whatever D is. The eigenvectors
    are computed in float64 as :func:`principal_axes` describes.

    NOTE: when two eigenvalues of a cloud are equal or nearly so, their eigenvectors are any orthonormal basis of
    the shared eigenspace, so the value for a nearly isotropic cloud is not stable.

    Args:
        x: ``(m1, D)`` points of the first cloud, any floating-point dtype.
        y: ``(m2, D)`` points of the second cloud, on the same device as ``x``.

    Returns:
        0-d tensor on the device of ``x``, in the wider working dtype of the two inputs (float64 if either is
        float64, float32 otherwise). NaN when either cloud has fewer than 2 finite rows or only identical rows.

    Raises:
        TypeError: if ``x`` or ``y`` is not a floating-point tensor.
        ValueError: if either is not two-dimensional, or they differ in D or in device.

    Warns:
        DegenerateInputWarning: once, when the result is NaN or when rows with NaN or infinity were left out.

    Example:
        >>> cloud = torch.randn(100, 3, generator=torch.Generator().manual_seed(0)) * torch.tensor([3.0, 2.0, 1.0])
        >>> round(float(shape_similarity(cloud, cloud)), 6)
        1.0
    """
    x = check_cloud(x, "x")
    y = check_cloud(y, "y")
    _check_compatible({"x": x, "y": y})
    dtype = torch.promote_types(working_dtype(x), working_dtype(y))
    try:
        x_axes = principal_axes(x, "x")
        y_axes = principal_axes(y, "y")
    except DegenerateInputError as error:
        warn_degenerate(METRIC, error.reason)
        return torch.tensor(float("nan"), dtype=dtype, device=x.device)
    _warn_nonfinite("x", x_axes.n_nonfinite, x.shape[0])
    _warn_nonfinite("y", y_axes.n_nonfinite, y.shape[0])
    rank = min(x_axes.axes.shape[1], y_axes.axes.shape[1])
    products = (x_axes.axes[:, :rank] * y_axes.axes[:, :rank]).sum(dim=0)
    return products.abs().mean().to(dtype)


def shape_similarity_matrix(clouds: Mapping[Hashable, Tensor] | Sequence[Tensor]) -> Tensor:
    """Compute :func:`shape_similarity` between every pair of classes.

    Each class's principal axes are computed once. The matrix is symmetric, and its diagonal is 1 for every class
    that has a defined value.

    Args:
        clouds: the ``(m_c, D)`` clouds of C classes, all with the same D and on the same device, as a mapping from
            class label to cloud, or as a sequence whose indices are the labels.

    Returns:
        ``(C, C)`` tensor in the order of ``clouds``, on the device of the first cloud, in the widest working dtype
        of the clouds. The row and column of a class with fewer than 2 finite rows or only identical rows are NaN.

    Raises:
        TypeError: if ``clouds`` is not a mapping or sequence of floating-point tensors.
        ValueError: if there are no clouds, a cloud is not two-dimensional, or the clouds differ in D or device.

    Warns:
        DegenerateInputWarning: once per class whose row is NaN or whose rows with NaN or infinity were left out,
            naming the class.
    """
    named = _named_clouds(clouds)
    _check_compatible(named)
    first = next(iter(named.values()))
    dtype = working_dtype(first)
    for cloud in named.values():
        dtype = torch.promote_types(dtype, working_dtype(cloud))

    axes: list[Tensor | None] = []
    for label, cloud in named.items():
        try:
            class_axes = principal_axes(cloud, "the class")
        except DegenerateInputError as error:
            warn_degenerate(METRIC, error.reason, label)
            axes.append(None)
            continue
        _warn_nonfinite(f"class {label}", class_axes.n_nonfinite, cloud.shape[0])
        axes.append(class_axes.axes)
    return _pairwise_similarity(axes, first.device).to(dtype)


def principal_axes(x: Tensor, name: str = "the cloud") -> PrincipalAxes:
    """Find the eigenvectors of the covariance of ``x`` that the data determine, by eigenvalue descending.

    Rows with NaN or infinity are left out. The eigenvectors come from the smaller Gram matrix of the centred data
    ``Z`` in float64: ``Z^T Z`` (``D x D``) when ``m >= D``, else ``Z Z^T`` (``m x m``), whose eigenvectors ``u_i``
    give ``v_i = Z^T u_i / sigma_i``. This is cheaper than an SVD of ``Z``. The cloud is first divided by the power
    of two that brings its largest entry into ``[1, 2)``, so finite clouds of any magnitude give the same axes.

    An eigenvalue counts towards the rank when it exceeds ``lambda_max`` times a relative tolerance, the larger of
    two terms. ``(max(m, D) * eps)**2``, with ``eps`` of the working dtype, is numpy's ``matrix_rank`` rule applied
    to the data. ``max(m, D) * eps_float64`` is the smallest relative eigenvalue the float64 Gram matrix resolves.

    Raises:
        DegenerateInputError: if fewer than 2 finite rows remain or they are all identical.
    """
    points, n_nonfinite = drop_nonfinite_rows(x.to(working_dtype(x)))
    n_points, n_features = points.shape
    if n_points < 2:
        left_out = f" ({n_nonfinite} rows with NaN or infinity left out)" if n_nonfinite else ""
        rows = "1 finite row" if n_points == 1 else f"{n_points} finite rows"
        raise DegenerateInputError(f"{name} has {rows}{left_out}; a covariance needs at least 2")
    # The axes do not depend on the scale of the cloud, but its Gram matrix overflows float64 for entries beyond
    # about 1e154 and underflows to zero below 1e-154. Dividing by a power of two is exact and avoids both.
    centred = points.to(torch.float64)
    centred = centred / power_of_two_scale(centred)
    centred = centred - centred.mean(dim=0, keepdim=True)
    by_features = n_points >= n_features
    gram = centred.T @ centred if by_features else centred @ centred.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    if not eigenvalues[0] > 0:
        raise DegenerateInputError(f"all {n_points} finite rows of {name} are identical")

    size = max(n_points, n_features)
    relative = max((size * torch.finfo(points.dtype).eps) ** 2, size * torch.finfo(torch.float64).eps)
    rank = int((eigenvalues > eigenvalues[0] * relative).sum())
    eigenvectors = eigenvectors[:, :rank]
    if not by_features:
        eigenvectors = centred.T @ eigenvectors / eigenvalues[:rank].sqrt()
        eigenvectors = eigenvectors / torch.linalg.vector_norm(eigenvectors, dim=0, keepdim=True)
    return PrincipalAxes(eigenvectors, n_nonfinite)


def _named_clouds(clouds: Any) -> dict[Hashable, Tensor]:
    if isinstance(clouds, Mapping):
        items = list(clouds.items())
    elif isinstance(clouds, Sequence) and not isinstance(clouds, (str, bytes, Tensor)):
        items = list(enumerate(clouds))
    else:
        raise TypeError(
            f"Expected `clouds` to be a mapping from class label to tensor or a sequence of tensors, "
            f"got {type(clouds).__name__}."
        )
    if not items:
        raise ValueError("Expected at least one cloud in `clouds`, got none.")
    return {label: check_cloud(cloud, f"clouds[{label!r}]") for label, cloud in items}


def _check_compatible(named: Mapping[Any, Tensor]) -> None:
    first_name, first = next(iter(named.items()))
    for name, cloud in named.items():
        if cloud.shape[1] != first.shape[1]:
            raise ValueError(
                f"Expected every cloud to have the same dimension D, got D = {first.shape[1]} for {first_name} and "
                f"D = {cloud.shape[1]} for {name}."
            )
        if cloud.device != first.device:
            raise ValueError(
                f"Expected every cloud on the same device, got {first.device} for {first_name} and {cloud.device} "
                f"for {name}."
            )


def _warn_nonfinite(name: str, n_nonfinite: int, n_rows: int) -> None:
    warn_dropped_rows(f"{METRIC} ({name})", n_nonfinite, 0, n_rows - n_nonfinite, stacklevel=4)


def _pairwise_similarity(axes: list[Tensor | None], device: torch.device) -> Tensor:
    """Return the C×C mean absolute products of matching axes, NaN in the row and column of a missing class."""
    n_classes = len(axes)
    ranks = torch.tensor([0 if a is None else a.shape[1] for a in axes], device=device)
    n_features = next((a.shape[0] for a in axes if a is not None), 1)
    max_rank = max(1, int(ranks.max()))
    padded = torch.zeros((n_classes, n_features, max_rank), dtype=torch.float64, device=device)
    for c, class_axes in enumerate(axes):
        if class_axes is not None:
            padded[c, :, : class_axes.shape[1]] = class_axes

    shared_rank = torch.minimum(ranks[:, None], ranks[None, :])
    similarity = torch.full((n_classes, n_classes), float("nan"), dtype=torch.float64, device=device)
    rows_per_block = max(1, MAX_BLOCK_ENTRIES // (n_classes * max_rank))
    for start in range(0, n_classes, rows_per_block):
        stop = min(start + rows_per_block, n_classes)
        products = torch.einsum("adr,bdr->abr", padded[start:stop], padded).abs()
        cumulative = products.cumsum(dim=2)
        block_rank = shared_rank[start:stop]
        summed = torch.gather(cumulative, 2, (block_rank - 1).clamp(min=0)[:, :, None]).squeeze(2)
        similarity[start:stop] = torch.where(block_rank > 0, summed / block_rank.clamp(min=1), similarity[start:stop])
    return similarity
