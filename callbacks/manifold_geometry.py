"""Lightning callback that measures each class's perceptual manifold at the end of validation epochs.

During a validation epoch that is due, :class:`ManifoldGeometryCallback` keeps an
:class:`pmg_torch.EmbeddingCapture` hook on one layer of the model and hands it the labels of every batch. At the
end of the epoch it removes the hook, gathers the rows of every class from all ranks, computes the per-class
geometry with :func:`pmg_torch.analyze` on rank zero, and sends the numbers to the trainer's loggers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from pmg_torch._validation import DegenerateInputWarning, check_positive_int
from pmg_torch.accuracy import ACCURACY_TAG, SPEARMAN_TAG, AccuracyCapture, accuracy_scalars
from pmg_torch.analysis import AVAILABLE_METRICS, DEFAULT_METRICS, ManifoldReport, analyze
from pmg_torch.capture import EmbeddingCapture
from pmg_torch.tensorboard import write_local_curvature_histograms
from pmg_torch.views import write_figures, write_layout

from .packages import CallbackBase, tensorboard_writers

log = logging.getLogger(__name__)

#: Keys searched, in this order, for the labels of a dict batch when ``label_key`` is not given.
LABEL_KEYS = ("label", "labels", "y", "target", "targets")

#: Tag prefix of everything the callback logs.
TAG_PREFIX = "pmg"

#: Metrics measured on every run by default. Shape similarity costs 5 to 8% of the package defaults, measured with
#: analyze on 10 classes of 55 x 64 and of 1000 x 512 rows and on 100 classes of 200 x 512, on a 2-core CPU.
CALLBACK_METRICS = (*DEFAULT_METRICS, "shape_similarity")

#: Datamodule attributes searched, in this order, for class names when ``class_names`` is not given.
CLASS_NAME_ATTRIBUTES = ("class_names", "classes")


class ManifoldGeometryCallback(CallbackBase):
    """Log the geometry of every class's embeddings (curvature, volume, intrinsic dimension, ...) while training.

    A perceptual manifold is the cloud ``Z_c`` of shape ``(m_c, D)`` of one layer's rows for the validation samples
    of class ``c``. On every validation epoch that is due, the callback records those rows, computes the metrics of
    :func:`pmg_torch.analyze` per class and logs ``pmg/<metric>/<class>`` and ``pmg/<metric>/mean`` scalars to
    every logger of the trainer at ``trainer.global_step``. The last report stays in :attr:`last_report`.

    Per-class accuracy comes from the same forward passes. The callback hooks the output of ``logits_layer``, by
    default the last ``nn.Linear``, whose input is the recorded embedding, and takes its argmax as the prediction.
    It logs ``pmg/accuracy/<class>``, ``pmg/accuracy/mean`` (the balanced accuracy) and, over the classes,
    ``pmg/spearman/<metric>``, the Spearman rank correlation of each metric with accuracy. A correlation needs at
    least 3 classes with both values and is not logged otherwise, nor when every class has the same accuracy.
    ``validation_step`` may return anything or nothing. The latest accuracy stays in :attr:`last_accuracy`.

    TensorBoard loggers, of either Lightning package, also get a histogram ``pmg/local_curvature/<class>`` of the
    per-point curvature, images under ``pmg/figures/`` on the schedule of ``figures_every_n_epochs`` (a bar chart
    per metric, the shape-similarity heatmap, each metric against accuracy, and the H1 persistence diagrams on runs
    with holes), and once per run a custom-scalars layout with one chart per metric that holds every class and the
    mean. Other loggers, such as ``CSVLogger``, get the scalars only. Class names come from ``class_names``, or else from the datamodule's
    ``class_names`` or ``classes`` attribute, and replace the labels in tags and figures.

    To stop early or checkpoint on a geometry scalar, name its tag in ``monitor``: the callback then also logs it
    with ``pl_module.log(tag, value, logger=False)``, which puts it in ``trainer.callback_metrics`` on every rank,
    where ``EarlyStopping`` and ``ModelCheckpoint`` read it. On epochs the callback does not measure, Lightning
    keeps the previous value there, so give ``EarlyStopping`` the same schedule as ``every_n_epochs``, or its
    patience counts repeats. A NaN value is passed on as NaN.

    When it runs:

    * inside ``trainer.fit``, on the validation epochs of training epochs ``e`` (0-based) with
      ``(e + 1) % every_n_epochs == 0``, counted as ``Trainer(check_val_every_n_epoch=...)`` counts them. Lightning's
      sanity check before training is never measured.
    * on every ``trainer.validate`` call. Such a call is a one-off evaluation, so it also includes the expensive
      metrics when they are switched on.
    * The ``expensive_metrics`` (persistent homology and projected convex hulls cost far more than the rest) are
      added on the runs of epochs with ``(e + 1) % expensive_every_n_epochs == 0``. They are only added to a run
      that happens anyway, so ``expensive_every_n_epochs`` should be a multiple of ``every_n_epochs``.

    Labels come from the batch. A tuple or list batch has them as its second element. A dict batch has them under
    ``label_key``, or else under the first key present of ``"label"``, ``"labels"``, ``"y"``, ``"target"`` and
    ``"targets"``. A callable ``label_key`` is called on the batch and returns them. With several validation
    dataloaders, the rows of all of them are pooled per class.

    Under distributed training every rank records its own rows and the rows are gathered to rank zero through the
    strategy's ``all_gather``, and each class is cut back to ``max_per_class`` rows by a seeded uniform draw. A
    ``DistributedSampler`` without ``drop_last`` repeats samples to give every rank the same count. Those repeats
    come last on their rank, so each rank records only its first ``len(range(rank, len(dataset), world_size))``
    samples, and the classes equal those of a single process on the same validation set.

    Args:
        layer: the layer to record, as for :class:`pmg_torch.EmbeddingCapture`: a dotted module name, a module
            inside the LightningModule, or ``None`` for the input of its last ``nn.Linear``.
        every_n_epochs: measure every this many training epochs.
        k: neighbours per point for curvature and the kNN intrinsic-dimension estimators. Classes with fewer
            than ``k + 1`` distinct rows give NaN for those metrics.
        max_per_class: most rows kept per class and rank, by reservoir sampling.
        metrics: metric names measured on every run; ``None`` means :data:`CALLBACK_METRICS`, which is
            :data:`pmg_torch.DEFAULT_METRICS` and ``"shape_similarity"``.
        expensive_metrics: metric names added only every ``expensive_every_n_epochs`` epochs.
        expensive_every_n_epochs: the schedule of ``expensive_metrics``; ``0`` or ``None`` switches them off.
        log_histograms: whether TensorBoard loggers get per-point curvature histograms.
        class_names: display names of the classes, as a mapping from label or a sequence indexed by label;
            ``None`` looks for them on the datamodule.
        label_key: where the labels are in a dict batch, or a callable ``batch -> labels``.
        seed: seed of the row sampling and of the seeded metrics.
        log_figures: whether TensorBoard loggers get the figures and the custom-scalars layout.
        figures_every_n_epochs: draw the figures on the runs of epochs with ``(e + 1) % figures_every_n_epochs ==
            0``, on the run of the last epoch (``e + 1 == max_epochs``) and on every ``trainer.validate`` call.
            Drawing them with matplotlib takes about a second on a 2-core CPU, far more than the metrics of a
            small model, so by default they are drawn every 5 epochs. The layout is written on every run.
        log_accuracy: whether to count per-class accuracy and log it with its Spearman correlations.
        logits_layer: the layer whose output are the logits, as for :class:`pmg_torch.AccuracyCapture`: a
            dotted module name (``""`` for the LightningModule's own output), a module, or ``None`` for the output
            of the last ``nn.Linear``.
        monitor: scalar tags, such as ``"pmg/curvature/mean"``, to put in ``trainer.callback_metrics``.

    Raises:
        TypeError: if an argument has the wrong type.
        ValueError: if a number is out of range, a metric name is unknown, or a ``monitor`` tag names no metric
            the callback logs; and when fitting or validation starts, if ``layer`` or ``logits_layer`` names no
            module of the model, or ``layer`` is ``None`` and the model has no ``nn.Linear``. The message lists the
            layer names the model has.

    Warns:
        DegenerateInputWarning: from :func:`pmg_torch.analyze`, once per class and metric that is NaN, and once per
            run that captured no rows at all.
        UserWarning: once per rank and epoch whose recording stopped because a batch's labels could not be read or
            the layer's rows could not be recorded (for example a layer that runs twice per forward). Nothing is
            logged for that epoch on any rank, and training continues.
        RuntimeWarning: when computing the geometry failed for a reason other than degenerate data. Nothing is
            logged for that epoch, and training continues.
        UserWarning: once per epoch whose accuracy could not be counted (the logits layer's output is not
            ``(B, C)`` logits for the labels), and once if ``logits_layer`` is ``None`` and the model has no
            ``nn.Linear``. The geometry is logged without accuracy.

    Example::

        trainer = pl.Trainer(callbacks=[ManifoldGeometryCallback(k=10)])
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].last_report.table())
    """

    def __init__(
        self,
        layer: str | nn.Module | None = None,
        every_n_epochs: int = 1,
        k: int = 20,
        max_per_class: int = 1000,
        metrics: Sequence[str] | None = None,
        expensive_metrics: Sequence[str] | None = ("holes", "nonconvexity"),
        expensive_every_n_epochs: int | None = 5,
        log_histograms: bool = True,
        class_names: Mapping[int, str] | Sequence[str] | None = None,
        label_key: str | Callable[[Any], Any] | None = None,
        seed: int = 0,
        log_figures: bool = True,
        figures_every_n_epochs: int = 5,
        log_accuracy: bool = True,
        logits_layer: str | nn.Module | None = None,
        monitor: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if layer is not None and not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"Expected `layer` to be a module name, an nn.Module or None, got {type(layer).__name__}.")
        if label_key is not None and not isinstance(label_key, str) and not callable(label_key):
            raise TypeError(
                f"Expected `label_key` to be a dict key (str), a callable batch -> labels, or None, "
                f"got {type(label_key).__name__}."
            )
        if class_names is not None and (
            isinstance(class_names, str) or not isinstance(class_names, (Mapping, Sequence))
        ):
            raise TypeError(
                "Expected `class_names` to be a mapping from label to name, a sequence of names indexed by label, "
                f"or None, got {type(class_names).__name__}."
            )
        flags = {"log_histograms": log_histograms, "log_figures": log_figures, "log_accuracy": log_accuracy}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"Expected `{name}` to be a bool, got {type(flag).__name__}.")
        if logits_layer is not None and not isinstance(logits_layer, (str, nn.Module)):
            raise TypeError(
                f"Expected `logits_layer` to be a module name, an nn.Module or None, got {type(logits_layer).__name__}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Expected `seed` to be a non-negative int, got {seed!r}.")
        self.layer = layer
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs")
        self.k = check_positive_int(k, "k")
        if self.k < 2:
            # TLE, MLE and tangent spaces need at least two neighbours; failing here beats a warning every epoch.
            raise ValueError(f"Expected `k` to be at least 2, got {k}.")
        self.max_per_class = check_positive_int(max_per_class, "max_per_class")
        self.metrics = _check_metric_names(CALLBACK_METRICS if metrics is None else metrics, "metrics")
        self.expensive_metrics = _check_metric_names(expensive_metrics or (), "expensive_metrics")
        if expensive_every_n_epochs is None or expensive_every_n_epochs == 0:
            self.expensive_every_n_epochs = 0
        else:
            self.expensive_every_n_epochs = check_positive_int(expensive_every_n_epochs, "expensive_every_n_epochs")
        self.log_histograms = log_histograms
        self.class_names = class_names
        self.label_key = label_key
        self.seed = seed
        self.log_figures = log_figures
        self.figures_every_n_epochs = check_positive_int(figures_every_n_epochs, "figures_every_n_epochs")
        self.log_accuracy = log_accuracy
        self.logits_layer = logits_layer
        self.monitor = self._check_monitor(monitor)

        #: The report of the latest run on rank zero. It is ``None`` before the first run and on other ranks.
        self.last_report: ManifoldReport | None = None
        #: Per-class validation accuracy of the latest run on rank zero, or ``None``.
        self.last_accuracy: dict[int, float] | None = None
        self._capture: EmbeddingCapture | None = None
        self._accuracy: AccuracyCapture | None = None
        self._warned_no_logits = False
        # Every scalar of the latest run, NaN included, by tag: the source of the monitored values.
        self._logged: dict[str, float] = {}
        self._run_expensive = False
        self._draw_figures = False
        self._n_runs = 0
        # Per validation dataloader: samples this rank has seen this epoch, and how many of its samples are real.
        self._samples_seen: dict[int, int] = {}
        self._real_samples: dict[int, int | None] = {}

    # -- schedule ---------------------------------------------------------------------------------------------------

    @property
    def n_runs(self) -> int:
        """Number of validation epochs measured so far, restored from checkpoints."""
        return self._n_runs

    @property
    def state_key(self) -> str:
        # Two callbacks watching different layers need separate entries in a checkpoint.
        layer = self.layer if self.layer is None or isinstance(self.layer, str) else type(self.layer).__name__
        return self._generate_state_key(layer=layer)

    def _is_due(self, trainer: pl.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        if trainer.state.fn != TrainerFn.FITTING:
            return False
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _expensive_is_due(self, trainer: pl.Trainer) -> bool:
        if not self.expensive_metrics or not self.expensive_every_n_epochs:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        return (trainer.current_epoch + 1) % self.expensive_every_n_epochs == 0

    def _figures_are_due(self, trainer: pl.Trainer) -> bool:
        if not self.log_figures:
            return False
        if trainer.state.fn == TrainerFn.VALIDATING:
            return True
        epoch = trainer.current_epoch + 1
        return epoch % self.figures_every_n_epochs == 0 or epoch == trainer.max_epochs

    def _metrics_for_run(self) -> tuple[str, ...]:
        if not self._run_expensive:
            return self.metrics
        extra = tuple(name for name in self.expensive_metrics if name not in self.metrics)
        return self.metrics + extra

    # -- hooks ------------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Resolving the layer now makes a model without it fail before training, not after the first epoch.
        EmbeddingCapture(pl_module, self.layer, self.max_per_class, seed=self.seed)
        if self.log_accuracy and self.logits_layer is not None:
            AccuracyCapture(pl_module, self.logits_layer)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hook()
        if not self._is_due(trainer):
            return
        self._run_expensive = self._expensive_is_due(trainer)
        self._draw_figures = self._figures_are_due(trainer)
        self._samples_seen, self._real_samples = {}, {}
        self._capture = EmbeddingCapture(pl_module, self.layer, self.max_per_class, seed=self.seed, on_error="stop")
        self._capture.attach()
        self._accuracy = self._start_accuracy(pl_module)

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._capture is None or self._capture.error is not None:
            return
        try:
            # Both captures need the labels on the host (the sampling draws, the label range check), so they cross
            # there once per batch, here.
            labels = self._labels_from_batch(batch).detach().cpu()
            keep = self._padding_mask(trainer, dataloader_idx, labels.shape[0])
            self._capture.set_labels(labels, keep=keep)
            if self._accuracy is not None and self._accuracy.error is None:
                self._accuracy.set_labels(labels, keep=keep)
        except Exception as error:
            # A batch whose labels cannot be read stops this epoch's recording instead of ending the training run.
            # on_validation_epoch_end then warns about it.
            self._capture.stop(error)

    def _padding_mask(self, trainer: pl.Trainer, dataloader_idx: int, batch_size: int) -> Tensor | None:
        """Return which samples of the batch are real, or ``None`` when none is a distributed sampler's repeat."""
        first = self._samples_seen.get(dataloader_idx, 0)
        self._samples_seen[dataloader_idx] = first + batch_size
        if dataloader_idx not in self._real_samples:
            self._real_samples[dataloader_idx] = real_sample_count(_validation_loader(trainer, dataloader_idx))
        n_real = self._real_samples[dataloader_idx]
        if n_real is None or first + batch_size <= n_real:
            return None
        return torch.arange(first, first + batch_size) < n_real

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture is None:
            return
        self._logged = {}
        self._measure_epoch(trainer, pl_module)
        if self.monitor:
            self._log_monitored(trainer, pl_module)

    def _measure_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        capture, accuracy_capture = self._capture, self._accuracy
        if capture is None:
            return
        self._remove_hook()
        # Every rank takes part in each collective whatever it captured, because a rank that skipped one would leave
        # the others waiting in it.
        failure = capture.error
        clouds: dict[int, Tensor] = {}
        try:
            clouds = gather_class_rows(
                {} if failure else capture.embeddings, trainer.strategy.all_gather, trainer.world_size, pl_module.device
            )
        except ValueError as error:
            # Rows of different widths on different ranks: every rank sees the same sizes and stops here alike.
            failure = failure or error
        any_failure = trainer.strategy.reduce_boolean_decision(failure is not None, all=False)
        accuracy = self._gather_accuracy(trainer, pl_module, accuracy_capture, warn=failure is None)
        self._n_runs += 1
        if failure is not None:
            warnings.warn(
                f"ManifoldGeometryCallback stopped recording layer {capture.layer_name!r} at epoch "
                f"{trainer.current_epoch} on rank {trainer.global_rank}: {failure} Nothing is logged for this epoch, "
                "and training continues.",
                UserWarning,
                stacklevel=2,
            )
        if not trainer.is_global_zero or any_failure:
            return
        if trainer.world_size > 1:
            clouds = _cut_to_max_per_class(clouds, self.max_per_class, self.seed)
        if not clouds:
            warnings.warn(
                f"ManifoldGeometryCallback captured no rows on layer {capture.layer_name!r} at epoch "
                f"{trainer.current_epoch}, so nothing was logged; check that validation batches reach that layer.",
                DegenerateInputWarning,
                stacklevel=2,
            )
            return
        class_names = self._class_names(trainer)
        try:
            report = analyze(clouds, k=self.k, metrics=self._metrics_for_run(), class_names=class_names, seed=self.seed)
        except Exception as error:
            # The monitor must never end a training run. Degenerate data already gives NaN inside analyze, so an
            # error here is a defect in metric code, reported in full but not raised.
            log.exception("ManifoldGeometryCallback failed to compute the geometry at epoch %d.", trainer.current_epoch)
            warnings.warn(
                f"ManifoldGeometryCallback failed to compute the geometry at epoch {trainer.current_epoch} "
                f"({type(error).__name__}: {error}), so nothing was logged for it; training continues.",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        self.last_report = report
        self.last_accuracy = accuracy
        self._log_report(trainer, report, accuracy)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hook()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._accuracy is not None:
            self._accuracy.remove()
            self._accuracy = None

    # -- labels -----------------------------------------------------------------------------------------------------

    def _labels_from_batch(self, batch: Any) -> Tensor:
        """Return the class labels of ``batch`` as a tensor, found as the class docstring describes."""
        if callable(self.label_key):
            labels = self.label_key(batch)
        elif isinstance(batch, Mapping):
            labels = batch[self._dict_label_key(batch)]
        elif isinstance(self.label_key, str):
            raise ValueError(
                f"`label_key={self.label_key!r}` needs dict batches, but the validation batch is a "
                f"{type(batch).__name__}; pass a callable `label_key` to pick the labels out of it."
            )
        elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
            labels = batch[1]
        else:
            raise ValueError(
                f"Cannot find class labels in a validation batch of type {type(batch).__name__}: expected a "
                "(inputs, labels, ...) tuple or list, or a dict; otherwise pass `label_key` as a callable "
                "batch -> labels."
            )
        return labels if isinstance(labels, Tensor) else torch.as_tensor(labels)

    def _dict_label_key(self, batch: Mapping[Any, Any]) -> Any:
        if self.label_key is not None:
            if self.label_key not in batch:
                raise ValueError(
                    f"`label_key={self.label_key!r}` not found in the validation batch; its keys are {list(batch)}."
                )
            return self.label_key
        for key in LABEL_KEYS:
            if key in batch:
                return key
        raise ValueError(
            f"Cannot find class labels in a dict validation batch with keys {list(batch)}: expected one of "
            f"{list(LABEL_KEYS)}. Pass `label_key` to name the key."
        )

    # -- logging ----------------------------------------------------------------------------------------------------

    def _log_report(self, trainer: pl.Trainer, report: ManifoldReport, accuracy: dict[int, float] | None) -> None:
        scalars = report.scalars(prefix=TAG_PREFIX)
        if accuracy is not None:
            scalars.update(accuracy_scalars(report, accuracy, TAG_PREFIX))
        finite = {tag: value for tag, value in scalars.items() if math.isfinite(value)}
        if len(finite) < len(scalars):
            # TensorBoard cannot draw a NaN point, so undefined values are left out, as write_report does.
            # The DegenerateInputWarning from analyze has already named each of them.
            log.info(
                "Left out %d non-finite scalars of %d at step %d.",
                len(scalars) - len(finite),
                len(scalars),
                trainer.global_step,
            )
        for logger in trainer.loggers:
            logger.log_metrics(finite, step=trainer.global_step)
        self._logged = scalars
        for writer in tensorboard_writers(trainer):
            if self.log_histograms:
                write_local_curvature_histograms(writer, report, trainer.global_step, TAG_PREFIX)
            if self.log_figures:
                self._write_views(writer, report, accuracy, trainer.global_step)

    def _write_views(self, writer: Any, report: ManifoldReport, accuracy: dict[int, float] | None, step: int) -> None:
        try:
            # The layout names every metric the callback can log, so one layout serves the whole run.
            class_tags = list(report.tag_names().values())
            write_layout(writer, self._logged_metrics(), class_tags, TAG_PREFIX, accuracy=self.log_accuracy)
            if self._draw_figures:
                write_figures(writer, report, step, TAG_PREFIX, accuracy)
        except Exception as error:
            # Drawing is the least essential output, so a failure in it must not end the training run.
            log.exception("ManifoldGeometryCallback failed to write its figures at step %d.", step)
            warnings.warn(
                f"ManifoldGeometryCallback failed to write its figures at step {step} "
                f"({type(error).__name__}: {error}); the scalars were logged and training continues.",
                RuntimeWarning,
                stacklevel=2,
            )

    def _logged_metrics(self) -> list[str]:
        expensive = self.expensive_metrics if self.expensive_every_n_epochs else ()
        return [name for name in AVAILABLE_METRICS if name in self.metrics or name in expensive]

    def _class_names(self, trainer: pl.Trainer) -> Mapping[int, str] | Sequence[str] | None:
        """Return ``class_names``, or else the first datamodule attribute of :data:`CLASS_NAME_ATTRIBUTES` that
        is a mapping or a sequence of names."""
        if self.class_names is not None:
            return self.class_names
        datamodule = getattr(trainer, "datamodule", None)
        for attribute in CLASS_NAME_ATTRIBUTES:
            names = getattr(datamodule, attribute, None)
            if isinstance(names, Mapping) or (isinstance(names, Sequence) and not isinstance(names, str)):
                return names
        return None

    # -- accuracy ---------------------------------------------------------------------------------------------------

    def _start_accuracy(self, pl_module: pl.LightningModule) -> AccuracyCapture | None:
        if not self.log_accuracy:
            return None
        try:
            capture = AccuracyCapture(pl_module, self.logits_layer)
        except ValueError as error:
            # With the default layer this means the model has no nn.Linear: the geometry is still measured.
            if not self._warned_no_logits:
                warnings.warn(
                    f"ManifoldGeometryCallback logs no per-class accuracy: {error} Pass `logits_layer` to name the "
                    "layer that outputs the logits, or `log_accuracy=False`.",
                    UserWarning,
                    stacklevel=2,
                )
                self._warned_no_logits = True
            return None
        capture.attach()
        return capture

    def _gather_accuracy(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, capture: AccuracyCapture | None, warn: bool
    ) -> dict[int, float] | None:
        """Sum the per-class counts of every rank and return the accuracy, or ``None`` if any rank has none.

        Every rank must call this, because it runs two collectives when ``log_accuracy`` is set.
        """
        if not self.log_accuracy:
            return None
        usable = capture is not None and capture.error is None
        counts: dict[int, Tensor] = {}
        if capture is not None and usable:
            correct = capture.accuracy.correct
            counts = {
                label: torch.tensor([[correct[label], total]], dtype=torch.float64)
                for label, total in capture.accuracy.total.items()
            }
        # Counts travel as float32 rows, exact below 2**24 samples of a class on one rank.
        gathered = gather_class_rows(counts, trainer.strategy.all_gather, trainer.world_size, pl_module.device)
        all_usable = trainer.strategy.reduce_boolean_decision(usable, all=True)
        if capture is not None and capture.error is not None and warn:
            warnings.warn(
                f"ManifoldGeometryCallback could not count per-class accuracy at epoch {trainer.current_epoch} on "
                f"rank {trainer.global_rank}: {capture.error} The geometry is logged without accuracy; pass "
                "`logits_layer` to name the layer that outputs the logits, or `log_accuracy=False`.",
                UserWarning,
                stacklevel=3,
            )
        if not all_usable:
            return None
        accuracy = {}
        for label, rows in gathered.items():
            correct_total, total = rows.double().sum(dim=0).tolist()
            accuracy[label] = correct_total / total
        return accuracy

    # -- monitoring -------------------------------------------------------------------------------------------------

    def _check_monitor(self, monitor: Any) -> tuple[str, ...]:
        if isinstance(monitor, str) or not isinstance(monitor, Sequence):
            raise TypeError(
                f"Expected `monitor` to be a list of scalar tags such as ['pmg/curvature/mean'], got "
                f"{type(monitor).__name__} ({monitor!r})."
            )
        logged = set(self.metrics) | set(self.expensive_metrics)
        if self.log_accuracy:
            logged |= {ACCURACY_TAG, SPEARMAN_TAG}
        for tag in monitor:
            parts = tag.split("/") if isinstance(tag, str) else []
            if len(parts) != 3 or parts[0] != TAG_PREFIX or parts[1] not in logged or not parts[2]:
                raise ValueError(
                    f"Expected each `monitor` tag to be '{TAG_PREFIX}/<metric>/<class or mean>' with a metric the "
                    f"callback logs, one of {sorted(logged)}; got {tag!r}."
                )
        return tuple(monitor)

    def _log_monitored(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put this run's values of the ``monitor`` tags into ``trainer.callback_metrics`` on every rank."""
        values = {tag: self._logged[tag] for tag in self.monitor if tag in self._logged}
        # Rank zero alone computed the values, but EarlyStopping and ModelCheckpoint read them on every rank.
        values = trainer.strategy.broadcast(values if trainer.is_global_zero else {}, src=0)
        for tag, value in values.items():
            # Every rank has the same value after the broadcast, so the mean that sync_dist takes leaves it unchanged.
            # Without sync_dist, Lightning warns about unsynchronised epoch-level values under DDP.
            pl_module.log(tag, value, logger=False, sync_dist=True)

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "layer": self.layer if self.layer is None or isinstance(self.layer, str) else None,
            "every_n_epochs": self.every_n_epochs,
            "k": self.k,
            "max_per_class": self.max_per_class,
            "metrics": list(self.metrics),
            "expensive_metrics": list(self.expensive_metrics),
            "expensive_every_n_epochs": self.expensive_every_n_epochs,
            "log_histograms": self.log_histograms,
            "seed": self.seed,
        }

    def state_dict(self) -> dict[str, Any]:
        """Return the settings and the run counter. Captured rows are never saved."""
        return {"n_runs": self._n_runs, "settings": self._settings()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the run counter and the settings saved with a checkpoint.

        A resumed run keeps measuring as it was configured, so that its numbers stay comparable across the resume.
        Settings that differ from this callback's arguments are overridden with one warning that lists them.
        A layer given as a module object is never saved and so stays as it is.
        """
        self._n_runs = int(state_dict.get("n_runs", 0))
        saved = dict(state_dict.get("settings", {}))
        if not isinstance(self.layer, (str, type(None))):
            saved.pop("layer", None)
        current = self._settings()
        changed = {name: value for name, value in saved.items() if name in current and current[name] != value}
        if not changed:
            return
        listed = ", ".join(f"{name}={value!r} (was {current[name]!r})" for name, value in changed.items())
        warnings.warn(
            f"ManifoldGeometryCallback restored settings from the checkpoint that differ from its arguments: {listed}.",
            UserWarning,
            stacklevel=2,
        )
        for name, value in changed.items():
            setattr(self, name, tuple(value) if name in ("metrics", "expensive_metrics") else value)


def gather_class_rows(
    embeddings: Mapping[int, Tensor],
    all_gather: Callable[[Tensor], Tensor],
    world_size: int,
    device: torch.device,
) -> dict[int, Tensor]:
    """Gather every rank's rows per class, in rank order, onto every rank.

    Ranks hold different numbers of rows (and a rank may hold none), but ``all_gather`` needs one shape on every
    rank. So each rank flattens its classes into an ``(n_r, D)`` block with ``(n_r,)`` labels, the ranks first
    exchange ``(n_r, D)``, then pad their block and labels to ``max_r n_r`` rows, exchange them, and trim each
    rank's part back to its ``n_r`` rows. Every rank must call this function, whatever it captured.

    Args:
        embeddings: this rank's rows per class label, each ``(m_c, D)``.
        all_gather: the strategy's ``all_gather``. It returns ``(world_size, *shape)`` or, in a single process, the
            tensor unchanged.
        world_size: number of ranks.
        device: where a rank without rows builds its padding, the device the collective needs.

    Returns:
        ``(m_c, D)`` float32 rows per class label present on any rank, sorted by label.

    Raises:
        ValueError: if ranks record rows of different widths.
    """
    rows, labels = _flatten_classes(embeddings, device)
    local_size = torch.tensor([rows.shape[0], rows.shape[1]], dtype=torch.long, device=device)
    sizes = all_gather(local_size).reshape(world_size, 2).cpu()
    n_max = int(sizes[:, 0].max())
    if n_max == 0:
        return {}
    widths = {int(width) for n, width in sizes.tolist() if n > 0}
    if len(widths) > 1:
        raise ValueError(f"Ranks recorded rows of different widths {sorted(widths)}; every rank must run one model.")
    width = widths.pop()

    padded_rows = torch.zeros((n_max, width), dtype=torch.float32, device=device)
    padded_labels = torch.zeros(n_max, dtype=torch.long, device=device)
    if rows.shape[0] > 0:
        padded_rows[: rows.shape[0]] = rows
        padded_labels[: labels.shape[0]] = labels
    all_rows = all_gather(padded_rows).reshape(world_size, n_max, width)
    all_labels = all_gather(padded_labels).reshape(world_size, n_max)

    real = torch.arange(n_max) < sizes[:, :1]
    real = real.to(all_rows.device)
    all_rows, all_labels = all_rows[real], all_labels[real]
    return {label: all_rows[all_labels == label] for label in sorted(set(all_labels.tolist()))}


def _flatten_classes(embeddings: Mapping[int, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Stack per-class rows into one ``(n, D)`` float32 block with its ``(n,)`` labels, ``(0, 0)`` when empty."""
    clouds = {label: rows for label, rows in embeddings.items() if rows.shape[0] > 0}
    if not clouds:
        return torch.zeros((0, 0), dtype=torch.float32, device=device), torch.zeros(0, dtype=torch.long, device=device)
    rows = torch.cat([cloud.to(device, torch.float32) for cloud in clouds.values()])
    counts = torch.tensor([cloud.shape[0] for cloud in clouds.values()], device=device)
    labels = torch.repeat_interleave(torch.tensor(list(clouds), dtype=torch.long, device=device), counts)
    return rows, labels


def _cut_to_max_per_class(clouds: Mapping[int, Tensor], max_per_class: int, seed: int) -> dict[int, Tensor]:
    """Cut each class to ``max_per_class`` rows by a seeded uniform draw.

    NOTE: the draw treats the ranks' reservoirs as one pool, which is a uniform sample only when the ranks saw about
    as many rows of the class, as a distributed sampler arranges.
    """
    generator = torch.Generator().manual_seed(seed)
    cut = {}
    for label, rows in clouds.items():
        if rows.shape[0] > max_per_class:
            keep = torch.randperm(rows.shape[0], generator=generator)[:max_per_class]
            rows = rows[keep.to(rows.device)]
        cut[label] = rows
    return cut


def real_sample_count(dataloader: Any) -> int | None:
    """Return how many of this rank's samples are real when ``dataloader`` pads through a ``DistributedSampler``.

    With ``n`` samples and ``r`` replicas, a ``DistributedSampler`` without ``drop_last`` gives rank ``i`` the
    positions ``i, i + r, i + 2r, ...`` of the index list extended by repeats of its first samples to a multiple of
    ``r``. The real ones are the first ``len(range(i, n, r))``, and the rest repeat samples of other ranks.

    Returns:
        The count, or ``None`` when the loader has no such sampler (nothing is padded, or the padding is unknown).
    """
    sampler = getattr(dataloader, "sampler", None)
    if not isinstance(sampler, DistributedSampler):
        sampler = getattr(getattr(dataloader, "batch_sampler", None), "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return None
    return len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))  # type: ignore[arg-type]


def _validation_loader(trainer: pl.Trainer, dataloader_idx: int) -> Any:
    """Return the validation dataloader with index ``dataloader_idx``, or ``None`` when it cannot be determined."""
    loaders = trainer.val_dataloaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return loaders[dataloader_idx] if 0 <= dataloader_idx < len(loaders) else None
    return loaders


def _check_metric_names(names: Any, argument: str) -> tuple[str, ...]:
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"Expected `{argument}` to be a list of metric names, got {type(names).__name__} ({names!r}).")
    unknown = [name for name in names if name not in AVAILABLE_METRICS]
    if unknown:
        raise ValueError(f"Unknown metric names in `{argument}`: {unknown}. Available: {list(AVAILABLE_METRICS)}.")
    return tuple(names)
