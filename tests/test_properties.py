"""Properties that hold for every input: metrics ignore row order, and ``analyze`` never raises on finite data.

Hypothesis draws the inputs. The runs are derandomised and keep no example database, so CI sees the same examples
on every run, and ``max_examples`` keeps the module well under a minute on two cores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor

import pmg_torch as pmg
from pmg_torch import DegenerateInputWarning

PROPERTY_SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

K = 4

#: Metrics that must not depend on the order of the rows, each returning one float.
ORDER_FREE: dict[str, Callable[[Tensor, Tensor], Any]] = {
    "curvature": lambda x, other: pmg.curvature(x, k=K).overall,
    "curvature_reference": lambda x, other: pmg.curvature(x, k=K, method="reference").overall,
    "volume": lambda x, other: pmg.volume(x).volume,
    "tle": lambda x, other: pmg.intrinsic_dimension(x, "tle", k=K),
    "mle": lambda x, other: pmg.intrinsic_dimension(x, "mle", k=K),
    "twonn": lambda x, other: pmg.intrinsic_dimension(x, "twonn", k=K),
    "participation_ratio": lambda x, other: pmg.participation_ratio(x),
    "holes": lambda x, other: pmg.holes(x, threshold=0.05).total_persistence,
    "shape_similarity": lambda x, other: pmg.shape_similarity(x, other),
}


@st.composite
def clouds_in_general_position(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor]:
    """A Gaussian cloud with distinct axis lengths, some exact duplicate and non-finite rows, and a permutation.

    The rows come from a seeded generator rather than from Hypothesis's floats, because those favour repeated values
    such as 0.0 and 1.0, whose tied neighbour distances make the neighbour sets themselves depend on the row order.
    Exact duplicates do not: they are removed before any neighbour search.
    """
    n_distinct = draw(st.integers(K + 2, 40))
    width = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = 10.0 ** draw(st.integers(-3, 3))
    n_duplicates = draw(st.integers(0, 5))
    n_nonfinite = draw(st.integers(0, 3))
    generator = torch.Generator().manual_seed(seed)
    axes = torch.linspace(3.0, 1.0, width, dtype=torch.float64)
    distinct = torch.randn(n_distinct, width, generator=generator, dtype=torch.float64) * axes * scale
    duplicates = distinct[torch.randint(n_distinct, (n_duplicates,), generator=generator)]
    nonfinite = torch.full((n_nonfinite, width), float("nan"), dtype=torch.float64)
    nonfinite[:, 0] = float("inf")
    x = torch.cat([distinct, duplicates, nonfinite])
    other = torch.randn(n_distinct, width, generator=generator, dtype=torch.float64) * axes.flip(0)
    return x, torch.randperm(x.shape[0], generator=generator), other


@settings(PROPERTY_SETTINGS, max_examples=60)
@given(clouds_in_general_position())
def test_metrics_ignore_row_order(case: tuple[Tensor, Tensor, Tensor]) -> None:
    x, permutation, other = case
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateInputWarning)
        for name, call in ORDER_FREE.items():
            original = float(call(x, other))
            permuted = float(call(x[permutation], other))
            if math.isnan(original):
                assert math.isnan(permuted), name
            else:
                # Summation order and LAPACK's rounding differ with the row order, and angles from square roots of
                # small eigenvalues carry about sqrt(eps) of it, so 1e-6 leaves room for rounding only.
                assert math.isclose(permuted, original, rel_tol=1e-6, abs_tol=1e-9), (name, original, permuted)


# -- analyze on anything finite -------------------------------------------------------------------------------------


def finite_elements(dtype: np.dtype) -> st.SearchStrategy[float]:
    info = np.finfo(dtype)
    bound = float(info.max) if dtype != np.float64 else 1e300
    return st.floats(-bound, bound, allow_nan=False, allow_infinity=False, width=info.bits)


@st.composite
def labelled_rows(draw: st.DrawFn) -> tuple[Tensor, Tensor, int]:
    m = draw(st.integers(1, 24))
    width = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    rows = draw(arrays(dtype, (m, width), elements=finite_elements(np.dtype(dtype))))
    labels = draw(arrays(np.int64, (m,), elements=st.integers(-(2**40), 2**40) | st.integers(0, 3)))
    k = draw(st.integers(2, 6))
    return torch.from_numpy(rows), torch.from_numpy(labels), k


def metrics_named(message: str, label: int) -> list[str]:
    head, found, _ = message.partition(f" of class {label} ")
    return head.split(", ") if found else []


@settings(PROPERTY_SETTINGS, max_examples=200)
@given(labelled_rows())
def test_analyze_never_raises_on_finite_rows(case: tuple[Tensor, Tensor, int]) -> None:
    rows, labels, k = case
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = pmg.analyze(rows, labels, k=k, metrics="all", n_projections=2, holes_max_points=20)
    messages = [str(w.message) for w in caught if issubclass(w.category, DegenerateInputWarning)]

    assert report.classes == sorted(set(labels.tolist()))
    assert sum(report.n_samples.values()) == rows.shape[0]
    for metric, per_class in report.values.items():
        assert set(per_class) == set(report.classes), metric
        for label, value in per_class.items():
            assert isinstance(value, float), (metric, label)
            if math.isnan(value):
                naming = [message for message in messages if metric in metrics_named(message, label)]
                assert len(naming) == 1, (metric, label, messages)
