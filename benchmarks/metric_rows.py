"""Rows of the side-by-side table for the metrics: pmg-torch and a reference on the same inputs, in one process.

Every function here takes the sizes and the device, runs the reference on the CPU in numpy float64 and pmg-torch
on the device, and returns table rows plus the targets they are measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

import pmg_torch as pmg
from benchmarks import references
from benchmarks.harness import Row, Target, max_differences, measure_matmul_rate, median_time, synchronizer
from benchmarks.inputs import class_clouds, linear_embedding, noisy_circle, wide_gaussian

#: Speed-ups and bounds the run reports as met or not met.
REFERENCE_CURVATURE_TARGET = 1000.0
TLE_TARGET = 10.0
SUITE_FLOOR_TARGET = 10.0

#: Tolerance within which the reference curvature must equal the numpy loop.
CURVATURE_TOLERANCE = 1e-9

#: Intrinsic dimension of the clouds the estimators are compared on.
LATENT_DIM = 10


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run. :data:`FULL` is the recorded run and :data:`QUICK` a smoke run."""

    ambient_dim: int
    k: int
    curvature_points: int
    curvature_loop_points: int
    curvature_published_points: int
    dimension_points: tuple[int, ...]
    circle_points: int
    holes_max_points: int
    volume_points: tuple[int, ...]
    suite_classes: int
    suite_per_class: int
    matmul_size: int
    repeats: int


FULL = Sizes(
    ambient_dim=512,
    k=20,
    curvature_points=500,
    curvature_loop_points=50,
    curvature_published_points=20,
    dimension_points=(1000, 2000),
    circle_points=2000,
    holes_max_points=300,
    volume_points=(1000, 200),
    suite_classes=10,
    suite_per_class=1000,
    matmul_size=2048,
    repeats=5,
)

QUICK = Sizes(
    ambient_dim=64,
    k=10,
    curvature_points=80,
    curvature_loop_points=8,
    curvature_published_points=4,
    dimension_points=(200,),
    circle_points=200,
    holes_max_points=60,
    volume_points=(120, 40),
    suite_classes=3,
    suite_per_class=100,
    matmul_size=1024,
    repeats=2,
)


def _to_device(x: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.from_numpy(x).to(device=device, dtype=dtype)


def curvature_rows(sizes: Sizes, device: torch.device) -> tuple[list[Row], list[Target]]:
    """Time ``curvature(method="reference")`` against per-point numpy loops of the published formula.

    Two loops are timed. The published one queries scikit-learn for the neighbours of every point and again for
    every neighbour of every point. The other finds all neighbours with one query first, which makes it faster and
    the comparison stricter. A loop's cost per point is constant, so it runs on the first few points and its time is
    scaled to all points, while the single query is timed over all points. Values are compared on those points,
    local value against local value.
    """
    n, k = sizes.curvature_points, sizes.k
    x = linear_embedding(n, LATENT_DIM, sizes.ambient_dim, seed=1)
    points = _to_device(x, device)
    ours_seconds, result = median_time(
        lambda: pmg.curvature(points, k=k, method="reference"), repeats=sizes.repeats, synchronize=synchronizer(device)
    )

    knn_seconds, table = median_time(lambda: references.neighbour_table(x, k), repeats=sizes.repeats)
    one_query = np.arange(sizes.curvature_loop_points)
    per_point = np.arange(sizes.curvature_published_points)
    # The loops run on one BLAS thread because their SVDs are too small (k x D) to gain from a thread pool. On the
    # 2-core machine of RESULTS.md one thread was about 25% faster than two, so the reference is timed at its best.
    with threadpool_limits(limits=1, user_api="blas"):
        loop_seconds, one_query_local = median_time(
            lambda: references.reference_local_curvature(x, table.__getitem__, one_query),
            repeats=max(1, sizes.repeats // 2),
        )
        published_seconds, published_local = median_time(
            lambda: references.reference_local_curvature(x, references.PerPointQuery(x, k), per_point),
            repeats=max(1, sizes.repeats // 2),
        )

    settings = f"n={n}, D={sizes.ambient_dim}, k={k}, float64, loops on 1 BLAS thread"
    one_query_row = _curvature_row(
        "curvature 'reference' vs loop after one kNN query",
        knn_seconds + loop_seconds * n / len(one_query),
        ours_seconds,
        result.local,
        one_query_local,
        f"{settings}; the query timed on all points, the loop on {len(one_query)} and scaled x{n / len(one_query):g}",
        device,
    )
    published_row = _curvature_row(
        "curvature 'reference' vs published loop",
        published_seconds * n / len(per_point),
        ours_seconds,
        result.local,
        published_local,
        f"{settings}; a kNN query per point and per neighbour; timed on {len(per_point)} points and scaled "
        f"x{n / len(per_point):g}",
        device,
    )
    targets = []
    for loop, row in (("published loop", published_row), ("one-query loop", one_query_row)):
        targets.append(_speed_up_target(f"reference curvature speed-up vs {loop}", row, REFERENCE_CURVATURE_TARGET))
        abs_diff = row.max_abs_diff if row.max_abs_diff is not None else math.inf
        targets.append(
            Target(
                f"reference curvature equals the {loop}",
                f"max abs diff <= {CURVATURE_TOLERANCE:.0e}",
                f"{abs_diff:.1e}",
                abs_diff <= CURVATURE_TOLERANCE,
            )
        )
    return [published_row, one_query_row], targets


def _curvature_row(
    name: str,
    reference_seconds: float,
    ours_seconds: float,
    ours_local: Tensor,
    reference_local: np.ndarray,
    note: str,
    device: torch.device,
) -> Row:
    """Return a row comparing our local values on the first ``len(reference_local)`` points with the loop's."""
    compared = ours_local[torch.arange(len(reference_local), device=device)]
    abs_diff, rel_diff = max_differences(compared, reference_local)
    return Row(name, reference_seconds, ours_seconds, abs_diff, rel_diff, note)


def _speed_up_target(name: str, row: Row, goal: float) -> Target:
    ratio = row.ratio or 0.0
    return Target(name, f">= {goal:,.0f}x", f"{ratio:,.0f}x", ratio >= goal)


def dimension_rows(sizes: Sizes, device: torch.device) -> tuple[list[Row], list[Target]]:
    """Time TLE, MLE and TwoNN against scikit-dimension's estimators on a 10-dimensional Gaussian in ``D`` dims.

    Both sides get float64 so that the values can agree to rounding. One more row per size gives pmg-torch the
    same points in float32, the dtype that embeddings usually have, against the same float64 reference.
    """
    rows: list[Row] = []
    targets: list[Target] = []
    for n in sizes.dimension_points:
        x = linear_embedding(n, LATENT_DIM, sizes.ambient_dim, seed=n)
        for method in ("tle", "mle", "twonn"):
            rows.append(_dimension_row(x, method, torch.float64, sizes, device))
        rows.append(_dimension_row(x, "tle", torch.float32, sizes, device))
        tle_ratio = rows[-4].ratio or 0.0
        targets.append(
            Target(
                f"TLE speed-up, n={n}, float64", f">= {TLE_TARGET:.0f}x", f"{tle_ratio:.1f}x", tle_ratio >= TLE_TARGET
            )
        )
    return rows, targets


def _dimension_row(x: np.ndarray, method: str, dtype: torch.dtype, sizes: Sizes, device: torch.device) -> Row:
    n = x.shape[0]
    reference_seconds, expected = median_time(
        lambda: references.skdim_dimension(method, x, sizes.k), repeats=sizes.repeats
    )
    points = _to_device(x, device, dtype)
    ours_seconds, estimate = median_time(
        lambda: pmg.intrinsic_dimension(points, method=method, k=sizes.k),
        repeats=sizes.repeats,
        synchronize=synchronizer(device),
    )
    abs_diff, rel_diff = max_differences([float(estimate)], [expected])
    dtype_name = str(dtype).removeprefix("torch.")
    note = (
        f"n={n}, D={sizes.ambient_dim}, k={sizes.k}, ours in {dtype_name}, true ID {LATENT_DIM}; "
        f"skdim {expected:.4f}, ours {float(estimate):.4f}"
    )
    name = f"intrinsic dimension {method}, n={n}, {dtype_name}"
    return Row(name, reference_seconds, ours_seconds, abs_diff, rel_diff, note)


def holes_rows(sizes: Sizes, device: torch.device) -> tuple[list[Row], list[Target]]:
    """Time :func:`pmg_torch.holes` against ``ripser.ripser`` on the same subsample of a noisy circle.

    The reference draws the subsample as ``holes`` documents it (a CPU ``torch.randperm`` seeded with ``seed``, the
    first ``max_points`` indices, sorted), so both sides see the same points.
    """
    x = noisy_circle(sizes.circle_points, sizes.ambient_dim, seed=2)
    seed = 0
    chosen = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[: sizes.holes_max_points]
    subsample = x[np.sort(chosen.numpy())]
    threshold = 0.1
    reference_seconds, expected = median_time(
        lambda: references.reference_holes(subsample, threshold), repeats=sizes.repeats
    )
    points = _to_device(x, device)
    ours_seconds, result = median_time(
        lambda: pmg.holes(points, threshold=threshold, max_points=sizes.holes_max_points, seed=seed),
        repeats=sizes.repeats,
        synchronize=synchronizer(device),
    )
    ours = [result.count, result.total_persistence, result.mean_persistence, result.density]
    abs_diff, rel_diff = max_differences(ours, list(expected))
    note = (
        f"{sizes.circle_points} points of a noisy circle in {sizes.ambient_dim}-D, subsample of "
        f"{sizes.holes_max_points}; compared: count, total, mean, density; {result.count} hole(s) vs {expected.n_holes}"
    )
    return [Row("holes (ripser, H1)", reference_seconds, ours_seconds, abs_diff, rel_diff, note)], []


def volume_rows(sizes: Sizes, device: torch.device) -> tuple[list[Row], list[Target]]:
    """Time :func:`pmg_torch.volume` against numpy's ``slogdet`` of the ``D x D`` matrix in float64."""
    return [_volume_row(wide_gaussian(m, sizes.ambient_dim, seed=m), sizes, device) for m in sizes.volume_points], []


def _volume_row(z: np.ndarray, sizes: Sizes, device: torch.device) -> Row:
    m = z.shape[0]
    reference_seconds, expected = median_time(lambda: references.reference_volume(z), repeats=sizes.repeats)
    published = references.published_volume(z)
    points = _to_device(z, device)
    ours_seconds, value = median_time(
        lambda: pmg.volume(points), repeats=sizes.repeats, synchronize=synchronizer(device)
    )
    abs_diff, rel_diff = max_differences([float(value.volume)], [expected])
    note = (
        f"m={m}, D={sizes.ambient_dim}, float64, standard deviation 2; volume {expected:.2f} bits; "
        f"the published det form gives {published:.4f}"
    )
    return Row(f"volume, m={m}", reference_seconds, ours_seconds, abs_diff, rel_diff, note)


def suite_floor_flops(per_class: int, ambient_dim: int, k: int, tangent_dims: list[int]) -> float:
    """Count the floating-point operations the default per-class suite cannot avoid, summed over classes.

    Per class of ``m`` points in ``D`` dimensions, with ``t`` the class's tangent dimension:

    * kNN distances, the product ``X X^T``: ``2 m^2 D``;
    * the ``k x k`` Gram matrix ``M_i M_i^T`` of each point's neighbours, for the tangent spaces and TLE:
      ``2 m k^2 D``;
    * volume's Gram or covariance matrix, ``Z_c^T Z_c`` or ``Z_c Z_c^T``: ``2 m D min(m, D)``;
    * the cosines ``T_a^T T_b`` of the principal angles. From entries of ``X X^T`` they cost
      ``W_a^T G W_b``, ``2 t k^2 + 2 t^2 k`` per neighbour pair, with no factor of ``D``, and there are at least
      ``m k / 2`` distinct pairs: ``m k^2 t (k + t)``.

    Eigen-decompositions of ``k x k`` matrices, the log-determinant and all element-wise work are left out, so this
    is a lower bound.
    """
    m, dim = per_class, ambient_dim
    total = 0.0
    for t in tangent_dims:
        knn = 2.0 * m * m * dim
        local_gram = 2.0 * m * k * k * dim
        volume_gram = 2.0 * m * dim * min(m, dim)
        principal_angles = m * k / 2 * (2.0 * t * k * k + 2.0 * t * t * k)
        total += knn + local_gram + volume_gram + principal_angles
    return total


def suite_rows(sizes: Sizes, device: torch.device) -> tuple[list[Row], list[Target]]:
    """Time ``analyze`` with its default metrics on float32 classes against the floor of :func:`suite_floor_flops`.

    The floor is that operation count divided by the float32 ``torch.mm`` rate measured in this run, on this device.
    """
    embeddings, labels = class_clouds(sizes.suite_classes, sizes.suite_per_class, sizes.ambient_dim, seed=3)
    rows_on_device = torch.from_numpy(embeddings).to(device)
    labels_tensor = torch.from_numpy(labels)
    # Two classes are enough to warm up every code path, and the whole suite is the slowest call of the run.
    warm_up = torch.from_numpy(labels < 2)
    pmg.analyze(rows_on_device[warm_up.to(device)], labels_tensor[warm_up], k=sizes.k)
    suite_seconds, report = median_time(
        lambda: pmg.analyze(rows_on_device, labels_tensor, k=sizes.k),
        repeats=max(1, sizes.repeats - 2),
        warmup=0,
        synchronize=synchronizer(device),
    )
    matmul_rate = measure_matmul_rate(device, sizes.matmul_size, sizes.repeats)
    tangent_dims = [
        _default_tangent_dim(report.values["intrinsic_dimension"][label], sizes) for label in report.classes
    ]
    flops = suite_floor_flops(sizes.suite_per_class, sizes.ambient_dim, sizes.k, tangent_dims)
    floor_seconds = flops / matmul_rate
    over_floor = suite_seconds / floor_seconds
    note = (
        f"{sizes.suite_classes} classes x {sizes.suite_per_class} x {sizes.ambient_dim} float32, metrics "
        f"{', '.join(report.metrics)}; floor {flops / 1e9:.2f} GFLOP at {matmul_rate / 1e9:.0f} GFLOP/s "
        f"({sizes.matmul_size}^2 float32 mm), tangent dims {sorted(set(tangent_dims))}; suite / floor {over_floor:.1f}"
    )
    row = Row("analyze, default metrics, vs FLOP floor", floor_seconds, suite_seconds, note=note)
    target = Target(
        "suite / floor", f"<= {SUITE_FLOOR_TARGET:.0f}", f"{over_floor:.1f}", over_floor <= SUITE_FLOOR_TARGET
    )
    return [row], [target]


def _default_tangent_dim(tle_estimate: float, sizes: Sizes) -> int:
    """Estimate the tangent dimension that curvature picks by default.

    The default is the rounded TLE estimate, clamped to ``[1, min(k - 1, D - 1)]``. It also clamps to the
    neighbourhoods' median numerical rank, which is ``k - 1`` for noisy data, so that clamp does not bind here.
    """
    rounded = math.floor(tle_estimate + 0.5) if math.isfinite(tle_estimate) else 1
    return max(1, min(rounded, sizes.k - 1, max(sizes.ambient_dim - 1, 1)))
