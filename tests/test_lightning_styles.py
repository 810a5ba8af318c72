"""The callback in each Lightning style: both packages' Trainers, CSV and TensorBoard loggers, EarlyStopping and
ModelCheckpoint on a geometry scalar, accuracy from the forward passes, and class names from the datamodule."""

from __future__ import annotations

import csv
import importlib
import math
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch
import pytest
import pytorch_lightning
import scipy.stats
import torch
from jsonargparse import ArgumentParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ManifoldGeometryCallback

IN_DIM = 8
HIDDEN = 12
N_CLASSES = 4
K = 5
PACKAGES = ["pytorch_lightning", "lightning.pytorch"]


def dataset(rows_per_class: int, seed: int) -> TensorDataset:
    """Overlapping Gaussian blobs, so that accuracy differs between classes."""
    generator = torch.Generator().manual_seed(seed)
    centres = 1.5 * torch.eye(N_CLASSES, IN_DIM)
    x = torch.cat(
        [centres[label] + torch.randn(rows_per_class, IN_DIM, generator=generator) for label in range(N_CLASSES)]
    )
    y = torch.arange(N_CLASSES).repeat_interleave(rows_per_class)
    order = torch.randperm(len(y), generator=generator)
    return TensorDataset(x[order], y[order])


def loaders() -> tuple[DataLoader, DataLoader]:
    return DataLoader(dataset(10, seed=1), batch_size=20), DataLoader(dataset(16, seed=2), batch_size=8)


def classifier(package: ModuleType, call_submodules: bool = False) -> Any:
    """A tiny MLP as a LightningModule of ``package``; its validation_step returns nothing."""

    class TinyClassifier(package.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh())
            self.head = nn.Linear(HIDDEN, N_CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.body(x))

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return F.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if call_submodules:
                self.head(self.body(batch[0]))  # never through forward
            else:
                self(batch[0])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return TinyClassifier()


def trainer_for(package: ModuleType, tmp_path: Path, callbacks: Any, **options: Any) -> Any:
    settings: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 2,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,
        "callbacks": callbacks,
        "logger": [
            package.loggers.TensorBoardLogger(tmp_path, name="tb", version=0),
            package.loggers.CSVLogger(tmp_path, name="csv", version=0),
        ],
    }
    settings.update(options)
    return package.Trainer(**settings)


def read_events(log_dir: str | Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def csv_rows(log_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def reference_accuracy(model: nn.Module, loader: DataLoader) -> dict[int, float]:
    """Per-class accuracy by a loop over the validation samples."""
    x, y = loader.dataset.tensors
    with torch.no_grad():
        predictions = model(x).argmax(dim=1)
    correct = {label: 0 for label in range(N_CLASSES)}
    total = {label: 0 for label in range(N_CLASSES)}
    for prediction, label in zip(predictions.tolist(), y.tolist(), strict=True):
        total[label] += 1
        correct[label] += int(prediction == label)
    return {label: correct[label] / total[label] for label in total}


@pytest.fixture(autouse=True)
def _quiet_and_seeded() -> None:
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


# -- one class for both packages -------------------------------------------------------------------------------------


def test_callback_is_a_callback_of_both_packages():
    callback = ManifoldGeometryCallback()
    assert isinstance(callback, pytorch_lightning.Callback)
    assert isinstance(callback, lightning.pytorch.Callback)


@pytest.mark.parametrize("package_name", PACKAGES)
def test_cli_config_resolves_callback_for_both_packages(package_name):
    # LightningCLI reads `class_path` entries through jsonargparse, typed with the package's own Callback.
    package = importlib.import_module(package_name)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--callback", type=package.Callback)
    config = parser.parse_args(
        ["--callback", '{"class_path": "callbacks.ManifoldGeometryCallback", "init_args": {"k": 7}}']
    )
    # jsonargparse 4.49 renamed instantiate_classes to instantiate; the project allows versions from 4.39 on.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    callback = instantiate(config).callback
    assert isinstance(callback, ManifoldGeometryCallback)
    assert callback.k == 7


@pytest.mark.parametrize("package_name", PACKAGES)
def test_fit_logs_geometry_accuracy_and_views(tmp_path, package_name):
    package = importlib.import_module(package_name)
    callback = ManifoldGeometryCallback(k=K, expensive_metrics=["holes"], expensive_every_n_epochs=2)
    train, val = loaders()
    model = classifier(package)
    # A single callback, not in a list, is recognised only as a subclass of the package's own Callback.
    trainer = trainer_for(package, tmp_path, callback)
    trainer.fit(model, train, val)

    tensorboard, csv_logger = trainer.loggers
    events = read_events(tensorboard.log_dir)
    scalars = set(events.Tags()["scalars"])
    for metric in ("curvature", "volume", "intrinsic_dimension", "shape_similarity", "accuracy"):
        assert {f"pmg/{metric}/{name}" for name in ("0", "1", "2", "3", "mean")} <= scalars, metric
    assert "pmg/holes/mean" in scalars

    accuracy = reference_accuracy(model, val)
    assert callback.last_accuracy == pytest.approx(accuracy)
    for label, value in accuracy.items():
        assert events.Scalars(f"pmg/accuracy/{label}")[-1].value == pytest.approx(value)
    report = callback.last_report
    volumes = [report.values["volume"][label] for label in range(N_CLASSES)]
    expected_rho = scipy.stats.spearmanr(volumes, [accuracy[label] for label in range(N_CLASSES)]).statistic
    if math.isnan(expected_rho):
        assert "pmg/spearman/volume" not in scalars
    else:
        assert events.Scalars("pmg/spearman/volume")[-1].value == pytest.approx(expected_rho, abs=1e-6)

    images = set(events.Tags()["images"])
    assert {
        "pmg/figures/curvature",
        "pmg/figures/shape_similarity_matrix",
        "pmg/figures/geometry_vs_accuracy",
    } <= images
    assert "pmg/figures/h1_0" in images
    # Figures are drawn every 5 epochs by default and on the last epoch, which is the second of this run.
    assert [event.step for event in events.Images("pmg/figures/volume")] == [4]
    assert len(events.Tensors("custom_scalars__config__")) == 1  # one layout for the run
    assert "pmg/local_curvature/0" in events.Tags()["histograms"]

    rows = csv_rows(csv_logger.log_dir)
    logged = [float(row["pmg/accuracy/2"]) for row in rows if row.get("pmg/accuracy/2")]
    assert logged == [pytest.approx(value) for value in (events.Scalars("pmg/accuracy/2")[0].value, accuracy[2])]
    assert any(row.get("pmg/curvature/mean") for row in rows)


def test_accuracy_counted_when_forward_is_bypassed(tmp_path):
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0, log_figures=False)
    train, val = loaders()
    model = classifier(pytorch_lightning, call_submodules=True)
    trainer_for(pytorch_lightning, tmp_path, [callback], max_epochs=1).fit(model, train, val)

    assert callback.last_accuracy == pytest.approx(reference_accuracy(model, val))


def test_bad_logits_layer_warns_once(tmp_path):
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0, logits_layer="body.0", log_figures=False)
    train, val = loaders()
    trainer = trainer_for(pytorch_lightning, tmp_path, [callback], max_epochs=1)
    model = classifier(pytorch_lightning)
    # Labels 0-3 fit the 12 columns of body.0, so the labels are offset to exceed them.
    shifted = DataLoader(TensorDataset(val.dataset.tensors[0], val.dataset.tensors[1] + HIDDEN), batch_size=8)
    with pytest.warns(UserWarning, match="could not count per-class accuracy") as caught:
        trainer.fit(model, train, shifted)

    messages = [str(warning.message) for warning in caught if "per-class accuracy" in str(warning.message)]
    assert len(messages) == 1
    assert "'body.0' cannot serve as logits" in messages[0]
    assert callback.last_accuracy is None
    tags = set(read_events(trainer.loggers[0].log_dir).Tags()["scalars"])
    assert "pmg/curvature/mean" in tags
    assert not any(tag.startswith(("pmg/accuracy", "pmg/spearman")) for tag in tags)


def test_accuracy_can_be_switched_off(tmp_path):
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0, log_accuracy=False, log_figures=False)
    train, val = loaders()
    trainer = trainer_for(pytorch_lightning, tmp_path, [callback], max_epochs=1)
    trainer.fit(classifier(pytorch_lightning), train, val)

    events = read_events(trainer.loggers[0].log_dir)
    assert not any(tag.startswith("pmg/accuracy") for tag in events.Tags()["scalars"])
    assert events.Tags()["images"] == []
    assert events.Tags()["tensors"] == []


# -- monitoring ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("package_name", PACKAGES)
def test_early_stopping_monitors_mean_curvature(tmp_path, package_name):
    package = importlib.import_module(package_name)
    geometry = ManifoldGeometryCallback(
        k=K, expensive_every_n_epochs=0, log_figures=False, monitor=["pmg/curvature/mean"]
    )
    # No change of curvature can reach min_delta, so training stops after patience + 1 = 2 checks.
    stopping = package.callbacks.EarlyStopping(monitor="pmg/curvature/mean", mode="min", patience=1, min_delta=10.0)
    train, val = loaders()
    trainer = trainer_for(package, tmp_path, [geometry, stopping], max_epochs=6)
    trainer.fit(classifier(package), train, val)

    assert trainer.current_epoch == 2
    assert stopping.stopped_epoch == 1
    events = read_events(trainer.loggers[0].log_dir)
    logged = [event.value for event in events.Scalars("pmg/curvature/mean")]
    assert len(logged) == 2
    assert float(stopping.best_score) == pytest.approx(logged[0], rel=1e-6)
    assert float(trainer.callback_metrics["pmg/curvature/mean"]) == pytest.approx(logged[-1], rel=1e-6)
    # logger=False: the monitored value reaches the loggers once, from the callback's own log_metrics.
    csv_values = [row["pmg/curvature/mean"] for row in csv_rows(trainer.loggers[1].log_dir)]
    assert len([value for value in csv_values if value]) == 2


def test_model_checkpoint_keeps_largest_volume(tmp_path):
    geometry = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0, log_figures=False, monitor=["pmg/volume/mean"])
    checkpoint = pytorch_lightning.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", monitor="pmg/volume/mean", mode="max", save_top_k=1
    )
    train, val = loaders()
    trainer = trainer_for(pytorch_lightning, tmp_path, [geometry, checkpoint], enable_checkpointing=True)
    trainer.fit(classifier(pytorch_lightning), train, val)

    logged = [event.value for event in read_events(trainer.loggers[0].log_dir).Scalars("pmg/volume/mean")]
    assert len(logged) == 2
    assert float(checkpoint.best_model_score) == pytest.approx(max(logged), rel=1e-6)
    assert Path(checkpoint.best_model_path).is_file()


@pytest.mark.parametrize(
    ("monitor", "error", "match"),
    [
        ("pmg/curvature/mean", TypeError, "list of scalar tags"),
        (["pmg/curvture/mean"], ValueError, "curvture"),
        (["curvature/mean"], ValueError, "<metric>/<class or mean>"),
        (["pmg/holes/mean"], ValueError, "holes"),
    ],
)
def test_invalid_monitor_raises(monitor, error, match):
    with pytest.raises(error, match=match):
        ManifoldGeometryCallback(monitor=monitor, expensive_metrics=())


def test_monitor_accepts_expensive_and_accuracy_tags():
    callback = ManifoldGeometryCallback(monitor=["pmg/holes/mean", "pmg/accuracy/mean", "pmg/spearman/curvature"])
    assert callback.monitor == ("pmg/holes/mean", "pmg/accuracy/mean", "pmg/spearman/curvature")


# -- class names -----------------------------------------------------------------------------------------------------


class NamedDataModule(pytorch_lightning.LightningDataModule):
    classes = ["cat", "dog", "bird", "fish"]

    def train_dataloader(self) -> DataLoader:
        return loaders()[0]

    def val_dataloader(self) -> DataLoader:
        return loaders()[1]


def test_class_names_come_from_datamodule(tmp_path):
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0)
    trainer = trainer_for(pytorch_lightning, tmp_path, [callback], max_epochs=1)
    trainer.fit(classifier(pytorch_lightning), datamodule=NamedDataModule())

    events = read_events(trainer.loggers[0].log_dir)
    scalars = set(events.Tags()["scalars"])
    assert {"pmg/curvature/cat", "pmg/accuracy/fish", "pmg/volume/bird"} <= scalars
    assert not any(tag.endswith("/0") for tag in scalars)
    image = events.Images("pmg/figures/shape_similarity_matrix")[-1]
    assert image.width > 0
    config = events.Tensors("custom_scalars__config__")[-1]
    assert b"cat, dog, bird, fish" in config.tensor_proto.string_val[0]


def test_explicit_class_names_override_datamodule(tmp_path):
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0, class_names={0: "zero"}, log_figures=False)
    trainer = trainer_for(pytorch_lightning, tmp_path, [callback], max_epochs=1)
    trainer.fit(classifier(pytorch_lightning), datamodule=NamedDataModule())

    assert callback.last_report is not None
    assert callback.last_report.class_names == {0: "zero", 1: "1", 2: "2", 3: "3"}
