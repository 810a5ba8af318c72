"""Argument checks and the degenerate-input policy shared by every metric.

Two kinds of problem are kept apart:

* a bad argument (wrong type, wrong shape, ``k < 1``, an unknown method) is the caller's mistake and raises
  ``TypeError`` or ``ValueError`` with what was expected and what came;
* degenerate data (too few rows, all rows identical, a failed decomposition) is a fact about one class at one
  epoch. Metric code raises :class:`DegenerateInputError` internally, and the public entry points turn it into NaN
  plus one :class:`DegenerateInputWarning` that names the metric, the class where known, and the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


class DegenerateInputWarning(UserWarning):
    """Warning issued when a metric returns NaN for degenerate data, or leaves rows out before it computes."""


class DegenerateInputError(Exception):
    """Raised inside metric code when the data, not the arguments, make a metric undefined.

    Public functions catch it and return NaN with a :class:`DegenerateInputWarning`; it never reaches the user.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_cloud(x: Any, name: str = "x") -> Tensor:
    """Check that ``x`` is a floating-point tensor of shape ``(m, D)`` with ``m, D >= 1`` and return it detached.

    Raises:
        TypeError: if ``x`` is not a tensor, or not of a floating-point dtype.
        ValueError: if ``x`` is not two-dimensional or has no rows or no columns.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor of shape (m, D), got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"Expected `{name}` to have a floating-point dtype, got {x.dtype}. Convert it with `{name}.float()`."
        )
    if x.ndim != 2:
        raise ValueError(f"Expected `{name}` of shape (m, D), got a {x.ndim}-D tensor of shape {tuple(x.shape)}.")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"Expected `{name}` with at least one row and one column, got shape {tuple(x.shape)}.")
    return x.detach()


def check_positive_int(value: Any, name: str) -> int:
    """Check that ``value`` is an ``int`` of at least 1 (``bool`` is rejected) and return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Expected `{name}` to be an int, got {type(value).__name__} ({value!r}).")
    if value < 1:
        raise ValueError(f"Expected `{name}` to be at least 1, got {value}.")
    return value


def check_positive_float(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """Check that ``value`` is a finite real number above zero (or at least zero) and return it as ``float``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a number, got {type(value).__name__} ({value!r}).")
    value = float(value)
    bound_ok = value >= 0 if allow_zero else value > 0
    if not (bound_ok and value < float("inf")):
        expected = "a finite number >= 0" if allow_zero else "a finite number > 0"
        raise ValueError(f"Expected `{name}` to be {expected}, got {value}.")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """Check that ``value`` is one of ``choices`` and return it."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"Expected `{name}` to be one of {list(choices)}, got {value!r}.")
    return value


def working_dtype(x: Tensor) -> torch.dtype:
    """Return the dtype metric code computes in: float64 stays float64, everything else becomes float32.

    Half and bfloat16 inputs are upcast because their 8- or 11-bit mantissas make distance and covariance sums
    meaningless at the dimensions embeddings have.
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def drop_nonfinite_rows(x: Tensor) -> tuple[Tensor, int]:
    """Return the rows of ``x`` whose entries are all finite, and how many rows were left out."""
    # A NaN or infinite entry makes its row's sum NaN or infinite, so finite sums settle the common case in one pass.
    if bool(torch.isfinite(x.sum(dim=1)).all()):
        return x, 0
    finite = torch.isfinite(x).all(dim=1)
    n_dropped = int(x.shape[0] - finite.sum())
    if n_dropped == 0:
        return x, 0
    return x[finite], n_dropped


def power_of_two_scale(x: Tensor) -> Tensor:
    """Return the largest power of two not above ``max |x|`` (0.5 when every entry is 0), as a 0-d tensor.

    ``x`` must be non-empty and finite. Dividing by the scale brings the largest magnitude into ``[1, 2)``, so
    squares and products of the result neither overflow nor underflow for any finite ``x``. The division is exact
    except for entries it takes below the dtype's smallest normal number, so at ordinary magnitudes it changes no bits.
    """
    smallest, largest = torch.aminmax(x)
    magnitude = torch.maximum(largest, -smallest)
    _, exponent = torch.frexp(magnitude)
    return torch.ldexp(torch.ones_like(magnitude), exponent - 1)


def describe(metric: str, label: Any = None) -> str:
    """Return ``"curvature"`` or ``"curvature of class 3"`` for messages."""
    return metric if label is None else f"{metric} of class {label}"


def warn_degenerate(metric: str, reason: str, label: Any = None, stacklevel: int = 3) -> None:
    """Issue the one warning that goes with a NaN result."""
    warnings.warn(f"{describe(metric, label)} is NaN: {reason}", DegenerateInputWarning, stacklevel=stacklevel)


def warn_dropped_rows(metric: str, n_nonfinite: int, n_duplicates: int, n_used: int, stacklevel: int = 3) -> None:
    """Issue one warning when rows were left out of a metric that still has a value; do nothing otherwise."""
    removed = []
    if n_nonfinite:
        removed.append(f"{n_nonfinite} rows with NaN or infinity")
    if n_duplicates:
        removed.append(f"{n_duplicates} duplicate rows")
    if not removed:
        return
    warnings.warn(
        f"{metric} left out {' and '.join(removed)}, and was computed from the remaining {n_used} rows.",
        DegenerateInputWarning,
        stacklevel=stacklevel,
    )


def nan_on_degenerate(metric: str, compute: Callable[[], T], nan_result: Callable[[], T], label: Any = None) -> T:
    """Run ``compute``; if it raises :class:`DegenerateInputError`, warn once and return ``nan_result()``."""
    try:
        return compute()
    except DegenerateInputError as error:
        warn_degenerate(metric, error.reason, label, stacklevel=4)
        return nan_result()


def nan_scalar(x: Tensor) -> Tensor:
    """Return a 0-d NaN tensor in the working dtype of ``x``, on its device."""
    return torch.tensor(float("nan"), dtype=working_dtype(x), device=x.device)
