"""Timing, the matrix-multiply rate and the printed tables shared by every benchmark section."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass
class Row:
    """One line of the side-by-side table: the same work done by a reference and by pmg-torch.

    Times are medians in seconds. The differences compare the values both sides returned, so ``None`` means the
    row compares times only.
    """

    name: str
    reference_s: float | None
    ours_s: float | None
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        """Reference time over our time: above 1 means pmg-torch is faster."""
        if self.reference_s is None or self.ours_s is None or self.ours_s <= 0:
            return None
        return self.reference_s / self.ours_s


@dataclass
class Target:
    """A goal the run is measured against, with the measured value and whether it was met (``None``: not measured)."""

    name: str
    goal: str
    measured: str
    met: bool | None


@dataclass
class MemoryRow:
    """A memory measurement next to the size expected from the algorithm (a bound, or an analytic estimate)."""

    name: str
    measured_bytes: float | None
    expected_bytes: float | None
    method: str


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Return a function that waits for queued kernels on ``device``, so that timings cover the work itself."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def median_time(
    run: Callable[[], T], *, repeats: int, warmup: int = 1, synchronize: Callable[[], None] = lambda: None
) -> tuple[float, T]:
    """Time ``run`` with ``time.perf_counter`` after ``warmup`` untimed calls.

    Returns:
        The median time in seconds and the result of the last call.
    """
    result = None
    for _ in range(warmup):
        result = run()
        synchronize()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result  # type: ignore[return-value]


def measure_matmul_rate(device: torch.device, size: int, repeats: int) -> float:
    """Return the float32 ``torch.mm`` rate on ``device`` in floating-point operations per second.

    A square product of side ``size`` costs ``2 * size**3`` operations (one multiply and one add per term).
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device)
    b = torch.randn(size, size, generator=generator).to(device)
    seconds, _ = median_time(lambda: torch.mm(a, b), repeats=repeats, synchronize=synchronizer(device))
    return 2.0 * size**3 / seconds


def max_differences(ours: Sequence[float] | Any, reference: Sequence[float] | Any) -> tuple[float, float]:
    """Return the largest absolute and relative difference between two equally long sequences of numbers.

    The relative difference divides by ``|reference|``. Where the reference is exactly zero the absolute difference
    is used instead, so two zeros compare as equal rather than as NaN.
    """
    ours_values = torch.as_tensor(ours, dtype=torch.float64).flatten().cpu()
    reference_values = torch.as_tensor(reference, dtype=torch.float64).flatten().cpu()
    if ours_values.shape != reference_values.shape:
        raise ValueError(
            f"Expected equally many values on both sides, got {ours_values.numel()} and {reference_values.numel()}."
        )
    absolute = (ours_values - reference_values).abs()
    scale = reference_values.abs()
    relative = torch.where(scale > 0, absolute / scale.clamp_min(torch.finfo(torch.float64).tiny), absolute)
    return float(absolute.max()), float(relative.max())


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1.0:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def format_ratio(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{ratio:,.0f}x" if ratio >= 100 else f"{ratio:.2f}x"


def format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def format_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:,.2f} MiB"


def render_table(headers: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Return a Markdown table whose columns are padded to line up in a terminal too."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *lines, strict=True)]

    def render_line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    rule = "| " + " | ".join("-" * width for width in widths) + " |"
    return "\n".join([render_line(headers), rule, *(render_line(line) for line in lines)])


def render_rows(rows: Sequence[Row]) -> str:
    headers = ["row", "reference", "ours", "reference / ours", "max abs diff", "max rel diff", "note"]
    lines = [
        [
            row.name,
            format_seconds(row.reference_s),
            format_seconds(row.ours_s),
            format_ratio(row.ratio),
            format_number(row.max_abs_diff),
            format_number(row.max_rel_diff),
            row.note,
        ]
        for row in rows
    ]
    return render_table(headers, lines)


def render_targets(targets: Sequence[Target]) -> str:
    verdicts = {True: "met", False: "NOT met", None: "not measured"}
    lines = [[target.name, target.goal, target.measured, verdicts[target.met]] for target in targets]
    return render_table(["target", "goal", "measured", "verdict"], lines)


def render_memory(rows: Sequence[MemoryRow]) -> str:
    lines = []
    for row in rows:
        ratio = "-"
        if row.measured_bytes is not None and row.expected_bytes:
            ratio = f"{row.measured_bytes / row.expected_bytes:.3f}"
        lines.append([row.name, format_bytes(row.measured_bytes), format_bytes(row.expected_bytes), ratio, row.method])
    return render_table(["memory", "measured", "expected", "measured / expected", "method"], lines)
