"""ManifoldGeometryCallback under DDP on two CPU processes (gloo) gives the numbers of a single process.

The test runs this file as a script with ``strategy="ddp"``, ``accelerator="cpu"`` and ``devices=2``; Lightning
starts the second rank by running the same command again. Each rank writes what it saw to a JSON file, and the
test compares rank zero's reports with those of a single-process ``trainer.validate`` on the same data and weights.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy
from tiny_models import MLPClassifier
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import ManifoldGeometryCallback

IN_DIM = 6
HIDDEN = 10
N_CLASSES = 4
K = 5
BATCH = 16
METRICS = ["curvature", "volume", "intrinsic_dimension", "participation_ratio"]

#: Rows of the uneven validation set: odd, so the sampler repeats one sample to give both ranks 76.
N_UNEVEN = 151
#: The class that only rank 0 sees, at the even positions 2, 4, ..., 74 that a 2-rank sampler gives to rank 0.
RANK_ZERO_CLASS = 3
RANK_ZERO_ROWS = 37

FIT_EPOCHS = 2
TRAIN_ROWS = 64
#: Each rank trains on half of the training rows, in batches of BATCH.
STEPS_PER_EPOCH = TRAIN_ROWS // 2 // BATCH

#: Seconds the script may run before the test counts it as hung; the pytest timeout is above it.
SCRIPT_TIMEOUT = 200


class SmallClassifier(MLPClassifier):
    def __init__(self) -> None:
        super().__init__(IN_DIM, HIDDEN, N_CLASSES)


def uneven_labels() -> Tensor:
    """Labels of the uneven set: class 3 at positions 2..74 (even), classes 0-2 in turn everywhere else.

    Position 0 has class 0, and it is the sample the sampler repeats on rank 1. Without the removal of that repeat,
    class 0 would have one row more than in a single process.
    """
    labels = torch.arange(N_UNEVEN) % 3
    rank_zero_positions = torch.arange(2, 2 * RANK_ZERO_ROWS + 1, 2)
    labels[rank_zero_positions] = RANK_ZERO_CLASS
    return labels


def dataset(labels: Tensor, seed: int) -> TensorDataset:
    """Gaussian blobs around well-separated class centres, one row per label, in the order of ``labels``."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.eye(N_CLASSES, IN_DIM)
    x = centres[labels] + torch.randn(labels.shape[0], IN_DIM, generator=generator)
    return TensorDataset(x, labels)


def validation_sets() -> dict[str, DataLoader]:
    """The sets validated under DDP: uneven with a rank-0-only class, and one sample, which leaves rank 1 empty."""
    return {
        "uneven": DataLoader(dataset(uneven_labels(), seed=1), batch_size=BATCH),
        "single_sample": DataLoader(dataset(torch.tensor([2]), seed=2), batch_size=BATCH),
    }


def train_loader() -> DataLoader:
    return DataLoader(dataset(torch.arange(TRAIN_ROWS) % N_CLASSES, seed=3), batch_size=BATCH)


def make_callback() -> ManifoldGeometryCallback:
    return ManifoldGeometryCallback(k=K, metrics=METRICS, expensive_every_n_epochs=0, max_per_class=1000)


def count_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def report_summary(callback: ManifoldGeometryCallback) -> dict[str, Any] | None:
    report = callback.last_report
    if report is None:
        return None
    return {
        "n_samples": {str(label): n for label, n in report.n_samples.items()},
        "values": {
            metric: {str(label): v for label, v in per_class.items()} for metric, per_class in report.values.items()
        },
    }


# -- the script each rank runs ---------------------------------------------------------------------------------------


def run_rank(out_dir: Path, weights_path: Path) -> None:
    """Validate both sets and fit briefly under DDP, then write what this rank saw to ``rank<r>.json``."""
    warnings.simplefilter("ignore")
    model = SmallClassifier()
    model.load_state_dict(torch.load(weights_path))
    callback = make_callback()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        # A collective that one rank never enters fails after this timeout instead of hanging the test.
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=90)),
        logger=TensorBoardLogger(out_dir, name="ddp", version=0),
        callbacks=[callback],
        max_epochs=FIT_EPOCHS,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    gathers = count_all_gathers(trainer)
    result: dict[str, Any] = {"reports": {}, "hooks_after": {}, "all_gathers": {}}
    for name, loader in validation_sets().items():
        trainer.validate(model, loader, verbose=False)
        result["reports"][name] = report_summary(callback)
        result["hooks_after"][name] = count_hooks(model)
        result["all_gathers"][name] = gathers["count"]
        callback.last_report = None

    trainer.fit(model, train_loader(), validation_sets()["uneven"])
    result["reports"]["fit"] = report_summary(callback)
    result["hooks_after"]["fit"] = count_hooks(model)
    result["all_gathers"]["fit"] = gathers["count"]
    result["n_runs"] = callback.n_runs
    result["world_size"] = trainer.world_size
    result["pid"] = os.getpid()
    rank = trainer.global_rank
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


def count_all_gathers(trainer: pl.Trainer) -> dict[str, int]:
    """Wrap the strategy's ``all_gather`` so that each rank counts the collectives it enters."""
    counter = {"count": 0}
    all_gather = trainer.strategy.all_gather

    def counting_all_gather(tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        counter["count"] += 1
        return all_gather(tensor, *args, **kwargs)

    trainer.strategy.all_gather = counting_all_gather  # type: ignore[method-assign]
    return counter


# -- the test --------------------------------------------------------------------------------------------------------


def free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_script(out_dir: Path, weights_path: Path) -> subprocess.CompletedProcess[str]:
    """Run this file under DDP in its own process group, and kill the whole group if it hangs."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_local_port()),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    command = [sys.executable, str(Path(__file__).resolve()), str(out_dir), str(weights_path)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=SCRIPT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the DDP run did not finish in {SCRIPT_TIMEOUT} s, so a rank hung:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, None)


def single_process_reports(model: SmallClassifier, tmp_path: Path) -> dict[str, dict[str, Any] | None]:
    callback = make_callback()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    reports = {}
    for name, loader in validation_sets().items():
        trainer.validate(model, loader, verbose=False)
        reports[name] = report_summary(callback)
    return reports


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out_dir = tmp_path_factory.mktemp("ddp")
    pl.seed_everything(0, verbose=False)
    model = SmallClassifier()
    weights_path = out_dir / "weights.pt"
    torch.save(model.state_dict(), weights_path)
    completed = run_script(out_dir, weights_path)
    if completed.returncode != 0 and "Address already in use" in completed.stdout:
        # Another process took the free port between the probe and the rendezvous, so try once more with a new one.
        completed = run_script(out_dir, weights_path)
    assert completed.returncode == 0, completed.stdout[-4000:]
    ranks = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = single_process_reports(model, out_dir)
    return {"ranks": ranks, "single": single, "out_dir": out_dir}


pytestmark = pytest.mark.timeout(SCRIPT_TIMEOUT + 60)


def test_both_ranks_ran_under_ddp(ddp_run: dict[str, Any]) -> None:
    assert [rank["world_size"] for rank in ddp_run["ranks"]] == [2, 2]


@pytest.mark.parametrize("name", ["uneven", "single_sample"])
def test_ddp_classes_equal_single_process(ddp_run: dict[str, Any], name: str) -> None:
    distributed = ddp_run["ranks"][0]["reports"][name]
    single = ddp_run["single"][name]
    assert distributed is not None
    assert single is not None
    assert distributed["n_samples"] == single["n_samples"]
    for metric in METRICS:
        for label, expected in single["values"][metric].items():
            got = distributed["values"][metric][label]
            if math.isnan(expected):
                assert math.isnan(got), (metric, label)
            else:
                assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), (metric, label)


def test_rank_zero_only_class_computed(ddp_run: dict[str, Any]) -> None:
    distributed = ddp_run["ranks"][0]["reports"]["uneven"]
    label = str(RANK_ZERO_CLASS)
    assert distributed["n_samples"][label] == RANK_ZERO_ROWS
    for metric in METRICS:
        assert math.isfinite(distributed["values"][metric][label]), metric


def test_sampler_repeat_is_not_counted(ddp_run: dict[str, Any]) -> None:
    distributed = ddp_run["ranks"][0]["reports"]
    labels, counts = torch.unique(uneven_labels(), return_counts=True)
    expected = {str(label): n for label, n in zip(labels.tolist(), counts.tolist(), strict=True)}
    assert distributed["uneven"]["n_samples"] == expected
    # One sample: rank 1 gets only the sampler's repeat of it, so it gathers no rows of its own.
    assert distributed["single_sample"]["n_samples"] == {"2": 1}


def test_only_rank_zero_computes(ddp_run: dict[str, Any]) -> None:
    rank_one = ddp_run["ranks"][1]["reports"]
    assert all(report is None for report in rank_one.values())


def test_every_rank_enters_every_gather(ddp_run: dict[str, Any]) -> None:
    rank_zero, rank_one = (rank["all_gathers"] for rank in ddp_run["ranks"])
    assert rank_zero == rank_one
    # Each measured run gathers at least the sizes, the rows and the labels.
    assert 3 <= rank_zero["uneven"]
    assert rank_zero["uneven"] < rank_zero["single_sample"] < rank_zero["fit"]


def test_no_hook_left_on_any_rank(ddp_run: dict[str, Any]) -> None:
    for rank in ddp_run["ranks"]:
        assert set(rank["hooks_after"].values()) == {0}


def test_fit_logs_every_epoch_from_rank_zero(ddp_run: dict[str, Any]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = ddp_run["out_dir"] / "ddp" / "version_0"
    # An event file's name ends in "<pid>.<n>"; each trainer call that logs opens a new file, all from rank zero.
    writers = {int(path.name.split(".")[-2]) for path in log_dir.glob("events.out.tfevents.*")}
    assert writers == {ddp_run["ranks"][0]["pid"]}
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [event.step for event in events.Scalars(f"pmg/volume/{RANK_ZERO_CLASS}")]
    # Two validate calls log at step 0, then fit's epochs at the end of each epoch's optimiser steps.
    assert steps == [0] + [STEPS_PER_EPOCH * (epoch + 1) for epoch in range(FIT_EPOCHS)]
    assert [rank["n_runs"] for rank in ddp_run["ranks"]] == [2 + FIT_EPOCHS] * 2


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]), Path(sys.argv[2]))
