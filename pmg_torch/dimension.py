"""Intrinsic dimension of a point cloud: TLE, Levina–Bickel MLE, TwoNN and the participation ratio.

The three kNN estimators reproduce scikit-dimension 0.5's ``TLE``, ``MLE`` and ``TwoNN`` with their default
settings, batched over points in torch. The participation ratio needs no neighbours and counts the directions the
covariance spreads over.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import (
    DegenerateInputError,
    check_choice,
    check_cloud,
    check_positive_int,
    drop_nonfinite_rows,
    nan_scalar,
    power_of_two_scale,
    warn_degenerate,
    warn_dropped_rows,
    working_dtype,
)
from .neighbours import Neighbourhoods, neighbour_offset_grams, neighbourhoods, search_scale

METHODS = ("tle", "mle", "twonn", "pr")
KNN_METHODS = ("tle", "mle", "twonn")

#: scikit-dimension's default ``TLE(epsilon=1e-4)``. Here it bounds measurements relative to the neighbourhood
#: radius, and it is also the threshold below which a point's sum of log measurements counts as zero.
TLE_EPSILON = 1e-4

#: Pairs of neighbours closer than ``sqrt(CLOSE_PAIR_FRACTION)`` times the neighbourhood radius have their distance
#: recomputed from the rows in :func:`tle_pointwise`. From the offset Gram matrix, a squared distance this small
#: carries a relative error of about 1e-12; below it, the error grows as the pair gets closer.
CLOSE_PAIR_FRACTION = 1e-4

#: Pairs of neighbours per block of :func:`tle_pointwise`. It bounds the memory of the dozen float64 temporaries
#: (about 6 MiB a block), and blocks this small also ran about 10% faster than one block of 1000 points.
TLE_BLOCK_PAIRS = 2**16

#: scikit-dimension's default ``TwoNN(discard_fraction=0.1)``: the largest 10% of the ratios ``r2 / r1`` are left out.
TWONN_DISCARD_FRACTION = 0.1


def intrinsic_dimension(x: Tensor, method: str = "tle", k: int = 20) -> Tensor:
    """Estimate the intrinsic dimension of the cloud ``x``.

    Methods:

    * ``"tle"``, the tight local estimator (Amsaleg et al., 2019) with central measurements and reflections, as
      scikit-dimension's ``TLE().fit(x, n_neighbors=k).dimension_``: the mean over points of a local estimate built
      from the point's ``k`` nearest other points and the distances among them. See
      :func:`intrinsic_dimension_from_neighbourhoods` for the one difference.
    * ``"mle"``, Levina–Bickel, aggregated as scikit-dimension's ``MLE().fit(x, n_neighbors=k)`` does by default:
      ``(k - 1) / mean_i sum_j log(r_ik / r_ij)``, the harmonic mean of the per-point estimates.
    * ``"twonn"``, TwoNN (Facco et al., 2017) as scikit-dimension's ``TwoNN()``: the slope through the origin of
      ``-log(1 - F(mu))`` against ``log(mu)``, ``mu = r2 / r1``, after the largest 10% of the ratios are left out.
      It uses the two nearest neighbours whatever ``k`` is.
    * ``"pr"``, the participation ratio of the covariance, :func:`participation_ratio`. It ignores ``k``.

    Rows with NaN or infinity are left out. The kNN methods also leave out exact duplicate rows, because a zero
    distance makes their logarithms infinite; both are reported in one :class:`DegenerateInputWarning`.

    Args:
        x: ``(m, D)`` points, floating point.
        method: ``"tle"`` (default), ``"mle"``, ``"twonn"`` or ``"pr"``.
        k: neighbours per point for ``"tle"`` and ``"mle"``, at least 2.

    Returns:
        0-d tensor in the working dtype on ``x``'s device (float64 for float64 input, float32 otherwise).

    Raises:
        TypeError: if ``x`` is not a floating-point tensor or ``k`` is not an int.
        ValueError: if ``x`` is not ``(m, D)``, ``method`` is unknown, or ``k < 2`` for ``"tle"`` or ``"mle"``.

    Warns:
        DegenerateInputWarning: when the result is NaN (fewer than ``k + 1`` distinct finite rows for the kNN
            methods, identical rows for ``"pr"``), or when rows were left out.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> plane = torch.randn(500, 2, generator=generator, dtype=torch.float64) @ torch.randn(
        ...     2, 10, generator=generator, dtype=torch.float64
        ... )
        >>> round(float(intrinsic_dimension(plane)))
        2
    """
    x = check_cloud(x)
    method = check_choice(method, "method", METHODS)
    k = check_positive_int(k, "k")
    if method == "pr":
        return participation_ratio(x)
    if method != "twonn":
        _check_knn_k(k, method)
    metric = f"intrinsic dimension ({method})"
    try:
        nb = neighbourhoods(x, 2 if method == "twonn" else k)
        dimension = intrinsic_dimension_from_neighbourhoods(nb, method)
    except DegenerateInputError as error:
        warn_degenerate(metric, error.reason)
        return nan_scalar(x)
    warn_dropped_rows(metric, nb.n_nonfinite, nb.n_duplicates, nb.points.shape[0])
    return dimension


def intrinsic_dimension_from_neighbourhoods(
    nb: Neighbourhoods, method: str = "tle", *, local_dimensions: Tensor | None = None
) -> Tensor:
    """Estimate the intrinsic dimension from a finished neighbour search; see :func:`intrinsic_dimension`.

    ``"tle"`` and ``"mle"`` use all ``nb.k`` neighbours and ``"twonn"`` the first two, so one search serves every
    method and curvature too.

    TLE differs from scikit-dimension 0.5 in one rule. scikit-dimension drops a measurement (a distance-like
    quantity ``s_ij``, ``t_ij`` or ``r_j``) when it is below ``epsilon = 1e-4`` in absolute terms, which makes its
    estimate depend on the units of the data: on a cloud scaled by 1e-5 it drops every measurement and returns 0. Here
    a measurement is dropped when it is below ``epsilon * r``, ``r`` the point's distance to its k-th neighbour, so
    the estimate is invariant to scale. The two agree whenever no measurement falls between ``1e-4 * r`` and
    ``1e-4``, which on data whose neighbourhood radii are near 1 takes a near-coincidence of neighbours. The
    measurements are also computed in a rationalised form that avoids cancellation where ``r_i`` is near ``r``.

    Args:
        nb: the output of :func:`pmg_torch.neighbourhoods`.
        method: ``"tle"``, ``"mle"`` or ``"twonn"``.
        local_dimensions: ``(n,)`` for ``"tle"``, the pointwise estimates :func:`tle_pointwise` of ``nb`` when the
            caller has them (curvature's default tangent dimension uses the same ones); computed here when ``None``.

    Returns:
        0-d tensor in the dtype of ``nb.points`` on its device.

    Raises:
        TypeError: if ``nb`` is not a :class:`~pmg_torch.Neighbourhoods`.
        ValueError: for an unknown ``method``, or ``nb.k`` below 2.
        DegenerateInputError: if the estimate is undefined, for example when every point's neighbours lie at one
            distance.
    """
    if not isinstance(nb, Neighbourhoods):
        raise TypeError(f"Expected `nb` to be a Neighbourhoods from pmg_torch.neighbourhoods, got {type(nb).__name__}.")
    method = check_choice(method, "method", KNN_METHODS)
    _check_knn_k(nb.k, method)
    if method == "tle":
        dimension = (tle_pointwise(nb) if local_dimensions is None else local_dimensions).mean()
    elif method == "mle":
        dimension = _mle(nb.distances)
    else:
        dimension = _twonn(nb.distances[:, :2])
    if not torch.isfinite(dimension):
        raise DegenerateInputError(f"the {method.upper()} estimate is {float(dimension)}")
    return dimension.to(nb.points.dtype)


def participation_ratio(x: Tensor) -> Tensor:
    """Compute the participation ratio ``(tr C)^2 / tr(C^2)`` of the covariance ``C`` of the centred cloud.

    With ``lambda_i`` the eigenvalues of ``C`` it is ``(sum lambda_i)^2 / sum lambda_i^2``: 1 when all variance
    lies along one direction, ``d`` when it is spread evenly over ``d`` directions. Centring makes it invariant to
    rotation and translation, and it is invariant to scale. It is computed in float64 from the smaller of the two
    Gram matrices of the centred data, because ``tr C`` and ``tr(C^2) = |Z^T Z|_F^2 / (m-1)^2`` are both Gram
    quantities and the normalisation cancels.

    Args:
        x: ``(m, D)`` points, floating point. Rows with NaN or infinity are left out.

    Returns:
        0-d tensor in the working dtype on ``x``'s device.

    Raises:
        TypeError, ValueError: if ``x`` is not a floating-point tensor of shape ``(m, D)``.

    Warns:
        DegenerateInputWarning: NaN is returned when fewer than 2 finite rows remain or all rows are identical, and
            a warning is also issued when rows were left out.

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> cloud = torch.randn(4000, 3, generator=generator, dtype=torch.float64)
        >>> round(float(participation_ratio(cloud)), 1)
        3.0
    """
    x = check_cloud(x)
    metric = "participation ratio"
    finite, n_nonfinite = drop_nonfinite_rows(x)
    try:
        ratio = _participation_ratio(finite, n_nonfinite)
    except DegenerateInputError as error:
        warn_degenerate(metric, error.reason)
        return nan_scalar(x)
    warn_dropped_rows(metric, n_nonfinite, 0, finite.shape[0])
    return ratio.to(working_dtype(x))


def tle_pointwise(nb: Neighbourhoods, epsilon: float = TLE_EPSILON, *, offset_grams: Tensor | None = None) -> Tensor:
    """Return the local TLE estimate of every point, ``(n,)`` in float64.

    For point ``q`` with neighbours ``x_1..x_k``, offsets ``o_j = x_j - q``, distances ``r_j = |o_j|``
    (``r = max r_j``) and ``v_ij = |x_i - x_j|``, every ordered pair ``i != j`` gives two measurements, from ``x_j``
    (``s_ij``) and from its reflection ``2q - x_j`` (``t_ij``, with ``z_ij = |o_i + o_j|``)::

        s_ij = r (sqrt(a^2 + 4 v^2 (r^2 - r_i^2)) - a) / (2 (r^2 - r_i^2)),   a = r_i^2 + v_ij^2 - r_j^2

    and ``t_ij`` the same with ``v`` replaced by ``z``. The estimate is
    ``-n_terms / (sum log(s/r) + sum log(t/r) + 2 sum_j log(r_j / r))``, where ``n_terms`` counts the logarithms in
    the denominator, each distance twice: ``2 k^2`` when nothing is dropped. A pair ``(s_ij, t_ij)`` with either
    below ``epsilon * r``, and a distance below ``epsilon * r``, is left out of the sums and removes 2 from
    ``n_terms``. A point whose pair logarithms sum to more than ``-epsilon`` (all neighbours at one distance) gets
    0, as in scikit-dimension.

    Lengths come from the Gram matrix ``O`` of the offsets (:func:`pmg_torch.neighbours.neighbour_offset_grams`):
    ``v_ij^2 = O_ii + O_jj - 2 O_ij``, ``z_ij^2 = O_ii + O_jj + 2 O_ij`` and ``a = 2 (O_ii - O_ij)``. Their float64
    rounding is about 1e-15 of ``r^2`` (see :func:`~pmg_torch.neighbours.neighbour_offset_grams` for when they come
    from the cloud's Gram matrix), so for the few pairs with ``v_ij^2`` below :data:`CLOSE_PAIR_FRACTION` of ``r^2``
    both ``v_ij^2`` and ``a = 2 o_i . (x_i - x_j)`` are recomputed from the difference of the two rows. A
    near-duplicate pair at the edge of the neighbourhood, where ``r_i`` is close to ``r``, can give a measurement
    near ``epsilon * r`` that depends on every digit of ``v_ij``.

    Args:
        nb: the output of :func:`pmg_torch.neighbourhoods`.
        epsilon: the relative threshold below which measurements and distances are dropped.
        offset_grams: ``(n, k, k)`` float64 offset Gram matrices of ``nb`` when the caller already has them, in
            the units of ``neighbour_offset_grams(nb, scaled=True)``, so that no length overflows or underflows.

    Returns:
        ``(n,)`` float64 tensor on the device of ``nb.points``.
    """
    n, k = nb.indices.shape
    chunk = max(1, TLE_BLOCK_PAIRS // (k * k))
    scale = search_scale(nb)
    estimates = torch.empty(n, dtype=torch.float64, device=nb.points.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        if offset_grams is None:
            grams = neighbour_offset_grams(nb, rows=(start, stop), scaled=True)
        else:
            grams = offset_grams[start:stop]
        estimates[start:stop] = _tle_block(grams, epsilon, nb.points, nb.indices, start, scale)
    return estimates


def _tle_block(grams: Tensor, epsilon: float, points: Tensor, indices: Tensor, start: int, scale: Tensor) -> Tensor:
    """TLE for a block of points, from the ``(c, k, k)`` Gram matrices of each point's neighbour offsets.

    ``grams`` hold the offsets divided by ``scale``. ``points`` and ``indices`` are the whole cloud's, and the
    block starts at point ``start``; close pairs are recomputed from them. Lengths are taken in units of each
    point's radius ``r``, so measurements are compared with ``epsilon`` directly, and each kept pair needs one
    logarithm, of ``s t / r^2``.
    """
    k = grams.shape[1]
    squared_radius = torch.diagonal(grams, dim1=1, dim2=2).amax(dim=1)
    unit = grams / squared_radius[:, None, None]
    squared_distances = torch.diagonal(unit, dim1=1, dim2=2).clone()
    r_i_squared = squared_distances[:, :, None]

    # a = r_i^2 + w - r_j^2 with w = v^2 or z^2 is 2 (O_ii -+ O_ij), and w = a + r_j^2 - r_i^2.
    twice = unit.mul_(2)
    a_direct = torch.sub(2 * r_i_squared, twice)
    a_reflected = twice.add_(2 * r_i_squared)
    spread = squared_distances[:, None, :] - r_i_squared
    v_squared = torch.add(a_direct, spread).clamp_min_(0)
    z_squared = spread.add_(a_reflected).clamp_min_(0)
    close = v_squared < CLOSE_PAIR_FRACTION
    close.diagonal(dim1=1, dim2=2).fill_(False)
    if bool(close.any()):
        _recompute_close_pairs(close, points / scale, indices, start, squared_radius, v_squared, a_direct)
    room = (1 - r_i_squared).clamp_min_(0)
    s = _tle_measurement(v_squared, a_direct, room)
    t = _tle_measurement(z_squared, a_reflected, room)

    off_diagonal = ~torch.eye(k, dtype=torch.bool, device=grams.device)
    pair_kept = (s >= epsilon).logical_and_(t >= epsilon).logical_and_(off_diagonal)
    measurement_sum = torch.log(s.mul_(t)).masked_fill_(~pair_kept, 0).sum(dim=(1, 2))
    n_dropped_pairs = k * (k - 1) - pair_kept.sum(dim=(1, 2))

    log_distances = 0.5 * torch.log(squared_distances)
    distance_kept = log_distances >= math.log(epsilon)
    distance_sum = torch.where(distance_kept, log_distances, 0).sum(dim=1)
    n_dropped_distances = (~distance_kept).sum(dim=1)

    n_terms = 2 * (k * k - n_dropped_pairs - n_dropped_distances)
    estimate = -n_terms / (measurement_sum + 2 * distance_sum)
    return torch.where(measurement_sum > -epsilon, 0, estimate)


def _recompute_close_pairs(
    close: Tensor,
    points: Tensor,
    indices: Tensor,
    start: int,
    squared_radius: Tensor,
    v_squared: Tensor,
    a_direct: Tensor,
) -> None:
    """Overwrite ``v_ij^2`` and ``a = 2 o_i . (x_i - x_j)`` of the ``close`` pairs with values from row differences.

    Both are written in units of the point's squared radius, the units :func:`_tle_block` works in.
    """
    point, i, j = close.nonzero(as_tuple=True)
    centre = points[start + point].to(torch.float64)
    first = points[indices[start + point, i]].to(torch.float64)
    second = points[indices[start + point, j]].to(torch.float64)
    difference = first - second
    unit = squared_radius[point]
    v_squared[point, i, j] = difference.square().sum(dim=1) / unit
    a_direct[point, i, j] = 2 * ((first - centre) * difference).sum(dim=1) / unit


def _tle_measurement(spread_squared: Tensor, a: Tensor, room: Tensor) -> Tensor:
    """Compute one TLE measurement in units of ``r``: ``(sqrt(a^2 + 4 w room) - a) / (2 room)``, ``w`` the spread.

    ``a = r_i^2 + w - r_j^2`` and ``room = 1 - r_i^2``, in units of ``r^2``. With ``q = sqrt(...) + |a|``, the
    measurement is ``2 w / q`` for ``a > 0`` (the numerator rationalised, so there is no cancellation and no special
    case when ``r_i = r``) and ``q / (2 room)`` for ``a <= 0``, where the sum has no cancellation and ``r_i < r``
    holds. Coincident points give 0/0; the NaN fails the epsilon test of the caller, which drops the pair.
    """
    q = torch.addcmul(a.square(), spread_squared, room, value=4).sqrt_().add_(a.abs())
    return torch.where(a > 0, (2 * spread_squared).div_(q), q.div_(2 * room))


def _mle(distances: Tensor) -> Tensor:
    """Levina–Bickel with scikit-dimension's default aggregation: ``(k - 1) / mean_i sum_j log(r_ik / r_ij)``."""
    distances = distances.to(torch.float64)
    k = distances.shape[1]
    log_sums = torch.log(distances[:, -1:] / distances).sum(dim=1)
    return (k - 1) / log_sums.mean()


def _twonn(nearest_two: Tensor, discard_fraction: float = TWONN_DISCARD_FRACTION) -> Tensor:
    """TwoNN by a least-squares line through the origin, from ``(n, 2)`` distances to the two nearest neighbours."""
    nearest_two = nearest_two.to(torch.float64)
    n = nearest_two.shape[0]
    n_kept = int(n * (1 - discard_fraction))
    if n_kept < 2:
        raise DegenerateInputError(f"{n} points leave {n_kept} ratios after the largest are discarded; 2 are needed")
    ratios, _ = torch.sort(nearest_two[:, 1] / nearest_two[:, 0])
    log_ratios = torch.log(ratios[:n_kept])
    empirical_cdf = torch.arange(1, n_kept + 1, dtype=torch.float64, device=nearest_two.device) / n
    log_survival = -torch.log1p(-empirical_cdf)
    denominator = log_ratios.square().sum()
    if denominator == 0:
        raise DegenerateInputError("every point's two nearest neighbours are at the same distance")
    return (log_ratios * log_survival).sum() / denominator


def _participation_ratio(finite: Tensor, n_nonfinite: int) -> Tensor:
    m = finite.shape[0]
    if m < 2:
        dropped = f" ({n_nonfinite} rows with NaN or infinity left out)" if n_nonfinite else ""
        raise DegenerateInputError(f"{m} finite rows{dropped}; a covariance needs at least 2")
    # The ratio does not change with scale, and rows divided by a power of two near their largest entry give a Gram
    # matrix that neither overflows nor underflows.
    gram = centred_gram(finite / power_of_two_scale(finite))
    trace = torch.diagonal(gram).sum()
    if trace == 0:
        raise DegenerateInputError(f"all {m} rows are identical, so the covariance is zero")
    return trace.square() / gram.square().sum()


def centred_gram(x: Tensor) -> Tensor:
    """Return the smaller Gram matrix of the centred cloud in float64: ``Z Z^T`` (m x m) if ``m < D``, else ``Z^T Z``.

    Both have the same non-zero eigenvalues, the squared singular values of ``Z``.
    """
    centred = x.to(torch.float64)
    centred = centred - centred.mean(dim=0)
    if centred.shape[0] < centred.shape[1]:
        return centred @ centred.T
    return centred.T @ centred


def _check_knn_k(k: int, method: str) -> None:
    if method in ("tle", "mle") and k < 2:
        raise ValueError(f"Expected `k` to be at least 2 for method={method!r}, got k = {k}.")
    if method == "twonn" and k < 2:
        raise ValueError(f"Expected neighbourhoods with at least 2 neighbours for method='twonn', got k = {k}.")
