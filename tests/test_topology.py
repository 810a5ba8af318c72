"""Tests of pmg_torch.topology: holes counted from H1 persistence on shapes whose first Betti number is known."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from ripser import ripser

from pmg_torch import DegenerateInputWarning
from pmg_torch.topology import MAX_RIPSER_POINTS, HolesResult, holes


def circle(n: int, centre: tuple[float, float] = (0.0, 0.0), radius: float = 1.0) -> np.ndarray:
    angles = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.c_[centre[0] + radius * np.cos(angles), centre[1] + radius * np.sin(angles)]


def noisy_circle(n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    angles = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.c_[np.cos(angles), np.sin(angles)] + noise * rng.standard_normal((n, 2))


def filled_disc(n: int) -> np.ndarray:
    """Sunflower (Vogel spiral) layout: points spread evenly over the unit disc, with no gap that could form a hole."""
    index = np.arange(n) + 0.5
    radii = np.sqrt(index / n)
    angles = np.pi * (1.0 + np.sqrt(5.0)) * index
    return np.c_[radii * np.cos(angles), radii * np.sin(angles)]


def torus_grid(n_around: int, n_tube: int, major: float = 3.0, minor: float = 1.0) -> np.ndarray:
    around, tube = np.meshgrid(
        np.linspace(0.0, 2.0 * np.pi, n_around, endpoint=False), np.linspace(0.0, 2.0 * np.pi, n_tube, endpoint=False)
    )
    around, tube = around.ravel(), tube.ravel()
    ring = major + minor * np.cos(tube)
    return np.c_[ring * np.cos(around), ring * np.sin(around), minor * np.sin(tube)]


def ripser_reference(points: np.ndarray, threshold: float) -> tuple[int, float, float, float]:
    """Summarise ripser's own H1 diagram of ``points`` (distances by ripser, from the point cloud)."""
    diagram = ripser(points, maxdim=1)["dgms"][1]
    persistence = diagram[:, 1] - diagram[:, 0]
    kept = diagram[persistence > threshold]
    if len(kept) == 0:
        return 0, 0.0, 0.0, 0.0
    total = float(np.sum(kept[:, 1] - kept[:, 0]))
    return len(kept), total, total / len(kept), total / float(kept[:, 1].max() - kept[:, 0].min())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_circle_has_one_hole(seed: int) -> None:
    result = holes(torch.tensor(noisy_circle(100, noise=0.05, seed=seed)))
    assert result.count == 1
    assert result.total_persistence > 1.0


def test_two_separate_circles_have_two_holes() -> None:
    points = np.vstack([circle(60), circle(60, centre=(4.0, 0.0), radius=1.5)])
    assert holes(torch.tensor(points)).count == 2


def test_figure_eight_has_two_holes() -> None:
    # Two unit circles that touch at the origin.
    points = np.vstack([circle(60, centre=(-1.0, 0.0)), circle(60, centre=(1.0, 0.0))[1:]])
    assert holes(torch.tensor(points)).count == 2


def test_filled_disc_has_no_hole() -> None:
    result = holes(torch.tensor(filled_disc(400)))
    assert result.count == 0
    assert result.total_persistence == 0.0
    assert result.diagram.shape[0] > 0


def test_torus_has_two_dominant_bars() -> None:
    result = holes(torch.tensor(torus_grid(30, 10)), threshold=0.8)
    persistence = np.sort(result.diagram[:, 1] - result.diagram[:, 0])[::-1]
    assert result.count == 2
    # The tube circle (radius 1) and the ring (radius 3) stand well clear of every grid artefact.
    assert persistence[1] > 2.5 * persistence[2]


@pytest.mark.parametrize(
    "points",
    [
        np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3.0) / 2.0]]),
        np.random.default_rng(0).normal(scale=1e-6, size=(11, 5)) + 3.0,
    ],
    ids=["equilateral_triangle", "eleven_clustered_points"],
)
def test_holeless_small_inputs_give_zeros(points: np.ndarray) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = holes(torch.tensor(points))
    assert result == HolesResult(0, 0.0, 0.0, 0.0, result.diagram)
    assert isinstance(result.count, int)


@pytest.mark.parametrize("n_distinct", [1, 2])
def test_under_three_points_give_zeros(n_distinct: int) -> None:
    points = torch.arange(n_distinct, dtype=torch.float64)[:, None].repeat(4, 3)
    result = holes(points)
    assert result[:4] == (0, 0.0, 0.0, 0.0)
    assert result.diagram.shape == (0, 2)


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.1, 0.5])
def test_summary_matches_ripser(threshold: float) -> None:
    points = np.vstack([noisy_circle(80, noise=0.1, seed=3), circle(40, centre=(3.0, 0.0), radius=0.5)])
    result = holes(torch.tensor(points), threshold=threshold)
    count, total, mean, density = ripser_reference(points, threshold)
    assert result.count == count
    assert result.total_persistence == pytest.approx(total, rel=1e-5)
    assert result.mean_persistence == pytest.approx(mean, rel=1e-5)
    assert result.density == pytest.approx(density, rel=1e-5)


def test_diagram_holds_every_h1_bar() -> None:
    points = noisy_circle(80, noise=0.1, seed=4)
    expected = ripser(points, maxdim=1)["dgms"][1]
    diagram = holes(torch.tensor(points)).diagram
    order = np.lexsort(diagram.T)
    expected_order = np.lexsort(expected.T)
    np.testing.assert_allclose(diagram[order], expected[expected_order], rtol=1e-5, atol=1e-6)


def test_density_divides_total_by_span_of_kept_bars() -> None:
    points = np.vstack([circle(40), circle(40, centre=(5.0, 0.0), radius=2.0)])
    result = holes(torch.tensor(points))
    persistence = result.diagram[:, 1] - result.diagram[:, 0]
    kept = result.diagram[persistence > 0.1]
    assert result.count == 2
    assert result.density == pytest.approx(result.total_persistence / (kept[:, 1].max() - kept[:, 0].min()))


def test_duplicate_rows_do_not_change_result() -> None:
    points = torch.tensor(noisy_circle(60, noise=0.05, seed=5))
    doubled = torch.cat([points, points[:20]])
    assert holes(doubled)[:4] == holes(points)[:4]


def test_nonfinite_rows_are_left_out_with_warning() -> None:
    points = torch.tensor(noisy_circle(60, noise=0.05, seed=6))
    corrupted = torch.cat([points, torch.tensor([[float("nan"), 0.0], [float("inf"), 1.0]], dtype=torch.float64)])
    with pytest.warns(
        DegenerateInputWarning,
        match="holes left out 2 rows with NaN or infinity, and was computed from the remaining 60 rows",
    ) as record:
        result = holes(corrupted)
    assert len(record) == 1
    assert result[:4] == holes(points)[:4]


def test_subsample_is_seeded_and_capped() -> None:
    points = torch.tensor(noisy_circle(300, noise=0.05, seed=7))
    first = holes(points, max_points=100, seed=1)
    second = holes(points, max_points=100, seed=1)
    np.testing.assert_array_equal(first.diagram, second.diagram)
    # At most 100 points give at most 100 * 99 / 2 edges, and the H1 bars of 100 points are far fewer than of 300.
    assert first.diagram.shape[0] < holes(points, max_points=None).diagram.shape[0]
    assert first.count == 1


def test_cap_at_point_count_changes_nothing() -> None:
    points = torch.tensor(noisy_circle(120, noise=0.05, seed=8))
    capped = holes(points, max_points=120, seed=3)
    uncapped = holes(points, max_points=None)
    np.testing.assert_array_equal(capped.diagram, uncapped.diagram)


def test_default_cap_is_max_ripser_points() -> None:
    assert inspect.signature(holes).parameters["max_points"].default == MAX_RIPSER_POINTS == 500


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_input_counts_same_holes(dtype: torch.dtype) -> None:
    points = torch.tensor(np.vstack([circle(50), circle(50, centre=(4.0, 0.0))]))
    reference = holes(points)
    result = holes(points.to(dtype))
    assert result.count == reference.count == 2
    assert result.total_persistence == pytest.approx(reference.total_persistence, rel=2e-2)


def test_input_is_not_modified() -> None:
    points = torch.tensor(noisy_circle(50, noise=0.05, seed=10), requires_grad=True)
    before = points.detach().clone()
    holes(points)
    assert torch.equal(points.detach(), before)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"threshold": -0.1}, ValueError, "threshold"),
        ({"threshold": float("nan")}, ValueError, "threshold"),
        ({"max_points": 2}, ValueError, "max_points"),
        ({"max_points": 0}, ValueError, "max_points"),
        ({"max_points": 10.0}, TypeError, "max_points"),
        ({"seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        holes(torch.zeros(5, 2), **kwargs)


def test_bad_cloud_raises() -> None:
    with pytest.raises(TypeError, match="torch.Tensor"):
        holes(np.zeros((5, 2)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        holes(torch.zeros(5))


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1e300, 1e-300])
def test_circle_at_extreme_scale_keeps_its_hole(scale: float) -> None:
    # Distances near 1e200 overflow float32, and distances near 1e-200 round to 0 in it.
    points = circle(40)
    reference = holes(torch.tensor(points), threshold=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = holes(torch.tensor(points) * scale, threshold=0.5 * scale)
    assert result.count == reference.count == 1
    assert result.total_persistence / scale == pytest.approx(reference.total_persistence, rel=1e-6)
    assert result.mean_persistence / scale == pytest.approx(reference.mean_persistence, rel=1e-6)
    assert result.density == pytest.approx(reference.density, rel=1e-6)
    np.testing.assert_allclose(result.diagram / scale, reference.diagram, rtol=1e-6)


@pytest.mark.parametrize("exponent", [600, -600])
def test_power_of_two_scales_diagram_exactly(exponent: int) -> None:
    points = torch.tensor(noisy_circle(60, noise=0.05, seed=11))
    scale = 2.0**exponent
    result = holes(points * scale, threshold=0.1 * scale)
    reference = holes(points, threshold=0.1)
    np.testing.assert_array_equal(result.diagram, reference.diagram * scale)
    assert result.count == reference.count == 1


def test_extreme_threshold_uses_data_units() -> None:
    scale = 1e200
    persistence = holes(torch.tensor(circle(40))).total_persistence
    points = torch.tensor(circle(40)) * scale
    assert holes(points, threshold=0.99 * persistence * scale).count == 1
    assert holes(points, threshold=1.01 * persistence * scale).count == 0
