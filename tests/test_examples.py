"""End-to-end runs of the digits example and of its LightningCLI config, in the test process to save start-up time."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
METRICS = ("curvature", "volume", "intrinsic_dimension")
CLASSES = [str(label) for label in range(10)]


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import ``examples/<name>.py`` as ``python examples/<name>.py`` would, with ``examples/`` on the path."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_event_folder(root: Path) -> Path:
    folders = {path.parent for path in root.rglob("events.out.tfevents.*")}
    assert len(folders) == 1, folders
    return folders.pop()


def read_scalars(folder: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_all_classes_logged(scalars: dict[str, list[float]]) -> None:
    for metric in METRICS:
        for name in [*CLASSES, "mean"]:
            tag = f"pmg/{metric}/{name}"
            assert tag in scalars, tag
            assert scalars[tag], tag
            assert all(math.isfinite(value) for value in scalars[tag]), (tag, scalars[tag])


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Return the cells of the printed per-class table by class name, with the header under ``"class"``."""
    rows = {}
    for line in stdout.splitlines():
        cells = line.split()
        if cells and (cells[0] in CLASSES or cells[0] == "class") and len(cells) > 3:
            rows[cells[0]] = cells
    return rows


def test_train_digits_logs_and_prints_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    train_digits = load_example("train_digits", monkeypatch)
    train_digits.main(["--epochs", "1", "--logdir", str(tmp_path / "logs"), "--seed", "0"])
    stdout = capsys.readouterr().out

    assert_all_classes_logged(read_scalars(single_event_folder(tmp_path / "logs")))
    rows = table_rows(stdout)
    assert "class" in rows, stdout
    header = rows.pop("class")
    for column in ("accuracy", *METRICS):
        assert column in header, header
    assert sorted(rows) == CLASSES
    for name, cells in rows.items():
        accuracy = float(cells[header.index("accuracy")])
        assert 0.0 <= accuracy <= 1.0, (name, accuracy)
        for metric in METRICS:
            assert math.isfinite(float(cells[header.index(metric)])), (name, metric, cells)


def test_cli_config_runs_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # LightningCLI warns when it gets both `args` and command-line arguments, and pytest's would be there.
    monkeypatch.setattr(sys, "argv", ["digits_cli.py"])
    digits_cli = load_example("digits_cli", monkeypatch)
    digits_cli.main(
        [
            "fit",
            "--config",
            str(REPO_ROOT / "configs" / "digits.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        ]
    )

    folder = single_event_folder(tmp_path / "logs")
    assert_all_classes_logged(read_scalars(folder))
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    callbacks = saved["trainer"]["callbacks"]
    geometry = [callback for callback in callbacks if callback["class_path"] == "callbacks.ManifoldGeometryCallback"]
    assert len(geometry) == 1, callbacks
    assert geometry[0]["init_args"]["k"] == 10
    assert saved["trainer"]["max_epochs"] == 1
