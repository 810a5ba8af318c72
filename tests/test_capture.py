"""Tests of EmbeddingCapture: which tensor it records, reservoir sampling, and hook clean-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pmg_torch import EmbeddingCapture
from pmg_torch.capture import reservoir_update


def _all_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def _classifier(width: int = 4, n_classes: int = 3) -> nn.Module:
    # The last nn.Linear receives the output of the Identity, which is the model's input itself.
    return nn.Sequential(nn.Identity(), nn.Linear(width, n_classes))


def _feed(model: nn.Module, capture: EmbeddingCapture, rows: torch.Tensor, labels: torch.Tensor, batch: int) -> None:
    for start in range(0, rows.shape[0], batch):
        capture.set_labels(labels[start : start + batch])
        model(rows[start : start + batch])


def test_rows_stored_per_class_equal_rows_given():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 4, generator=generator)
    labels = torch.randint(0, 3, (50,), generator=generator)
    model = _classifier()
    with EmbeddingCapture(model, max_per_class=100) as capture:
        _feed(model, capture, rows, labels, batch=8)
    stored = capture.embeddings
    assert sorted(stored) == sorted(set(labels.tolist()))
    for label, class_rows in stored.items():
        torch.testing.assert_close(class_rows, rows[labels == label], rtol=0, atol=0)
        assert capture.n_seen[label] == int((labels == label).sum())


def test_reservoir_keeps_at_most_max_per_class():
    rows = torch.arange(103 * 2, dtype=torch.float32).reshape(103, 2)
    labels = torch.cat([torch.zeros(100, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    model = _classifier(width=2)
    with EmbeddingCapture(model, max_per_class=7, seed=3) as capture:
        _feed(model, capture, rows, labels, batch=10)
    assert capture.embeddings[0].shape == (7, 2)
    assert capture.embeddings[1].shape == (3, 2)
    assert capture.n_seen == {0: 100, 1: 3}
    kept_rows = capture.embeddings[0][:, 0].long() // 2
    assert len(set(kept_rows.tolist())) == 7
    assert all(0 <= index < 100 for index in kept_rows.tolist())


def test_reservoir_sample_mean_is_uniform():
    n_rows, capacity = 10_000, 500
    rows = torch.arange(n_rows, dtype=torch.float32)[:, None]
    model = nn.Linear(1, 2)
    with EmbeddingCapture(model, max_per_class=capacity, seed=11) as capture:
        _feed(model, capture, rows, torch.zeros(n_rows, dtype=torch.long), batch=64)
    kept = capture.embeddings[0][:, 0]
    # A uniform sample without replacement of 500 of 0..9999: its mean has this standard deviation.
    expected_mean = (n_rows - 1) / 2
    standard_error = math.sqrt((n_rows**2 - 1) / 12 / capacity * (n_rows - capacity) / (n_rows - 1))
    assert abs(float(kept.mean()) - expected_mean) < 4 * standard_error
    assert len(set(kept.tolist())) == capacity


@pytest.mark.parametrize(
    ("batch_labels", "capacity"),
    [
        (([0, 0, 0, 0],), 2),
        (([0, 1, 0], [1, 1, 0, 0, 1], [0, 0, 1, 1]), 3),
        (([1], [0], [1, 0, 0, 1, 1, 1], [0, 1]), 2),
    ],
)
def test_reservoir_update_inclusion_is_uniform(batch_labels, capacity):
    labels = np.concatenate([np.array(batch, dtype=np.int64) for batch in batch_labels])
    n_trials = 4000
    generator = np.random.Generator(np.random.PCG64(5))
    kept_count = np.zeros(labels.size)
    for _ in range(n_trials):
        # Each reservoir slot contains the overall index of the row it keeps.
        reservoirs: dict[int, list[int]] = {0: [], 1: []}
        n_seen = np.zeros(2, dtype=np.int64)
        offset = 0
        for batch in batch_labels:
            classes = np.array(batch, dtype=np.int64)
            sources, write_classes, slots = reservoir_update(n_seen, classes, capacity, generator.random)
            for source, label, slot in zip(sources.tolist(), write_classes.tolist(), slots.tolist(), strict=True):
                reservoir = reservoirs[label]
                if slot == len(reservoir):
                    reservoir.append(offset + source)
                else:
                    reservoir[slot] = offset + source
            n_seen += np.bincount(classes, minlength=2)
            offset += classes.size
        for label, reservoir in reservoirs.items():
            assert len(reservoir) == min(capacity, int((labels == label).sum()))
            kept_count[reservoir] += 1
    # Algorithm R keeps each row of class c with probability capacity / n_c. Allow 4.5 standard errors.
    for label in (0, 1):
        of_class = labels == label
        if not of_class.any():
            continue
        probability = min(1.0, capacity / of_class.sum())
        tolerance = 4.5 * math.sqrt(probability * (1 - probability) / n_trials)
        frequencies = kept_count[of_class] / n_trials
        assert np.all(np.abs(frequencies - probability) <= tolerance), (label, frequencies)


def test_many_classes_and_unusual_labels_stored_exactly():
    # 70 classes fill three storage blocks, and -3 and 70000 are outside the label lookup table.
    generator = torch.Generator().manual_seed(6)
    label_values = torch.tensor([-3, 70_000, *range(68)])
    labels = label_values[torch.randint(0, 70, (600,), generator=generator)]
    rows = torch.randn(600, 3, generator=generator)
    keep = torch.rand(600, generator=generator) < 0.9
    model = _classifier(width=3)
    with EmbeddingCapture(model, max_per_class=600) as capture:
        for start in range(0, 600, 50):
            capture.set_labels(labels[start : start + 50], keep=keep[start : start + 50])
            model(rows[start : start + 50])
    kept_labels, kept_rows = labels[keep], rows[keep]
    expected_labels = sorted(set(kept_labels.tolist()))
    assert list(capture.embeddings) == expected_labels
    assert list(capture.n_seen) == expected_labels
    for label, class_rows in capture.embeddings.items():
        torch.testing.assert_close(class_rows, kept_rows[kept_labels == label], rtol=0, atol=0)
        assert capture.n_seen[label] == int((kept_labels == label).sum())


def test_reservoir_update_matches_algorithm_r():
    capacity = 5
    n_seen = np.array([3, 0, 12], dtype=np.int64)
    classes = np.random.Generator(np.random.PCG64(1)).integers(0, 3, size=60)
    draws = np.random.Generator(np.random.PCG64(7)).random
    sources, write_classes, slots = reservoir_update(n_seen, classes, capacity, draws)

    # Row by row with the same uniform draws, which go to the rows in order of class and then of batch position.
    # Row t of a class (0-based overall) fills slot t while t < capacity, else draws j in 0..t and overwrites j.
    uniforms = np.random.Generator(np.random.PCG64(7)).random(classes.size).tolist()
    reservoirs = {label: [f"old{label}.{i}" for i in range(min(int(n_seen[label]), capacity))] for label in range(3)}
    seen = n_seen.tolist()
    for row in np.argsort(classes, kind="stable").tolist():
        label = int(classes[row])
        uniform = uniforms.pop(0)
        t = seen[label]
        seen[label] += 1
        if t < capacity:
            reservoirs[label].append(f"new{row}")
        elif (j := math.floor(uniform * (t + 1))) < capacity:
            reservoirs[label][j] = f"new{row}"

    vectorised = {label: [f"old{label}.{i}" for i in range(min(int(n_seen[label]), capacity))] for label in range(3)}
    for source, label, slot in zip(sources.tolist(), write_classes.tolist(), slots.tolist(), strict=True):
        if slot == len(vectorised[label]):
            vectorised[label].append(f"new{source}")
        else:
            vectorised[label][slot] = f"new{source}"
    assert vectorised == reservoirs
    pairs = list(zip(write_classes.tolist(), slots.tolist(), strict=True))
    assert len(set(pairs)) == len(pairs)
    assert pairs == sorted(pairs)


def test_reset_restarts_sampling():
    rows = torch.randn(300, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(300, dtype=torch.long)
    model = _classifier(width=3)
    with EmbeddingCapture(model, max_per_class=20, seed=4) as capture:
        _feed(model, capture, rows, labels, batch=32)
        first = capture.embeddings[0].clone()
        capture.reset()
        assert capture.embeddings == {}
        assert capture.n_seen == {}
        _feed(model, capture, rows, labels, batch=32)
        torch.testing.assert_close(capture.embeddings[0], first, rtol=0, atol=0)


def test_hooks_removed_on_exit():
    model = _classifier()
    with EmbeddingCapture(model) as capture:
        assert capture.attached
        assert _all_hooks(model) == 1
    assert not capture.attached
    assert _all_hooks(model) == 0


def test_hooks_removed_after_exception():
    model = _classifier()
    with pytest.raises(RuntimeError, match="boom"), EmbeddingCapture(model, layer="0"):
        assert _all_hooks(model) == 1
        raise RuntimeError("boom")
    assert _all_hooks(model) == 0


def test_hooks_removed_after_hook_raises():
    model = _classifier()
    with pytest.raises(ValueError, match="set_labels"), EmbeddingCapture(model):
        model(torch.randn(2, 4))
    assert _all_hooks(model) == 0


def test_attach_and_remove_are_idempotent():
    model = _classifier()
    capture = EmbeddingCapture(model)
    capture.attach()
    capture.attach()
    assert _all_hooks(model) == 1
    capture.remove()
    capture.remove()
    assert _all_hooks(model) == 0


def test_layer_by_name_records_its_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(6, 3)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    with EmbeddingCapture(model, layer="1") as capture:
        capture.set_labels(labels)
        model(x)
    expected = torch.relu(model[0](x)).detach()
    assert capture.layer_name == "1"
    assert not capture.captures_input
    torch.testing.assert_close(capture.embeddings[0], expected[labels == 0])
    torch.testing.assert_close(capture.embeddings[1], expected[labels == 1])


def test_layer_by_module_records_its_output():
    torch.manual_seed(0)
    encoder = nn.Linear(3, 4)
    model = nn.Sequential(encoder, nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with EmbeddingCapture(model, layer=encoder) as capture:
        capture.set_labels(torch.zeros(5, dtype=torch.long))
        model(x)
    assert capture.layer_name == "0"
    torch.testing.assert_close(capture.embeddings[0], encoder(x).detach())


class _Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Linear(3, 6), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_default_layer_is_input_of_last_linear():
    torch.manual_seed(0)
    model = _Nested()
    x = torch.randn(7, 3)
    with EmbeddingCapture(model) as capture:
        capture.set_labels(torch.full((7,), 2))
        model(x)
    assert capture.layer_name == "head.2"
    assert capture.captures_input
    penultimate = model.head[1](model.head[0](model.features(x))).detach()
    torch.testing.assert_close(capture.embeddings[2], penultimate)


class _TupleOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
        return "name", 2 * x, -x


def test_tuple_output_records_first_tensor():
    model = nn.Sequential(_TupleOutput())
    x = torch.randn(4, 3)
    with EmbeddingCapture(model, layer="0") as capture:
        capture.set_labels(torch.tensor([1, 1, 1, 1]))
        model(x)
    torch.testing.assert_close(capture.embeddings[1], 2 * x)


def test_feature_maps_are_flattened_per_row():
    model = nn.Sequential(nn.Conv2d(1, 2, kernel_size=3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    x = torch.randn(5, 1, 4, 4)
    with EmbeddingCapture(model, layer="0") as capture:
        capture.set_labels(torch.arange(5) % 2)
        model(x)
    feature_maps = model[0](x).detach()
    assert capture.embeddings[0].shape == (3, 32)
    torch.testing.assert_close(capture.embeddings[0], feature_maps[0::2].reshape(3, -1))


def test_batch_size_mismatch_raises():
    model = _classifier()
    with EmbeddingCapture(model) as capture:
        capture.set_labels(torch.tensor([0, 1, 2]))
        with pytest.raises(ValueError, match=r"4 rows but set_labels got 3 labels"):
            model(torch.randn(4, 4))


def test_labels_are_consumed_by_one_forward():
    model = _classifier()
    with EmbeddingCapture(model) as capture:
        capture.set_labels(torch.tensor([0, 1]))
        model(torch.randn(2, 4))
        with pytest.raises(ValueError, match=r"call set_labels\(y\) before each forward"):
            model(torch.randn(2, 4))
    assert capture.n_seen == {0: 1, 1: 1}


def test_set_labels_rejects_bad_labels():
    capture = EmbeddingCapture(_classifier())
    with pytest.raises(TypeError, match="integer class labels"):
        capture.set_labels(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="argmax"):
        capture.set_labels(torch.eye(3, dtype=torch.long))


def test_unknown_layer_lists_closest_names():
    model = _Nested()
    with pytest.raises(ValueError, match=r"'head\.3' not found in _Nested\. Closest matches: 'head\.2'") as error:
        EmbeddingCapture(model, layer="head.3")
    assert "features.0" in str(error.value)


def test_model_without_linear_needs_a_layer():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"has no nn\.Linear.*'0', '1'"):
        EmbeddingCapture(model)


def test_module_outside_model_is_rejected():
    with pytest.raises(ValueError, match="not a submodule"):
        EmbeddingCapture(_classifier(), layer=nn.Linear(2, 2))


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        EmbeddingCapture("model")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="module name"):
        EmbeddingCapture(_classifier(), layer=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_per_class"):
        EmbeddingCapture(_classifier(), max_per_class=0)
    with pytest.raises(TypeError, match="seed"):
        EmbeddingCapture(_classifier(), seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        EmbeddingCapture(_classifier(), seed=-1)


def test_width_change_raises():
    model = nn.Sequential(nn.Flatten())
    with EmbeddingCapture(model, layer="0") as capture:
        capture.set_labels(torch.tensor([0, 0]))
        model(torch.randn(2, 3))
        capture.set_labels(torch.tensor([0, 0]))
        with pytest.raises(ValueError, match="width 5 after rows of width 3"):
            model(torch.randn(2, 5))


def test_stored_rows_have_no_grad_fn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with EmbeddingCapture(model, max_per_class=2) as capture:
        for _ in range(3):
            capture.set_labels(torch.tensor([0, 0, 1]))
            model(torch.randn(3, 3)).sum().backward()
    assert model[0].weight.grad is not None
    for rows in capture.embeddings.values():
        assert rows.grad_fn is None
        assert not rows.requires_grad


def test_stored_rows_are_float32_copies():
    model = nn.Sequential(nn.Identity(), nn.Linear(3, 2).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    with EmbeddingCapture(model) as capture:
        capture.set_labels(torch.zeros(4, dtype=torch.long))
        model(x)
    expected = x.float().clone()
    x.zero_()
    assert capture.embeddings[0].dtype == torch.float32
    torch.testing.assert_close(capture.embeddings[0], expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_stay_on_device_and_match_cpu():
    rows = torch.randn(500, 3, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 4, (500,), generator=torch.Generator().manual_seed(3))
    stored = {}
    for device in ("cpu", "cuda"):
        model = _classifier(width=3, n_classes=4).to(device)
        with EmbeddingCapture(model, max_per_class=30, seed=1) as capture:
            _feed(model, capture, rows.to(device), labels.to(device), batch=64)
        stored[device] = capture.embeddings
    for label, class_rows in stored["cuda"].items():
        assert class_rows.device.type == "cuda"
        torch.testing.assert_close(class_rows.cpu(), stored["cpu"][label], rtol=0, atol=0)
