"""Measure what the Lightning callback adds to a validation epoch, and the memory that capture and kNN use.

Validation is timed with ``trainer.validate`` in up to six variants:

* no callback and no logger, the baseline of capture;
* capture alone, which is the hooks and the reservoir without any analysis, with no logger;
* no callback and a TensorBoard logger, the baseline of the variants that run the metrics;
* capture and the per-epoch metrics, without figures: what most epochs of ``trainer.fit`` cost;
* the same with the figures, which ``fit`` draws every ``figures_every_n_epochs`` epochs;
* capture, the per-epoch metrics, the figures and the expensive metrics that a ``trainer.validate`` call adds
  (holes, nonconvexity).

The variants are interleaved repeat by repeat, in alternating order, so that a change in the machine's load affects
all of them alike.

Peak memory is measured in subprocesses from the kernel's peak resident set size, because torch keeps no
statistics for its CPU allocator and ``tracemalloc`` does not see tensor storage.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.harness import MemoryRow, Row, Target
from callbacks import ManifoldGeometryCallback
from pmg_torch import EmbeddingCapture

REPOSITORY = Path(__file__).resolve().parents[1]

#: Largest share of validation time that capture alone may add.
CAPTURE_OVERHEAD_TARGET = 0.03


class CaptureOnlyCallback(ManifoldGeometryCallback):
    """The callback with its end-of-epoch work (gather, analysis, logging) left out, to time capture alone.

    At the end of the epoch it reads the stored rows and the accuracy counts, as the full callback does first, so
    that work the captures leave until then (counting queued predictions) is timed too. The hooks it attached are
    removed by the next epoch's start or by the trainer's teardown.
    """

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture is not None:
            _ = self._capture.embeddings
        if self._accuracy is not None:
            _ = self._accuracy.accuracy.correct, self._accuracy.accuracy.total


class SyntheticClassifier(pl.LightningModule):
    """A two-layer MLP body with a 512-wide penultimate layer and a linear head, standing in for a real network."""

    def __init__(self, in_features: int, hidden: int, embedding_dim: int, n_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, embedding_dim), nn.ReLU()
        )
        self.head = nn.Linear(embedding_dim, n_classes)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.body(inputs))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        logits = self(inputs)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(dim=1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SyntheticDataModule(pl.LightningDataModule):
    """A validation set of ``n_rows`` Gaussian inputs around one random mean per class, classes in turn."""

    def __init__(self, n_rows: int, in_features: int, n_classes: int, batch_size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        labels = torch.arange(n_rows) % n_classes
        means = 3.0 * torch.randn(n_classes, in_features, generator=generator)
        inputs = means[labels] + torch.randn(n_rows, in_features, generator=generator)
        self.val_set = TensorDataset(inputs, labels)
        self.batch_size = batch_size

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


@dataclass(frozen=True)
class Workload:
    """A model, its validation data and the callback settings that fit them."""

    name: str
    model: pl.LightningModule
    datamodule: pl.LightningDataModule
    k: int
    max_per_class: int
    with_expensive: bool


def load_digits_workload(with_expensive: bool) -> Workload:
    """Build the untrained model and the datamodule of ``examples/digits.py``, with its k = 10."""
    spec = importlib.util.spec_from_file_location("digits_example", REPOSITORY / "examples" / "digits.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"examples/digits.py not found under {REPOSITORY}.")
    module = importlib.util.module_from_spec(spec)
    # digits.py imports its sibling digits_net.py, as it does when run from examples/.
    examples = str(REPOSITORY / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return Workload(
        "digits (64-d, 540 val rows)", module.DigitsClassifier(), module.DigitsDataModule(), 10, 1000, with_expensive
    )


def synthetic_workload(n_rows: int, embedding_dim: int, max_per_class: int) -> Workload:
    torch.manual_seed(0)
    model = SyntheticClassifier(in_features=256, hidden=1024, embedding_dim=embedding_dim, n_classes=10)
    datamodule = SyntheticDataModule(n_rows, in_features=256, n_classes=10, batch_size=256)
    name = f"synthetic ({embedding_dim}-d, {n_rows:,} val rows)"
    return Workload(name, model, datamodule, 20, max_per_class, with_expensive=False)


@dataclass(frozen=True)
class Variant:
    """One way of running validation: the callbacks a fresh trainer gets, its logger, and its baseline.

    ``repeats`` is the least number of timed runs; with ``extend_short_runs`` a short run is repeated more often,
    as :func:`time_validation` describes. ``baseline`` names the variant without the callback that this one is
    compared with, which has the same logger, and is ``None`` for the baselines themselves.
    """

    make_callbacks: Callable[[], list[pl.Callback]]
    repeats: int
    tensorboard: bool
    baseline: str | None
    extend_short_runs: bool = False


#: Baseline of the capture variant: no callback and no logger, because capture logs nothing and a logger's file
#: writes would only add noise to both sides.
WITHOUT = "without"

#: Baseline of the variants that run the metrics, which write to TensorBoard: no callback, a TensorBoard logger.
WITHOUT_TENSORBOARD = "without, TensorBoard logger"


def _variants(workload: Workload, repeats: int, compute_repeats: int) -> dict[str, Variant]:
    """Return the variants to time. Variants that run the metrics add far more time than the noise, so fewer runs
    suffice for them."""
    settings: dict[str, Any] = {"k": workload.k, "max_per_class": workload.max_per_class}
    variants = {
        WITHOUT: Variant(lambda: [], repeats, tensorboard=False, baseline=None, extend_short_runs=True),
        "capture": Variant(
            lambda: [CaptureOnlyCallback(**settings)],
            repeats,
            tensorboard=False,
            baseline=WITHOUT,
            extend_short_runs=True,
        ),
        WITHOUT_TENSORBOARD: Variant(lambda: [], compute_repeats, tensorboard=True, baseline=None),
        "capture + metrics": Variant(
            lambda: [ManifoldGeometryCallback(expensive_metrics=None, log_figures=False, **settings)],
            compute_repeats,
            tensorboard=True,
            baseline=WITHOUT_TENSORBOARD,
        ),
    }
    if workload.with_expensive:
        # trainer.validate draws the figures, as fit does every figures_every_n_epochs epochs.
        variants["capture + metrics + figures"] = Variant(
            lambda: [ManifoldGeometryCallback(expensive_metrics=None, **settings)],
            compute_repeats,
            tensorboard=True,
            baseline=WITHOUT_TENSORBOARD,
        )
        variants["capture + metrics + figures + holes, nonconvexity"] = Variant(
            lambda: [ManifoldGeometryCallback(**settings)],
            compute_repeats,
            tensorboard=True,
            baseline=WITHOUT_TENSORBOARD,
        )
    return variants


def time_validation(
    workload: Workload,
    device: torch.device,
    repeats: int,
    compute_repeats: int,
    log_dir: str,
    min_seconds: float = 0.0,
) -> dict[str, list[float]]:
    """Return the ``trainer.validate`` times of each variant, one per timed run, in run order.

    Every variant first runs once untimed, as a warm-up. The variants then run in turn, in reverse order on every
    other round, so that a drift in the machine's load affects all of them alike. The variants without the metrics
    run more than ``repeats`` times when their warm-up was short, until their timed runs add up to about
    ``min_seconds``. A 30 ms validation varies by several percent from run to run, more than the 3 % being measured.
    """
    variants = _variants(workload, repeats, compute_repeats)
    warmup = {name: _time_one(workload, device, variant, log_dir) for name, variant in variants.items()}
    planned = {name: variant.repeats for name, variant in variants.items()}
    short = [name for name, variant in variants.items() if variant.extend_short_runs]
    if short:
        # One count for all of them, so that each run of one has a run of the others next to it.
        count = max(planned[short[0]], math.ceil(min_seconds / min(warmup[name] for name in short)))
        planned.update(dict.fromkeys(short, count))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(max(planned.values())):
        names = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in names:
            if round_index < planned[name]:
                times[name].append(_time_one(workload, device, variants[name], log_dir))
    return times


def _time_one(workload: Workload, device: torch.device, variant: Variant, log_dir: str) -> float:
    """Return the time of one ``trainer.validate`` call on a fresh trainer with the variant's callbacks."""
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        callbacks=variant.make_callbacks(),
        logger=TensorBoardLogger(log_dir, name="callback_cost") if variant.tensorboard else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    # Garbage left by the previous run would otherwise be collected during this one.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    trainer.validate(workload.model, datamodule=workload.datamodule, verbose=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def callback_rows(
    workloads: Sequence[Workload],
    device: torch.device,
    repeats: int,
    compute_repeats: int,
    min_seconds: float | None = None,
) -> tuple[list[Row], list[Target]]:
    """Time each workload's validation with and without the callback; rows compare each variant to its baseline.

    ``min_seconds`` is passed to :func:`time_validation`; ``None`` means one second per repeat.

    The capture overhead is the ratio of the medians minus one. The note also gives the median of the ratios of
    runs made next to each other, which a slow drift in the machine's load affects less.
    """
    rows: list[Row] = []
    targets: list[Target] = []
    with tempfile.TemporaryDirectory() as log_dir, _quiet_lightning():
        for workload in workloads:
            seconds_per_variant = float(repeats) if min_seconds is None else min_seconds
            times = time_validation(workload, device, repeats, compute_repeats, log_dir, seconds_per_variant)
            variants = _variants(workload, repeats, compute_repeats)
            for name, variant in variants.items():
                if variant.baseline is None:
                    continue
                baseline_times, variant_times = times[variant.baseline], times[name]
                baseline, seconds = statistics.median(baseline_times), statistics.median(variant_times)
                overhead = seconds / baseline - 1.0
                paired = statistics.median(
                    ours / reference for ours, reference in zip(variant_times, baseline_times, strict=False)
                )
                note = (
                    f"trainer.validate {variant.baseline} / with, medians of {len(baseline_times)} / "
                    f"{len(variant_times)} runs; overhead {overhead:+.1%}, median of paired ratios {paired - 1:+.1%}"
                )
                rows.append(Row(f"callback: {name}, {workload.name}", baseline, seconds, note=note))
                if name == "capture":
                    targets.append(
                        Target(
                            f"capture overhead, {workload.name}",
                            f"<= {CAPTURE_OVERHEAD_TARGET:.0%}",
                            f"{overhead:+.1%}",
                            overhead <= CAPTURE_OVERHEAD_TARGET,
                        )
                    )
    return rows, targets


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's start-up messages and its advice on data-loader workers while timing."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="pytorch_lightning")
            warnings.filterwarnings("ignore", module="lightning")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# -- memory ----------------------------------------------------------------------------------------------------------


def stored_capture_bytes(n_rows: int, embedding_dim: int, max_per_class: int, n_classes: int = 10) -> tuple[int, int]:
    """Run the synthetic model over ``n_rows`` rows under :class:`EmbeddingCapture` and return the bytes of the
    stored rows and the smallest number of rows any class was offered."""
    model = SyntheticClassifier(in_features=256, hidden=1024, embedding_dim=embedding_dim, n_classes=n_classes)
    loader = SyntheticDataModule(n_rows, 256, n_classes, batch_size=256).val_dataloader()
    with torch.no_grad(), EmbeddingCapture(model, max_per_class=max_per_class) as capture:
        for inputs, labels in loader:
            capture.set_labels(labels)
            model(inputs)
    stored = sum(rows.numel() * rows.element_size() for rows in capture.embeddings.values())
    return stored, min(capture.n_seen.values())


_RSS_PREAMBLE = """
import json, re, sys
import torch
sys.path.insert(0, {repository!r})
torch.set_num_threads({threads})

def status_kib(field):
    with open("/proc/self/status") as status:
        return int(re.search(field + r":\\s+(\\d+) kB", status.read()).group(1))

def reset_peak():
    # Writing 5 to clear_refs resets the peak resident set size (VmHWM) to the current one (Linux 4.0 and later).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return status_kib("VmRSS")
"""

_KNN_SCRIPT = """
from pmg_torch import knn
x = torch.randn({m}, {dim}, generator=torch.Generator().manual_seed(0))
before = reset_peak()
knn(x, {k})
print(json.dumps({{"before": before, "peak": status_kib("VmHWM")}}))
"""

_CAPTURE_SCRIPT = """
from benchmarks.callback_cost import SyntheticClassifier, SyntheticDataModule
from pmg_torch import EmbeddingCapture
model = SyntheticClassifier(256, 1024, {dim}, 10)
loader = SyntheticDataModule({n_rows}, 256, 10, 256).val_dataloader()
with torch.no_grad():
    for inputs, labels in loader:
        model(inputs)
    before = reset_peak()
    with EmbeddingCapture(model, max_per_class={cap}) as capture:
        for inputs, labels in loader:
            capture.set_labels(labels)
            model(inputs)
print(json.dumps({{"before": before, "peak": status_kib("VmHWM")}}))
"""


def _peak_rss_growth(script: str) -> float:
    """Run ``script`` in a fresh interpreter and return how far its peak resident memory rose, in bytes.

    The script resets the kernel's peak counter just before the measured step, so the growth is the peak during
    that step minus the resident memory at its start. Memory that the allocator kept from earlier steps and reuses
    is not counted, but pages that it keeps after a free are.
    """
    preamble = _RSS_PREAMBLE.format(repository=str(REPOSITORY), threads=torch.get_num_threads())
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(preamble) + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPOSITORY,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"Memory probe failed with exit code {completed.returncode}: {completed.stderr[-2000:]}")
    kib = json.loads(completed.stdout.strip().splitlines()[-1])
    return 1024.0 * (kib["peak"] - kib["before"])


def memory_rows(
    capture_rows: int, knn_rows: int, embedding_dim: int, k: int, max_per_class: int, device: torch.device
) -> tuple[list[MemoryRow], list[Target]]:
    """Measure what capture stores against its bound, the peak memory growth of capture, and that of kNN against an
    analytic estimate of its largest intermediates.

    The subprocess probes run on the CPU whatever ``device`` is. On a CUDA device, kNN's peak is also read from
    torch's CUDA allocator statistics.
    """
    n_classes = 10
    bound = n_classes * max_per_class * embedding_dim * 4
    stored, fewest_offered = stored_capture_bytes(capture_rows, embedding_dim, max_per_class, n_classes)
    capture_peak = _peak_rss_growth(_CAPTURE_SCRIPT.format(dim=embedding_dim, n_rows=capture_rows, cap=max_per_class))
    knn_peak = _peak_rss_growth(_KNN_SCRIPT.format(m=knn_rows, dim=embedding_dim, k=k))
    knn_estimate = knn_intermediate_bytes(knn_rows, embedding_dim, k)
    full_matrix_mib = knn_rows * knn_rows * 4 / 2**20
    rows = [
        MemoryRow(
            f"capture, stored rows ({capture_rows:,} rows offered, >= {fewest_offered:,} per class)",
            stored,
            bound,
            f"sum of nbytes of the stored tensors; bound = {n_classes} classes x {max_per_class} rows x "
            f"{embedding_dim} x 4 B",
        ),
        MemoryRow(
            "capture, peak RSS growth over a validation pass without it",
            capture_peak,
            bound,
            "peak RSS (VmHWM, reset first) minus RSS before, in a subprocess; includes the reservoir's temporaries",
        ),
        MemoryRow(
            f"knn, m={knn_rows:,}, D={embedding_dim}, k={k}, float32",
            knn_peak,
            knn_estimate,
            "peak RSS growth as above; expected = largest intermediates of one block, counted; the whole distance "
            f"matrix would take {full_matrix_mib:,.0f} MiB",
        ),
    ]
    if device.type == "cuda":
        rows.append(
            MemoryRow(
                f"knn on {device}, m={knn_rows:,}, D={embedding_dim}, k={k}, float32",
                _cuda_knn_peak(knn_rows, embedding_dim, k, device),
                knn_estimate,
                "torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the input's bytes",
            )
        )
    target = Target(
        "capture memory",
        "= classes x max_per_class x D x 4 B",
        f"{stored:,} B vs {bound:,} B",
        stored == bound,
    )
    return rows, [target]


def _cuda_knn_peak(m: int, dim: int, k: int, device: torch.device) -> float:
    from pmg_torch import knn

    x = torch.randn(m, dim, generator=torch.Generator().manual_seed(0)).to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    knn(x, k)
    torch.cuda.synchronize(device)
    return float(torch.cuda.max_memory_allocated(device) - baseline)


def knn_intermediate_bytes(m: int, dim: int, k: int) -> int:
    """Estimate the bytes of the largest tensors alive at once in one block of :func:`pmg_torch.knn` in float32.

    A block of ``c`` query rows (at most 2**24 / m) has three ``c x m`` temporaries: the sum of squared norms, the
    product ``x_c x^T`` and their difference. It also has two ``c x k x D`` tensors, the gathered neighbours and
    their differences from the queries. The ``m x k`` outputs come on top.
    """
    from pmg_torch.neighbours import default_chunk_size

    block_rows = default_chunk_size(m)
    distances = 3 * block_rows * m * 4
    neighbours = 2 * block_rows * k * dim * 4
    outputs = m * k * (4 + 8)
    return distances + neighbours + outputs
