"""Tests of ManifoldGeometryCallback: when it measures, what it logs where, and that it leaves no hooks behind."""

from __future__ import annotations

import csv
import math
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import MLPClassifier
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from callbacks import ManifoldGeometryCallback, gather_class_rows
from pmg_torch import DegenerateInputWarning
from pmg_torch.analysis import analyze

IN_DIM = 8
HIDDEN = 12
N_CLASSES = 3
K = 5
BATCH = 8
TRAIN_BATCHES = 2
DEFAULT_TAGS = ("curvature", "volume", "intrinsic_dimension", "shape_similarity")


class TinyClassifier(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(IN_DIM, HIDDEN, N_CLASSES)


class FailingClassifier(TinyClassifier):
    """Raises inside validation_step after the forward, recording how many hooks were on the model then."""

    hooks_at_failure = -1

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])
        self.hooks_at_failure = count_hooks(self)
        raise RuntimeError("validation failed on purpose")


class DictClassifier(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch["x"]), batch["target"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch["x"])


class DictDataset(Dataset):
    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        x, y = self.data[index]
        return {"x": x, "target": y}


class RecordingLogger(Logger):
    """A non-TensorBoard logger that records what reaches it, including any histogram sent to its experiment."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int | None, dict[str, float]]] = []
        self.histograms: list[str] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> RecordingLogger:
        return self

    def add_histogram(self, tag: str, *args: Any, **kwargs: Any) -> None:
        self.histograms.append(tag)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))


class BatchHookSpy(Callback):
    """Records the extra positional arguments of each validation batch hook and the hooks present then."""

    def __init__(self) -> None:
        self.extra_arguments: list[tuple[Any, ...]] = []
        self.hooks_seen: list[tuple[bool, int]] = []

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int, *rest: Any):
        self.extra_arguments.append(rest)
        self.hooks_seen.append((trainer.sanity_checking, count_hooks(pl_module)))


def count_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def clouds_dataset(rows_per_class: Mapping[int, int], seed: int) -> TensorDataset:
    """Gaussian blobs around well-separated class centres, in a shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.eye(N_CLASSES, IN_DIM)
    xs, ys = [], []
    for label, n in rows_per_class.items():
        xs.append(centres[label] + torch.randn(n, IN_DIM, generator=generator))
        ys.append(torch.full((n,), label, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(y), generator=generator)
    return TensorDataset(x[order], y[order])


def train_loader() -> DataLoader:
    return DataLoader(clouds_dataset({0: 8, 1: 8, 2: 8}, seed=1), batch_size=24 // TRAIN_BATCHES)


def val_loader(rows_per_class: Mapping[int, int] | None = None) -> DataLoader:
    rows_per_class = rows_per_class or {0: 24, 1: 24, 2: 24}
    return DataLoader(clouds_dataset(rows_per_class, seed=2), batch_size=BATCH)


def make_trainer(tmp_path: Path, callbacks: list[Callback], loggers: Any = None, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "logger": TensorBoardLogger(tmp_path, name="tb", version=0) if loggers is None else loggers,
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def read_events(log_dir: str | Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def pmg_scalar_tags(events: EventAccumulator) -> set[str]:
    """The geometry scalars; accuracy and its correlations are checked in test_lightning_styles.py."""
    return {
        tag
        for tag in events.Tags()["scalars"]
        if tag.startswith("pmg/") and tag.split("/")[1] not in ("accuracy", "spearman")
    }


def steps_of(events: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in events.Scalars(tag)]


def last_value(events: EventAccumulator, tag: str) -> float:
    return events.Scalars(tag)[-1].value


def embeddings_by_class(model: TinyClassifier, loader: DataLoader) -> dict[int, np.ndarray]:
    """The head's input per class, computed directly, in float64."""
    x, y = loader.dataset.tensors
    with torch.no_grad():
        rows = model.body(x).double().numpy()
    return {label: rows[(y == label).numpy()] for label in sorted(set(y.tolist()))}


def reference_volume(rows: np.ndarray) -> float:
    """``1/2 log2 det(I + Z_c^T Z_c / m)`` with numpy."""
    centred = rows - rows.mean(axis=0)
    gram = np.eye(rows.shape[1]) + centred.T @ centred / rows.shape[0]
    sign, logdet = np.linalg.slogdet(gram)
    assert sign > 0
    return 0.5 * logdet / math.log(2.0)


def fit_tiny(tmp_path: Path, callback: ManifoldGeometryCallback, model: pl.LightningModule | None = None, **kwargs):
    model = model or TinyClassifier()
    val_dataloaders = kwargs.pop("val_dataloaders", None) or val_loader()
    trainer = make_trainer(tmp_path, [callback], **kwargs)
    trainer.fit(model, train_loader(), val_dataloaders)
    return trainer, model


@pytest.fixture(autouse=True)
def _seed() -> None:
    pl.seed_everything(0, verbose=False)


# -- what is logged --------------------------------------------------------------------------------------------------


def test_fit_writes_scalars_and_histograms(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K)
    trainer, model = fit_tiny(tmp_path, callback, max_epochs=2)

    events = read_events(trainer.logger.log_dir)
    expected = {f"pmg/{metric}/{name}" for metric in DEFAULT_TAGS for name in ("0", "1", "2", "mean")}
    assert pmg_scalar_tags(events) == expected
    for tag in expected:
        assert steps_of(events, tag) == [TRAIN_BATCHES, 2 * TRAIN_BATCHES], tag
        assert all(math.isfinite(event.value) for event in events.Scalars(tag)), tag
    histograms = {tag for tag in events.Tags()["histograms"] if tag.startswith("pmg/")}
    assert histograms == {"pmg/local_curvature/0", "pmg/local_curvature/1", "pmg/local_curvature/2"}
    assert callback.n_runs == 2


def test_logged_volume_matches_numpy(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K)
    trainer, model = fit_tiny(tmp_path, callback)

    events = read_events(trainer.logger.log_dir)
    for label, rows in embeddings_by_class(model, val_loader()).items():
        assert last_value(events, f"pmg/volume/{label}") == pytest.approx(reference_volume(rows), rel=1e-4)


def test_logged_values_match_direct_analysis(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K)
    trainer, model = fit_tiny(tmp_path, callback)

    clouds = {label: torch.from_numpy(rows).float() for label, rows in embeddings_by_class(model, val_loader()).items()}
    direct = analyze(clouds, k=K)
    events = read_events(trainer.logger.log_dir)
    for tag, value in direct.scalars().items():
        assert last_value(events, tag) == pytest.approx(value, rel=1e-3, abs=1e-5), tag
    assert callback.last_report is not None
    assert callback.last_report.n_samples == {0: 24, 1: 24, 2: 24}


def test_sanity_check_logs_nothing(tmp_path: Path) -> None:
    spy = BatchHookSpy()
    callback = ManifoldGeometryCallback(k=K)
    trainer = make_trainer(tmp_path, [callback, spy], num_sanity_val_steps=2)
    trainer.fit(TinyClassifier(), train_loader(), val_loader())

    sanity = [n_hooks for checking, n_hooks in spy.hooks_seen if checking]
    measured = [n_hooks for checking, n_hooks in spy.hooks_seen if not checking]
    assert sanity == [0, 0]
    # One hook records the embeddings and one counts the accuracy.
    assert measured and all(n_hooks == 2 for n_hooks in measured)
    events = read_events(trainer.logger.log_dir)
    assert steps_of(events, "pmg/curvature/mean") == [TRAIN_BATCHES]
    assert callback.n_runs == 1


def test_validate_logs_with_expensive_metrics(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K)
    trainer = make_trainer(tmp_path, [callback])
    model = TinyClassifier()
    trainer.validate(model, val_loader())

    events = read_events(trainer.logger.log_dir)
    assert {f"pmg/{metric}/mean" for metric in DEFAULT_TAGS} <= pmg_scalar_tags(events)
    assert steps_of(events, "pmg/volume/0") == [0]
    assert callback.last_report is not None
    assert "holes" in callback.last_report.values
    assert "nonconvexity" in callback.last_report.values
    assert count_hooks(model) == 0


def test_every_n_epochs_is_respected(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K, every_n_epochs=2, expensive_every_n_epochs=0)
    trainer, _ = fit_tiny(tmp_path, callback, max_epochs=4)

    events = read_events(trainer.logger.log_dir)
    assert steps_of(events, "pmg/curvature/mean") == [2 * TRAIN_BATCHES, 4 * TRAIN_BATCHES]
    assert callback.n_runs == 2


def test_expensive_metrics_follow_their_schedule(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K, expensive_metrics=["holes"], expensive_every_n_epochs=2)
    trainer, _ = fit_tiny(tmp_path, callback, max_epochs=2)

    events = read_events(trainer.logger.log_dir)
    assert steps_of(events, "pmg/curvature/mean") == [TRAIN_BATCHES, 2 * TRAIN_BATCHES]
    assert steps_of(events, "pmg/holes/mean") == [2 * TRAIN_BATCHES]


def test_figures_follow_their_schedule_and_the_last_epoch(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0, figures_every_n_epochs=2)
    trainer, model = fit_tiny(tmp_path, callback, max_epochs=5)

    events = read_events(trainer.logger.log_dir)
    assert steps_of(events, "pmg/curvature/mean") == [epoch * TRAIN_BATCHES for epoch in range(1, 6)]
    # Epochs 2 and 4 are on the schedule, and epoch 5 is the last.
    drawn = [event.step for event in events.Images("pmg/figures/curvature")]
    assert drawn == [2 * TRAIN_BATCHES, 4 * TRAIN_BATCHES, 5 * TRAIN_BATCHES]

    validating = make_trainer(tmp_path / "validate", [callback])
    validating.validate(model, val_loader(), verbose=False)
    assert read_events(validating.logger.log_dir).Tags()["images"]
    with pytest.raises(ValueError, match="figures_every_n_epochs"):
        ManifoldGeometryCallback(figures_every_n_epochs=0)


@pytest.mark.parametrize(
    "switched_off", [{"expensive_every_n_epochs": 0}, {"expensive_every_n_epochs": None}, {"expensive_metrics": ()}]
)
def test_expensive_metrics_can_be_switched_off(tmp_path: Path, switched_off: dict[str, Any]) -> None:
    callback = ManifoldGeometryCallback(k=K, **switched_off)
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(TinyClassifier(), val_loader())

    assert callback.last_report is not None
    assert set(callback.last_report.values) == set(DEFAULT_TAGS)


def test_class_names_appear_in_tags(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K, class_names={0: "cat", 1: "dog", 2: "bird"}, expensive_every_n_epochs=0)
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(TinyClassifier(), val_loader())

    events = read_events(trainer.logger.log_dir)
    expected = {f"pmg/{metric}/{name}" for metric in DEFAULT_TAGS for name in ("cat", "dog", "bird", "mean")}
    assert pmg_scalar_tags(events) == expected
    assert "pmg/local_curvature/bird" in events.Tags()["histograms"]


# -- hooks -----------------------------------------------------------------------------------------------------------


def test_no_hooks_left_after_fit_and_validate(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K)
    trainer, model = fit_tiny(tmp_path, callback)
    assert count_hooks(model) == 0
    trainer.validate(model, val_loader())
    assert count_hooks(model) == 0
    assert callback.n_runs == 2


def test_hooks_removed_after_validation_error(tmp_path: Path) -> None:
    model = FailingClassifier()
    trainer = make_trainer(tmp_path, [ManifoldGeometryCallback(k=K)], num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.fit(model, train_loader(), val_loader())
    assert model.hooks_at_failure == 2  # the embedding and accuracy hooks
    assert count_hooks(model) == 0


def test_batch_hook_without_dataloader_idx(tmp_path: Path) -> None:
    spy = BatchHookSpy()
    callback = ManifoldGeometryCallback(k=K)
    trainer = make_trainer(tmp_path, [callback, spy], num_sanity_val_steps=0)
    trainer.fit(TinyClassifier(), train_loader(), val_loader())

    # Lightning leaves dataloader_idx out with a single validation dataloader, and validation_step returns None.
    assert spy.extra_arguments and all(rest == () for rest in spy.extra_arguments)
    assert callback.last_report is not None
    assert callback.last_report.n_samples == {0: 24, 1: 24, 2: 24}


def test_several_dataloaders_are_pooled(tmp_path: Path) -> None:
    class TwoLoaderClassifier(TinyClassifier):
        def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            self(batch[0])

    callback = ManifoldGeometryCallback(k=K)
    trainer = make_trainer(tmp_path, [callback], num_sanity_val_steps=0)
    trainer.fit(TwoLoaderClassifier(), train_loader(), [val_loader(), val_loader({0: 6, 1: 6, 2: 6})])

    assert callback.last_report is not None
    assert callback.last_report.n_samples == {0: 30, 1: 30, 2: 30}


# -- degenerate validation sets --------------------------------------------------------------------------------------


def test_class_missing_from_validation_is_absent(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K)
    trainer, _ = fit_tiny(tmp_path, callback, max_epochs=2, val_dataloaders=val_loader({0: 24, 2: 24}))

    events = read_events(trainer.logger.log_dir)
    expected = {f"pmg/{metric}/{name}" for metric in DEFAULT_TAGS for name in ("0", "2", "mean")}
    assert pmg_scalar_tags(events) == expected
    for step, (zero, two, mean) in enumerate(
        zip(
            events.Scalars("pmg/volume/0"),
            events.Scalars("pmg/volume/2"),
            events.Scalars("pmg/volume/mean"),
            strict=True,
        )
    ):
        assert mean.value == pytest.approx((zero.value + two.value) / 2, rel=1e-5), step
    assert callback.last_report is not None
    assert callback.last_report.classes == [0, 2]


@pytest.mark.parametrize("n_rows", [1, 3])
def test_tiny_class_gives_nan_and_one_warning(tmp_path: Path, n_rows: int) -> None:
    callback = ManifoldGeometryCallback(k=K)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit_tiny(tmp_path, callback, val_dataloaders=val_loader({0: 24, 1: 24, 2: n_rows}))

    degenerate = [str(w.message) for w in caught if issubclass(w.category, DegenerateInputWarning)]
    about_curvature = [message for message in degenerate if "class 2" in message and "curvature" in message]
    assert len(about_curvature) == 1, degenerate
    assert not any("class 0" in message or "class 1" in message for message in degenerate)
    assert callback.last_report is not None
    assert math.isnan(callback.last_report.values["curvature"][2])
    assert math.isnan(callback.last_report.values["intrinsic_dimension"][2])
    events = read_events(trainer.logger.log_dir)
    tags = pmg_scalar_tags(events)
    assert "pmg/curvature/2" not in tags
    assert "pmg/curvature/0" in tags
    assert math.isfinite(last_value(events, "pmg/curvature/mean"))


def test_csv_and_tensorboard_loggers_both_get_scalars(tmp_path: Path) -> None:
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    recording = RecordingLogger()
    callback = ManifoldGeometryCallback(k=K)
    fit_tiny(tmp_path, callback, loggers=[tensorboard, csv_logger, recording])

    events = read_events(tensorboard.log_dir)
    assert "pmg/curvature/0" in pmg_scalar_tags(events)
    assert "pmg/local_curvature/0" in events.Tags()["histograms"]
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    logged = [float(row["pmg/curvature/0"]) for row in rows if row.get("pmg/curvature/0")]
    assert logged == [pytest.approx(last_value(events, "pmg/curvature/0"), rel=1e-6)]
    pmg_steps = [step for step, metrics in recording.metrics if "pmg/volume/mean" in metrics]
    assert pmg_steps == [TRAIN_BATCHES]
    assert recording.histograms == []


# -- labels ----------------------------------------------------------------------------------------------------------


def test_dict_batches_use_a_standard_key(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K)
    trainer = make_trainer(tmp_path, [callback], num_sanity_val_steps=0)
    train = DataLoader(DictDataset(train_loader().dataset), batch_size=BATCH)
    val = DataLoader(DictDataset(val_loader().dataset), batch_size=BATCH)
    trainer.fit(DictClassifier(), train, val)

    assert callback.last_report is not None
    assert callback.last_report.n_samples == {0: 24, 1: 24, 2: 24}


def test_labels_found_by_key_or_callable() -> None:
    labels = torch.tensor([2, 0, 1])
    assert torch.equal(ManifoldGeometryCallback()._labels_from_batch((torch.zeros(3, 2), labels)), labels)
    assert torch.equal(ManifoldGeometryCallback()._labels_from_batch({"x": 0, "targets": labels}), labels)
    by_key = ManifoldGeometryCallback(label_key="cls")
    assert torch.equal(by_key._labels_from_batch({"y": torch.zeros(3), "cls": labels}), labels)
    by_callable = ManifoldGeometryCallback(label_key=lambda batch: batch.meta["class"])
    batch = type("Batch", (), {"meta": {"class": [2, 0, 1]}})()
    assert torch.equal(by_callable._labels_from_batch(batch), labels)


@pytest.mark.parametrize(
    ("label_key", "batch", "match"),
    [
        (None, {"x": 0, "image": 1}, "expected one of"),
        ("cls", {"x": 0}, "not found"),
        ("cls", (0, 1), "needs dict batches"),
        (None, torch.zeros(3), "Cannot find class labels"),
    ],
)
def test_missing_labels_raise(label_key: str | None, batch: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ManifoldGeometryCallback(label_key=label_key)._labels_from_batch(batch)


# -- gathering across ranks ------------------------------------------------------------------------------------------


class ThreadedRanks:
    """Runs one function per simulated rank in threads whose all_gather exchanges tensors through a barrier."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.slots: list[Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=10)

    def all_gather_for(self, rank: int):
        def all_gather(tensor: Tensor) -> Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            # torch.stack fails unless every rank sent one shape, as the real collective needs.
            gathered = torch.stack(self.slots)
            self.barrier.wait()
            return gathered

        return all_gather

    def run(self, per_rank: list[dict[int, Tensor]]) -> list[dict[int, Tensor]]:
        results: list[Any] = [None] * self.world_size

        def work(rank: int) -> None:
            try:
                results[rank] = gather_class_rows(
                    per_rank[rank], self.all_gather_for(rank), self.world_size, torch.device("cpu")
                )
            except Exception as error:  # handed to the main thread, which fails the test
                results[rank] = error
                self.barrier.abort()

        threads = [threading.Thread(target=work, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # A rank's own error comes before the BrokenBarrierError it causes on the others.
        errors = sorted(
            (result for result in results if isinstance(result, Exception)),
            key=lambda error: isinstance(error, threading.BrokenBarrierError),
        )
        if errors:
            raise errors[0]
        return results


def test_gather_handles_uneven_and_empty_ranks() -> None:
    generator = torch.Generator().manual_seed(0)
    rank0 = {0: torch.randn(5, 4, generator=generator), 1: torch.randn(2, 4, generator=generator)}
    rank1 = {1: torch.randn(3, 4, generator=generator), 2: torch.randn(1, 4, generator=generator)}
    rank2: dict[int, Tensor] = {}
    results = ThreadedRanks(3).run([rank0, rank1, rank2])

    for gathered in results:
        assert sorted(gathered) == [0, 1, 2]
        assert torch.equal(gathered[0], rank0[0])
        assert torch.equal(gathered[1], torch.cat([rank0[1], rank1[1]]))
        assert torch.equal(gathered[2], rank1[2])


def test_gather_with_no_rows_anywhere_is_empty() -> None:
    assert ThreadedRanks(2).run([{}, {}]) == [{}, {}]


def test_gather_single_process_returns_rows() -> None:
    rows = {3: torch.randn(4, 2), 7: torch.randn(1, 2)}
    gathered = gather_class_rows(rows, lambda tensor: tensor, 1, torch.device("cpu"))
    assert sorted(gathered) == [3, 7]
    assert torch.equal(gathered[3], rows[3])
    assert torch.equal(gathered[7], rows[7])


# -- checkpoints and arguments ---------------------------------------------------------------------------------------


def contains_tensor(value: Any) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, Mapping):
        return any(contains_tensor(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(contains_tensor(item) for item in value)
    return False


def test_state_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K, every_n_epochs=1)
    trainer, model = fit_tiny(tmp_path, callback)
    checkpoint_path = tmp_path / "first.ckpt"
    trainer.save_checkpoint(checkpoint_path)
    saved = torch.load(checkpoint_path, weights_only=False)["callbacks"][callback.state_key]
    assert saved["n_runs"] == 1
    assert saved["settings"]["k"] == K
    assert not contains_tensor(saved)

    resumed = ManifoldGeometryCallback(k=K, every_n_epochs=1)
    trainer = make_trainer(tmp_path, [resumed], max_epochs=2)
    trainer.fit(TinyClassifier(), train_loader(), val_loader(), ckpt_path=checkpoint_path)
    assert resumed.n_runs == 2


def test_load_state_dict_restores_settings_with_warning() -> None:
    saved = ManifoldGeometryCallback(k=7, metrics=["volume"]).state_dict()
    restored = ManifoldGeometryCallback(k=K)
    with pytest.warns(UserWarning, match="k=7"):
        restored.load_state_dict(saved)
    assert restored.k == 7
    assert restored.metrics == ("volume",)


@pytest.mark.parametrize(
    ("arguments", "error", "match"),
    [
        ({"k": 0}, ValueError, "k"),
        ({"k": 1}, ValueError, "at least 2"),
        ({"every_n_epochs": 0}, ValueError, "every_n_epochs"),
        ({"max_per_class": 2.5}, TypeError, "max_per_class"),
        ({"metrics": ["curvature", "bendiness"]}, ValueError, "bendiness"),
        ({"metrics": "curvature"}, TypeError, "list of metric names"),
        ({"expensive_every_n_epochs": -1}, ValueError, "expensive_every_n_epochs"),
        ({"layer": 3}, TypeError, "layer"),
        ({"label_key": 5}, TypeError, "label_key"),
        ({"class_names": "0123"}, TypeError, "class_names"),
    ],
)
def test_invalid_arguments_raise(arguments: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ManifoldGeometryCallback(**arguments)
