"""Tests for the exact kNN search and the cleaning that kNN estimators rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from pmg_torch import Neighbourhoods, knn, neighbourhoods, remove_duplicate_rows
from pmg_torch import neighbours as neighbours_module
from pmg_torch._validation import DegenerateInputError
from pmg_torch.neighbours import neighbour_offset_grams, neighbour_pairs


def sklearn_neighbours(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's k nearest other points (a fitted set queried without X leaves each point out)."""
    return NearestNeighbors(n_neighbors=k).fit(points).kneighbors()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim", [3, 64])
def test_knn_equals_sklearn(dtype, dim):
    points = np.random.default_rng(0).normal(size=(300, dim))
    expected_distances, expected_indices = sklearn_neighbours(points, 15)

    distances, indices = knn(torch.from_numpy(points).to(dtype), 15)

    assert distances.dtype == dtype
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=rtol)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 300, 1000])
def test_chunk_size_does_not_change_neighbours(chunk_size):
    points = torch.randn(300, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected_distances, expected_indices = knn(points, 8)

    distances, indices = knn(points, 8, chunk_size=chunk_size)

    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(distances, expected_distances, rtol=0, atol=0)


def test_point_is_excluded_by_index_not_by_rank():
    # Rows 0, 1 and 2 are the same point: each must find the other two at distance 0, and never itself.
    points = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [4.0, 0.0], [0.0, 5.0]], dtype=torch.float64)

    distances, indices = knn(points, 2)

    rows = torch.arange(5)[:, None]
    assert not (indices == rows).any()
    assert set(indices[0].tolist()) == {1, 2}
    assert set(indices[1].tolist()) == {0, 2}
    assert set(indices[2].tolist()) == {0, 1}
    torch.testing.assert_close(distances[:3], torch.zeros(3, 2, dtype=torch.float64), rtol=0, atol=0)


def test_distances_are_exact_far_from_the_origin():
    # Here |a|^2 + |b|^2 - 2ab on the raw rows cancels every digit of the squared distances: the ranking must use
    # centred rows to pick the right neighbours, and the distances must be recomputed from the differences.
    generator = torch.Generator().manual_seed(2)
    points = 1e4 + 1e-3 * torch.randn(50, 4, generator=generator, dtype=torch.float64)

    distances, indices = knn(points, 3)

    direct = torch.linalg.vector_norm(points[:, None, :] - points[indices], dim=2)
    torch.testing.assert_close(distances, direct, rtol=1e-14, atol=0)
    expected_distances, _ = sklearn_neighbours(points.numpy(), 3)
    np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=1e-9)


def test_float32_distances_are_the_bits_of_direct_differences():
    # 400 rows of 300 columns span several of the cache-sized blocks in which the distances are recomputed.
    points = 3.0 + torch.randn(400, 300, generator=torch.Generator().manual_seed(8))

    distances, indices = knn(points, 12)

    direct = torch.linalg.vector_norm(points[:, None, :] - points[indices], dim=2)
    torch.testing.assert_close(distances, direct, rtol=0, atol=0)


def test_distances_are_sorted_ascending():
    points = torch.randn(100, 5, generator=torch.Generator().manual_seed(3))

    distances, _ = knn(points, 10)

    assert (distances[:, 1:] >= distances[:, :-1]).all()


def test_half_precision_input_is_searched_in_float32():
    points = torch.randn(80, 6, generator=torch.Generator().manual_seed(4)).half()

    distances, indices = knn(points, 5)

    assert distances.dtype == torch.float32
    expected_distances, expected_indices = knn(points.float(), 5)
    torch.testing.assert_close(indices, expected_indices, rtol=0, atol=0)
    torch.testing.assert_close(distances, expected_distances, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("k", "error", "message"),
    [(10, ValueError, "at most m - 1 = 9"), (0, ValueError, "at least 1"), (True, TypeError, "int")],
)
def test_bad_k_raises(k, error, message):
    with pytest.raises(error, match=message):
        knn(torch.randn(10, 3), k)


def test_remove_duplicate_rows_keeps_first_appearance_order():
    points = torch.tensor([[3.0, 0.0], [1.0, 1.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0], [3.0, 0.0]])

    distinct, n_removed = remove_duplicate_rows(points)

    torch.testing.assert_close(distinct, torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]]), rtol=0, atol=0)
    assert n_removed == 3


def test_remove_duplicate_rows_returns_distinct_input_unchanged():
    points = torch.randn(20, 3, generator=torch.Generator().manual_seed(5))

    distinct, n_removed = remove_duplicate_rows(points)

    assert n_removed == 0
    torch.testing.assert_close(distinct, points, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_duplicate_check_permuted_and_signed_zero_rows(dtype):
    # Permuted entries give equal sums of bits and must still be kept; -0.0 equals 0.0, so that row is a repeat.
    points = torch.tensor([[1.0, 2.0], [2.0, 1.0], [0.0, 3.0], [-0.0, 3.0], [5.0, 5.0]], dtype=dtype)

    distinct, n_removed = remove_duplicate_rows(points)

    assert n_removed == 1
    torch.testing.assert_close(distinct, points[[0, 1, 2, 4]], rtol=0, atol=0)


def test_neighbourhoods_drop_nonfinite_rows_then_duplicates():
    generator = torch.Generator().manual_seed(6)
    base = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    points = torch.cat([base[:10], base[:3], torch.full((2, 4), float("nan")), base[10:], base[[5]]])
    points[12, 0] = float("inf")  # one of the repeated rows is also non-finite

    nb = neighbourhoods(points, 5)

    assert isinstance(nb, Neighbourhoods)
    assert nb.n_nonfinite == 3
    assert nb.n_duplicates == 3
    torch.testing.assert_close(nb.points, base, rtol=0, atol=0)
    assert nb.k == 5
    expected_distances, expected_indices = knn(base, 5)
    torch.testing.assert_close(nb.indices, expected_indices, rtol=0, atol=0)
    # The search took the Gram matrix route, whose distances are within rounding of the direct ones.
    torch.testing.assert_close(nb.distances, expected_distances, rtol=1e-13, atol=0)


def test_neighbourhoods_too_few_rows_raise():
    points = torch.cat([torch.ones(8, 3), torch.zeros(1, 3), torch.full((2, 3), float("nan"))])

    with pytest.raises(DegenerateInputError, match=r"2 distinct finite rows") as raised:
        neighbourhoods(points, 4)

    assert "7 duplicate rows removed" in raised.value.reason
    assert "2 non-finite rows removed" in raised.value.reason
    assert "k + 1 = 5" in raised.value.reason


# -- the search through the cloud's Gram matrix -------------------------------------------------------------------


def direct_offset_grams(nb: Neighbourhoods) -> np.ndarray:
    """Per-point numpy float64 loop: the Gram matrix of each point's neighbour offsets."""
    rows = nb.points.double().numpy()
    return np.stack([(rows[nb.indices[i]] - rows[i]) @ (rows[nb.indices[i]] - rows[i]).T for i in range(len(rows))])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gram_search_equals_sklearn_and_keeps_the_gram(dtype):
    points = np.random.default_rng(10).normal(size=(400, 128))
    expected_distances, expected_indices = sklearn_neighbours(points, 12)

    nb = neighbourhoods(torch.from_numpy(points).to(dtype), 12)

    assert nb.gram is not None
    assert nb.gram.shape == (400, 400)
    assert nb.gram.dtype == torch.float64
    np.testing.assert_array_equal(nb.indices.numpy(), expected_indices)
    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    np.testing.assert_allclose(nb.distances.numpy(), expected_distances, rtol=rtol)
    centred = nb.points.double() - nb.points.double().mean(dim=0)
    torch.testing.assert_close(nb.gram * nb.gram_scale**2, centred @ centred.T, rtol=1e-13, atol=1e-12)


def test_gram_search_recomputes_narrow_neighbourhoods_from_differences():
    # Rows 1e4 from the mean with neighbours 1e-3 apart: the Gram matrix's rounding exceeds the tolerance, so the
    # distances and offset Gram matrices must come from the differences of the rows, as in knn.
    generator = torch.Generator().manual_seed(11)
    points = torch.cat(
        [
            1e4 + 1e-3 * torch.randn(60, 4, generator=generator, dtype=torch.float64),
            -1e4 * torch.ones(1, 4, dtype=torch.float64),
        ]
    )

    nb = neighbourhoods(points, 3)

    direct = torch.linalg.vector_norm(nb.points[:60, None, :] - nb.points[nb.indices[:60]], dim=2)
    torch.testing.assert_close(nb.distances[:60], direct, rtol=1e-14, atol=0)
    np.testing.assert_allclose(neighbour_offset_grams(nb).numpy(), direct_offset_grams(nb), rtol=1e-12, atol=1e-20)


def test_near_duplicate_neighbours_use_offsets():
    # TLE recomputes close pairs from row differences and relies on the other entries being rounded relative to the
    # neighbourhood's radius, which the Gram matrix does not give when two neighbours are 1e-9 apart.
    rng = np.random.default_rng(12)
    base = rng.normal(size=(80, 6))
    points = torch.from_numpy(np.concatenate([base, base[:10] + 1e-9 * rng.normal(size=(10, 6))]))
    nb = neighbourhoods(points, 8)
    assert nb.gram is not None and nb.gram_scale is not None

    _, redo = neighbours_module._offset_grams_from_gram(nb.gram, nb.indices, 0, 6)

    rows = points.numpy()
    twins = {i for i in range(90) for j in range(90) if i != j and np.abs(rows[i] - rows[j]).max() < 1e-6}
    near_twins = {i for i in range(90) if len(twins & set(nb.indices[i].tolist())) >= 2}
    assert near_twins and near_twins <= set(redo.tolist())
    spread = neighbourhoods(torch.from_numpy(base), 8)
    assert spread.gram is not None and spread.gram_scale is not None
    _, none = neighbours_module._offset_grams_from_gram(spread.gram, spread.indices, 0, 6)
    assert none.numel() == 0


@pytest.mark.parametrize("magnitude", [1e-200, 1.0, 1e200])
def test_scaled_offset_grams_stay_finite_at_any_magnitude(magnitude):
    unit = torch.randn(50, 5, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    reference = neighbourhoods(unit, 6)
    nb = neighbourhoods(unit * magnitude, 6)

    scaled = neighbour_offset_grams(nb, scaled=True)

    # Both clouds are divided by a power of two near their largest entry, so the scaled matrices agree up to the
    # rounding of the multiplication by the magnitude.
    relative_scale = neighbours_module.search_scale(nb) / (neighbours_module.search_scale(reference) * magnitude)
    torch.testing.assert_close(
        scaled * relative_scale**2, neighbour_offset_grams(reference, scaled=True), rtol=1e-12, atol=1e-14
    )
    if magnitude == 1.0:
        unscaled = neighbour_offset_grams(nb)
        torch.testing.assert_close(scaled * neighbours_module.search_scale(nb) ** 2, unscaled, rtol=0, atol=0)


@pytest.mark.parametrize("offset", [0.0, 1e5])
@pytest.mark.parametrize("gram_limit", [4096, 10])
def test_neighbourhood_spreads_equal_per_point_numpy_loop(offset, gram_limit, monkeypatch):
    # Two clusters 2e5 apart with spreads near 1: the Gram matrix's form cancels about ten digits, so their points
    # must be recomputed from their offsets. A limit of 10 rows sends the cloud to the chunked search, without a Gram.
    monkeypatch.setattr(neighbours_module, "GRAM_MAX_POINTS", gram_limit)
    points = torch.randn(150, 24, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    points[:75] += offset
    points[75:] -= offset
    nb = neighbourhoods(points, 9)
    rows = nb.points.numpy()
    expected = [((rows[nb.indices[i]] - rows[nb.indices[i]].mean(axis=0)) ** 2).sum() for i in range(150)]

    spreads = neighbours_module.neighbourhood_spreads(nb)

    np.testing.assert_allclose(spreads.numpy(), expected, rtol=1e-10)
    scaled = neighbours_module.neighbourhood_spreads(nb, scaled=True)
    torch.testing.assert_close(scaled * neighbours_module.search_scale(nb) ** 2, spreads, rtol=0, atol=0)


def loop_neighbours(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-point numpy float64 loop: the sorted distances to, and the set of, each row's k nearest other rows."""
    distances, neighbour_sets = [], []
    for i in range(len(points)):
        row = np.sqrt(((points - points[i]) ** 2).sum(axis=1))
        row[i] = np.inf
        order = np.argsort(row, kind="stable")[:k]
        distances.append(row[order])
        neighbour_sets.append(sorted(order))
    return np.array(distances), np.array(neighbour_sets)


def far_clusters(dtype: torch.dtype) -> torch.Tensor:
    """Two clusters of spread 1e-5 at +-1e3: every key |b|^2 - 2 a.b rounds by more than the gaps between them."""
    generator = torch.Generator().manual_seed(16)
    spread = 1e-5 * torch.randn(120, 6, generator=generator, dtype=torch.float64)
    return torch.cat([spread[:60] + 1e3, spread[60:] - 1e3]).to(dtype)


def one_outlier() -> torch.Tensor:
    points = torch.randn(150, 8, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    points[0] = 1e10
    return points


@pytest.mark.parametrize("gram_limit", [4096, 0])
@pytest.mark.parametrize("make_points", [lambda: far_clusters(torch.float64), one_outlier], ids=["clusters", "outlier"])
def test_rounding_in_the_ranking_never_picks_wrong_neighbours(make_points, gram_limit, monkeypatch):
    # A limit of 0 rows sends the cloud to the chunked search.
    monkeypatch.setattr(neighbours_module, "GRAM_MAX_POINTS", gram_limit)
    points = make_points()
    expected_distances, expected_sets = loop_neighbours(points.numpy(), 7)

    nb = neighbourhoods(points, 7)

    np.testing.assert_array_equal(np.sort(nb.indices.numpy(), axis=1), expected_sets)
    np.testing.assert_allclose(nb.distances.numpy(), expected_distances, rtol=1e-9)


def test_float32_chunked_search_far_clusters():
    points = far_clusters(torch.float32)
    expected_distances, _ = loop_neighbours(points.double().numpy(), 5)

    distances, _ = knn(points, 5)

    np.testing.assert_allclose(distances.numpy(), expected_distances, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int64])
def test_duplicate_rows_of_integer_dtypes_are_found(dtype):
    points = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 1]]).to(dtype)

    distinct, n_removed = remove_duplicate_rows(points)

    assert n_removed == 1
    assert distinct.tolist() == points[[0, 1, 3]].tolist()


def test_large_clouds_use_chunked_search(monkeypatch):
    points = torch.randn(200, 16, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    gram_route = neighbourhoods(points, 7)
    monkeypatch.setattr(neighbours_module, "GRAM_MAX_POINTS", 100)

    chunked = neighbourhoods(points, 7)

    assert chunked.gram is None
    assert gram_route.gram is not None
    torch.testing.assert_close(chunked.indices, gram_route.indices, rtol=0, atol=0)
    torch.testing.assert_close(chunked.distances, gram_route.distances, rtol=1e-13, atol=0)
    torch.testing.assert_close(
        neighbour_offset_grams(chunked), neighbour_offset_grams(gram_route), rtol=1e-12, atol=1e-12
    )


def test_neighbourhoods_points_are_in_working_dtype():
    points = torch.randn(20, 3, generator=torch.Generator().manual_seed(7)).bfloat16()

    nb = neighbourhoods(points, 4)

    assert nb.points.dtype == torch.float32
    assert nb.distances.dtype == torch.float32


# -- offset Gram matrices and neighbour pairs ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_offset_grams_equal_per_point_numpy_loop(dtype):
    points = 50.0 + torch.randn(120, 7, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    nb = neighbourhoods(points.to(dtype), 6)
    rows = nb.points.double().numpy()
    expected = np.stack([(rows[nb.indices[i]] - rows[i]) @ (rows[nb.indices[i]] - rows[i]).T for i in range(120)])

    grams = neighbour_offset_grams(nb, chunk_size=17)

    assert grams.dtype == torch.float64
    np.testing.assert_allclose(grams.numpy(), expected, rtol=1e-12, atol=1e-12)
    squared_distances = torch.diagonal(grams, dim1=1, dim2=2)
    torch.testing.assert_close(squared_distances.sqrt(), nb.distances.double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(neighbour_offset_grams(nb, rows=(30, 71)), grams[30:71], rtol=0, atol=0)


def test_neighbour_pairs_list_each_relation_once():
    nb = neighbourhoods(torch.randn(80, 3, generator=torch.Generator().manual_seed(10)), 5)
    expected = {frozenset((i, j)) for i in range(80) for j in nb.indices[i].tolist()}

    pairs, slots = neighbour_pairs(nb.indices)

    assert {frozenset(pair) for pair in pairs.tolist()} == expected
    assert len(pairs) == len(expected)
    assert (pairs[:, 0] < pairs[:, 1]).all()
    for i in range(80):
        for slot, j in enumerate(nb.indices[i].tolist()):
            assert set(pairs[slots[i, slot]].tolist()) == {i, j}


def test_mutual_neighbours_share_one_pair():
    # Points 1 and 2 are each other's nearest neighbour; every other relation is one-way.
    points = torch.tensor([[0.0], [1.0], [1.5], [3.5], [6.0]], dtype=torch.float64)
    nb = neighbourhoods(points, 1)

    pairs, slots = neighbour_pairs(nb.indices)

    assert slots[1, 0] == slots[2, 0]
    assert pairs.tolist() == [[0, 1], [1, 2], [2, 3], [3, 4]]
