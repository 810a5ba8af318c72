"""The callback across a training run: checkpoints and resume, hook removal, bounded memory, and faults it survives."""

from __future__ import annotations

import gc
import math
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import callbacks.manifold_geometry as manifold_geometry
from callbacks import ManifoldGeometryCallback
from pmg_torch import EmbeddingCapture

IN_DIM = 8
HIDDEN = 12
N_CLASSES = 3
K = 5
BATCH = 8
ROWS_PER_CLASS = 24
TRAIN_BATCHES = 2


class TinyClassifier(pl.LightningModule):
    """An MLP whose head's input, ``body(x)``, is the layer the callback records by default."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh())
        self.head = nn.Linear(HIDDEN, N_CLASSES)
        self.training_steps = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.training_steps += 1
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class GraphBuildingClassifier(TinyClassifier):
    """Switches itself to train mode and enables gradients in validation, so every forward builds a graph."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.train()
        with torch.enable_grad():
            output = self(batch[0])
        assert output.grad_fn is not None


class TwiceForwardClassifier(TinyClassifier):
    """Runs the model twice per validation batch, as test-time augmentation does."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])
        self(batch[0].flip(0))


class ConvOnly(pl.LightningModule):
    """A model without any nn.Linear, so the callback's default layer does not exist."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv1d(1, 2, kernel_size=3, padding=1), nn.ReLU(), nn.Flatten())
        self.training_steps = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x[:, None, :])

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.training_steps += 1
        return self(batch[0]).mean()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def count_hooks(model: nn.Module) -> int:
    """Forward and forward-pre hooks on every module of ``model``, and the global ones PyTorch keeps."""
    per_module = sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())
    global_hooks = len(nn.modules.module._global_forward_hooks) + len(nn.modules.module._global_forward_pre_hooks)
    return per_module + global_hooks


def labelled_rows(rows_per_class: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(N_CLASSES).repeat_interleave(rows_per_class)
    x = 3.0 * torch.eye(N_CLASSES, IN_DIM)[labels] + torch.randn(labels.shape[0], IN_DIM, generator=generator)
    order = torch.randperm(labels.shape[0], generator=generator)
    return TensorDataset(x[order], labels[order])


def train_loader() -> DataLoader:
    dataset = labelled_rows(8, seed=1)
    return DataLoader(dataset, batch_size=len(dataset) // TRAIN_BATCHES)


def val_loader() -> DataLoader:
    return DataLoader(labelled_rows(ROWS_PER_CLASS, seed=2), batch_size=BATCH)


def make_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "logger": TensorBoardLogger(tmp_path, name="tb", version=0),
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def pmg_steps(log_dir: str | Path, tag: str = "pmg/volume/mean") -> list[int]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return [event.step for event in events.Scalars(tag)]


@pytest.fixture(autouse=True)
def _seed_and_quiet() -> Any:
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pytorch_lightning")
        warnings.filterwarnings("ignore", module="lightning_fabric")
        yield


# -- checkpoints ------------------------------------------------------------------------------------------------------


def test_resumed_run_logs_at_continued_steps(tmp_path: Path) -> None:
    first = ManifoldGeometryCallback(k=K, every_n_epochs=2, expensive_every_n_epochs=0)
    trainer = make_trainer(tmp_path, [first], max_epochs=3, logger=TensorBoardLogger(tmp_path, name="tb", version=0))
    trainer.fit(TinyClassifier(), train_loader(), val_loader())
    checkpoint = tmp_path / "after_three_epochs.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=False)["callbacks"][first.state_key]
    assert saved["n_runs"] == 1

    resumed = ManifoldGeometryCallback(k=K, every_n_epochs=2, expensive_every_n_epochs=0)
    logger = TensorBoardLogger(tmp_path, name="tb", version=1)
    trainer = make_trainer(tmp_path, [resumed], max_epochs=6, logger=logger)
    trainer.fit(TinyClassifier(), train_loader(), val_loader(), ckpt_path=checkpoint)

    # Epochs are 0-based and every second one is measured: epoch 1 before the checkpoint, epochs 3 and 5 after.
    assert pmg_steps(tmp_path / "tb" / "version_0") == [2 * TRAIN_BATCHES]
    assert pmg_steps(tmp_path / "tb" / "version_1") == [4 * TRAIN_BATCHES, 6 * TRAIN_BATCHES]
    assert resumed.n_runs == 3


def test_checkpoint_settings_override_arguments(tmp_path: Path) -> None:
    first = ManifoldGeometryCallback(k=K, metrics=["volume"], expensive_every_n_epochs=0)
    trainer = make_trainer(tmp_path, [first])
    trainer.fit(TinyClassifier(), train_loader(), val_loader())
    checkpoint = tmp_path / "first.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = ManifoldGeometryCallback(k=K + 2, expensive_every_n_epochs=0)
    trainer = make_trainer(tmp_path, [resumed], max_epochs=2, logger=TensorBoardLogger(tmp_path, name="tb", version=1))
    with pytest.warns(UserWarning, match=f"k={K}"):
        trainer.fit(TinyClassifier(), train_loader(), val_loader(), ckpt_path=checkpoint)
    assert resumed.k == K
    assert resumed.last_report is not None
    assert resumed.last_report.metrics == ["volume"]


# -- hooks ------------------------------------------------------------------------------------------------------------


class HookCounter(Callback):
    """Counts the model's hooks at every validation batch end, and can raise there."""

    def __init__(self, raise_at_batch: int | None = None, exception: BaseException | None = None) -> None:
        self.raise_at_batch = raise_at_batch
        self.exception = exception
        self.hooks_seen: list[int] = []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, *rest: Any
    ):
        self.hooks_seen.append(count_hooks(pl_module))
        if batch_idx == self.raise_at_batch and self.exception is not None:
            raise self.exception


def test_hooks_removed_after_fit_validate_test_and_predict(tmp_path: Path) -> None:
    counter = HookCounter()
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0)
    model = TinyClassifier()
    trainer = make_trainer(tmp_path, [callback, counter])
    trainer.fit(model, train_loader(), val_loader())
    assert count_hooks(model) == 0
    trainer.validate(model, val_loader())
    assert count_hooks(model) == 0
    trainer.test(model, val_loader())
    trainer.predict(model, val_loader())
    assert count_hooks(model) == 0
    # The hook was there while validation batches ran, so the zeros above are removals.
    assert counter.hooks_seen
    assert set(counter.hooks_seen) == {2}  # the embedding hook and the accuracy hook


@pytest.mark.parametrize(
    "exception", [RuntimeError("a failure in another callback"), KeyboardInterrupt()], ids=["error", "interrupt"]
)
def test_hooks_removed_after_exception_mid_validation(tmp_path: Path, exception: BaseException) -> None:
    counter = HookCounter(raise_at_batch=1, exception=exception)
    callback = ManifoldGeometryCallback(k=K)
    model = TinyClassifier()
    trainer = make_trainer(tmp_path, [callback, counter])
    if isinstance(exception, KeyboardInterrupt):
        # Lightning catches the interrupt, runs on_exception and teardown, ignores further SIGINTs and exits.
        handler = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(SystemExit):
                trainer.fit(model, train_loader(), val_loader())
        finally:
            signal.signal(signal.SIGINT, handler)
        assert trainer.interrupted
    else:
        with pytest.raises(RuntimeError, match="another callback"):
            trainer.fit(model, train_loader(), val_loader())
    assert counter.hooks_seen == [2, 2]  # the embedding hook and the accuracy hook
    assert count_hooks(model) == 0


def test_teardown_removes_attached_hook() -> None:
    model = TinyClassifier()
    callback = ManifoldGeometryCallback(k=K)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    callback._capture = EmbeddingCapture(model)
    callback._capture.attach()
    assert count_hooks(model) == 1
    callback.teardown(trainer, model, "fit")
    assert count_hooks(model) == 0


def test_training_error_after_validation_leaves_no_hook(tmp_path: Path) -> None:
    class FailsInSecondEpoch(TinyClassifier):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if self.current_epoch == 1:
                raise RuntimeError("training failed on purpose")
            return super().training_step(batch, batch_idx)

    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0)
    model = FailsInSecondEpoch()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    with pytest.raises(RuntimeError, match="on purpose"):
        trainer.fit(model, train_loader(), val_loader())
    assert callback.n_runs == 1
    assert count_hooks(model) == 0


# -- memory -----------------------------------------------------------------------------------------------------------


class StorageSpy(Callback):
    """Records, at each validation batch end and epoch end, what the callback's capture holds."""

    def __init__(self, callback: ManifoldGeometryCallback) -> None:
        self.callback = callback
        self.stored_with_graph: list[bool] = []
        self.rows_at_epoch_end: list[dict[int, int]] = []
        self.live_tensors: list[int] = []

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, *rest: Any
    ):
        capture = self.callback._capture
        assert capture is not None
        for rows in capture.embeddings.values():
            self.stored_with_graph.append(rows.grad_fn is not None or rows.requires_grad)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        # Listed before the callback, so this runs while the capture still contains the epoch's rows.
        capture = self.callback._capture
        assert capture is not None
        self.rows_at_epoch_end.append({label: int(rows.shape[0]) for label, rows in capture.embeddings.items()})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        gc.collect()
        with warnings.catch_warnings():
            # isinstance on some of torch's deprecated module attributes issues a FutureWarning.
            warnings.simplefilter("ignore")
            self.live_tensors.append(sum(1 for obj in gc.get_objects() if isinstance(obj, Tensor)))


def test_train_mode_graph_does_not_grow_memory(tmp_path: Path) -> None:
    max_per_class = 10
    callback = ManifoldGeometryCallback(k=K, max_per_class=max_per_class, expensive_every_n_epochs=0)
    spy = StorageSpy(callback)
    model = GraphBuildingClassifier()
    # Without inference mode, validation_step can turn gradients back on, as a model in train mode by mistake does.
    trainer = make_trainer(tmp_path, [spy, callback], max_epochs=3, inference_mode=False)
    trainer.fit(model, train_loader(), val_loader())

    assert spy.stored_with_graph
    assert not any(spy.stored_with_graph)
    assert spy.rows_at_epoch_end == [{label: max_per_class for label in range(N_CLASSES)}] * 3
    # The count of live tensors settles after the first epoch instead of growing with every validation.
    assert spy.live_tensors[2] <= spy.live_tensors[1]
    report = callback.last_report
    assert report is not None
    for local in report.local_curvature.values():
        assert local.grad_fn is None
        assert not local.requires_grad
    assert all(math.isfinite(value) for value in report.values["volume"].values())


def test_capture_does_not_keep_the_graph_alive() -> None:
    model = TinyClassifier().train()
    capture = EmbeddingCapture(model, max_per_class=4)
    activations = []
    model.body.register_forward_hook(lambda module, args, output: activations.append(output))
    with capture:
        capture.set_labels(torch.zeros(6, dtype=torch.long))
        model(torch.randn(6, IN_DIM))
    assert activations[0].grad_fn is not None
    stored = capture.embeddings[0]
    assert stored.grad_fn is None
    assert not stored.requires_grad
    assert stored.untyped_storage().data_ptr() != activations[0].untyped_storage().data_ptr()


# -- configuration errors -------------------------------------------------------------------------------------------


def test_model_without_linear_fails_before_training(tmp_path: Path) -> None:
    model = ConvOnly()
    trainer = make_trainer(tmp_path, [ManifoldGeometryCallback(k=K)])
    with pytest.raises(ValueError, match="no nn.Linear") as raised:
        trainer.fit(model, train_loader(), val_loader())
    message = str(raised.value)
    for name in ("'features'", "'features.0'", "'features.1'", "'features.2'"):
        assert name in message
    assert model.training_steps == 0
    assert count_hooks(model) == 0


def test_model_without_linear_fails_in_validate(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, [ManifoldGeometryCallback(k=K)])
    with pytest.raises(ValueError, match="'features.0'"):
        trainer.validate(ConvOnly(), val_loader())


def test_named_layer_of_model_without_linear_is_recorded(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(layer="features", k=K, expensive_every_n_epochs=0)
    trainer = make_trainer(tmp_path, [callback])
    trainer.validate(ConvOnly(), val_loader())
    assert callback.last_report is not None
    assert callback.last_report.n_samples == {label: ROWS_PER_CLASS for label in range(N_CLASSES)}


# -- faults the run survives ----------------------------------------------------------------------------------------


def stopped_recording(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "stopped recording" in str(w.message)]


def test_layer_run_twice_per_forward_warns_and_training_continues(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K, expensive_every_n_epochs=0)
    model = TwiceForwardClassifier()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_loader(), val_loader())

    messages = stopped_recording(caught)
    assert len(messages) == 2, messages
    assert "without labels" in messages[0]
    assert model.training_steps == 2 * TRAIN_BATCHES
    assert pmg_steps(trainer.logger.log_dir) == []
    assert callback.n_runs == 2
    assert count_hooks(model) == 0


def test_unreadable_labels_warn_and_training_continues(tmp_path: Path) -> None:
    callback = ManifoldGeometryCallback(k=K, label_key="missing", expensive_every_n_epochs=0)
    model = TinyClassifier()
    trainer = make_trainer(tmp_path, [callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_loader(), val_loader())

    messages = stopped_recording(caught)
    assert len(messages) == 1, messages
    assert "label_key='missing'" in messages[0]
    assert model.training_steps == TRAIN_BATCHES
    assert count_hooks(model) == 0


def test_failing_metric_code_warns_and_training_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_analyze(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a defect in metric code")

    monkeypatch.setattr(manifold_geometry, "analyze", broken_analyze)
    callback = ManifoldGeometryCallback(k=K)
    model = TinyClassifier()
    trainer = make_trainer(tmp_path, [callback], max_epochs=2)
    with pytest.warns(RuntimeWarning, match="ZeroDivisionError: a defect in metric code"):
        trainer.fit(model, train_loader(), val_loader())
    assert model.training_steps == 2 * TRAIN_BATCHES
    assert callback.last_report is None


# -- capture-level contracts the callback relies on ----------------------------------------------------------------


def test_capture_stop_mode_removes_hook_and_keeps_error() -> None:
    model = TinyClassifier()
    capture = EmbeddingCapture(model, on_error="stop")
    capture.attach()
    capture.set_labels(torch.tensor([0, 1]))
    model(torch.randn(3, IN_DIM))  # three rows for two labels
    assert isinstance(capture.error, ValueError)
    assert "3 rows" in str(capture.error)
    assert not capture.attached
    assert count_hooks(model) == 0


def test_capture_raise_mode_raises_from_forward() -> None:
    model = TinyClassifier()
    with EmbeddingCapture(model) as capture, pytest.raises(ValueError, match="without labels"):
        model(torch.randn(3, IN_DIM))
    assert capture.error is None
    assert count_hooks(model) == 0


def test_capture_keep_mask_drops_rows_before_sampling() -> None:
    model = TinyClassifier()
    x = torch.randn(5, IN_DIM)
    with EmbeddingCapture(model) as capture:
        capture.set_labels(torch.tensor([0, 1, 0, 1, 0]), keep=torch.tensor([True, True, False, True, False]))
        model(x)
    expected = model.body(x).detach()
    assert torch.equal(capture.embeddings[0], expected[[0]])
    assert torch.equal(capture.embeddings[1], expected[[1, 3]])
    assert capture.n_seen == {0: 1, 1: 2}


@pytest.mark.parametrize(
    ("keep", "error", "match"),
    [
        ([True, False], TypeError, "bool tensor"),
        (torch.tensor([1, 0]), TypeError, "bool tensor"),
        (torch.tensor([True]), ValueError, r"shape \(2,\)"),
    ],
)
def test_capture_keep_mask_is_checked(keep: Any, error: type[Exception], match: str) -> None:
    capture = EmbeddingCapture(TinyClassifier())
    with pytest.raises(error, match=match):
        capture.set_labels(torch.tensor([0, 1]), keep=keep)


def test_capture_rejects_unknown_on_error() -> None:
    with pytest.raises(ValueError, match="on_error"):
        EmbeddingCapture(TinyClassifier(), on_error="ignore")


def test_real_sample_count_follows_distributed_sampler() -> None:
    from torch.utils.data import DistributedSampler

    dataset = TensorDataset(torch.zeros(7, 1))
    for rank, expected in ((0, 4), (1, 3)):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False)
        assert len(sampler) == 4
        assert manifold_geometry.real_sample_count(DataLoader(dataset, sampler=sampler)) == expected
    dropping = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False, drop_last=True)
    assert manifold_geometry.real_sample_count(DataLoader(dataset, sampler=dropping)) is None
    assert manifold_geometry.real_sample_count(DataLoader(dataset)) is None
