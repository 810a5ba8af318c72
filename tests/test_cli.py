"""Tests for the ``pmg-torch`` command line: file formats, outputs equal to ``pmg_torch.analyze``, and errors."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pmg_torch
from pmg_torch.analysis import AVAILABLE_METRICS, analyze
from pmg_torch.cli import EXIT_INPUT_ERROR, Inputs, compute_report, main

FAST_METRICS = ["curvature", "volume", "density", "intrinsic_dimension", "participation_ratio"]
N_CLASSES, ROWS_PER_CLASS, DIMENSION = 3, 40, 8


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 40 rows in 8-D with different spreads, with labels interleaved rather than sorted."""
    generator = np.random.default_rng(7)
    scales = np.array([0.5, 1.0, 2.0])
    labels = np.tile(np.arange(N_CLASSES), ROWS_PER_CLASS)
    embeddings = generator.normal(size=(labels.size, DIMENSION)) * scales[labels, None]
    return embeddings.astype(np.float32), labels.astype(np.int64)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def read_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def expected_report(data: tuple[np.ndarray, np.ndarray], metrics, **options):
    embeddings, labels = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pmg_torch.DegenerateInputWarning)
        return analyze(torch.from_numpy(embeddings), torch.from_numpy(labels), metrics=metrics, **options)


def assert_csv_matches(rows: list[dict[str, str]], report, metrics) -> None:
    assert [int(row["label"]) for row in rows] == report.classes
    for row, label in zip(rows, report.classes, strict=True):
        assert row["class_name"] == report.class_names[label]
        assert int(row["n_samples"]) == report.n_samples[label]
        assert int(row["n_duplicates"]) == report.n_duplicates[label]
        assert int(row["n_nonfinite"]) == report.n_nonfinite[label]
        for metric in metrics:
            expected = report.values[metric][label]
            actual = float(row[metric])
            if math.isnan(expected):
                assert math.isnan(actual), (metric, label)
            else:
                assert actual == pytest.approx(expected, rel=1e-12, abs=1e-12), (metric, label)


# Reading each file format


def test_npy_pair_csv_equals_analyze(tmp_path, capsys, data):
    np.save(tmp_path / "emb.npy", data[0])
    np.save(tmp_path / "lab.npy", data[1])
    metrics = ",".join(FAST_METRICS)
    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "emb.npy", "--labels", tmp_path / "lab.npy", "--metrics", metrics,
        "--format", "csv", "--k", "10", "--quiet",
    )  # fmt: skip
    assert status == 0, err
    assert err == ""
    rows = read_csv(out)
    assert list(rows[0]) == ["label", "class_name", "n_samples", "n_duplicates", "n_nonfinite", *FAST_METRICS]
    assert_csv_matches(rows, expected_report(data, FAST_METRICS, k=10), FAST_METRICS)


def test_npz_with_named_keys(tmp_path, capsys, data):
    np.savez(tmp_path / "run.npz", emb=data[0], y=data[1], logits=np.zeros((120, 3)))
    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "run.npz", "--embeddings-key", "emb", "--labels-key", "y",
        "--metrics", "volume", "--format", "csv",
    )  # fmt: skip
    assert status == 0, err
    assert_csv_matches(read_csv(out), expected_report(data, ["volume"]), ["volume"])


def test_npz_obvious_arrays_without_keys(tmp_path, capsys, data):
    np.savez(tmp_path / "both.npz", embeddings=data[0], labels=data[1])
    np.savez(tmp_path / "only.npz", data[0])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "both.npz", "--metrics", "volume", "--format", "csv")
    assert status == 0, err
    assert_csv_matches(read_csv(out), expected_report(data, ["volume"]), ["volume"])

    np.save(tmp_path / "lab.npy", data[1])
    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "only.npz", "--labels", tmp_path / "lab.npy", "--metrics", "volume",
        "--format", "csv",
    )  # fmt: skip
    assert status == 0, err
    assert_csv_matches(read_csv(out), expected_report(data, ["volume"]), ["volume"])


def test_pt_dict_and_tensor_files(tmp_path, capsys, data):
    embeddings, labels = torch.from_numpy(data[0]), torch.from_numpy(data[1])
    torch.save({"embeddings": embeddings, "labels": labels, "epoch": 3}, tmp_path / "val.pt")
    torch.save(embeddings, tmp_path / "emb.pt")
    torch.save(labels.to(torch.int32), tmp_path / "lab.pth")
    expected = expected_report(data, ["participation_ratio"])

    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "val.pt", "--metrics", "participation_ratio", "--format", "csv"
    )
    assert status == 0, err
    assert_csv_matches(read_csv(out), expected, ["participation_ratio"])

    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "emb.pt", "--labels", tmp_path / "lab.pth", "--metrics", "participation_ratio",
        "--format", "csv",
    )  # fmt: skip
    assert status == 0, err
    assert_csv_matches(read_csv(out), expected, ["participation_ratio"])


class TouchOnUnpickle:
    """An object whose unpickling creates a file, to show that loading never runs pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pt_file_is_not_unpickled(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    torch.save({"embeddings": TouchOnUnpickle(marker)}, tmp_path / "object.pt")
    status, out, err = run_cli(capsys, "analyze", tmp_path / "object.pt")
    assert status == EXIT_INPUT_ERROR
    assert "cannot be read as a .pt file" in err
    assert out == ""
    assert not marker.exists()


def test_float16_embeddings_accepted(tmp_path, capsys, data):
    np.save(tmp_path / "emb.npy", data[0].astype(np.float16))
    np.save(tmp_path / "lab.npy", data[1].astype(np.uint8))
    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "emb.npy", "--labels", tmp_path / "lab.npy", "--metrics", "volume",
        "--format", "csv",
    )  # fmt: skip
    assert status == 0, err
    half = (data[0].astype(np.float16), data[1])
    assert_csv_matches(read_csv(out), expected_report(half, ["volume"]), ["volume"])


# Outputs


def test_default_json_equals_analyze_of_all_metrics(tmp_path, capsys, data):
    np.savez(tmp_path / "both.npz", embeddings=data[0], labels=data[1])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "both.npz", "--format", "json", "--k", "10")
    assert status == 0, err
    document = json.loads(out)
    expected = expected_report(data, "all", k=10)
    assert list(document["values"]) == list(AVAILABLE_METRICS)
    assert document["pmg_torch_version"] == pmg_torch.__version__
    assert document["input_files"]["embeddings"] == str(tmp_path / "both.npz")
    assert document["settings"]["k"] == 10
    assert document["classes"] == [0, 1, 2]
    for metric, per_class in expected.values.items():
        for label, value in per_class.items():
            actual = document["values"][metric][str(label)]
            if math.isnan(value):
                assert actual is None, (metric, label)
            else:
                assert actual == pytest.approx(value, rel=1e-12, abs=1e-12), (metric, label)
    np.testing.assert_allclose(np.array(document["similarity"], dtype=float), expected.similarity.numpy(), rtol=1e-12)


def test_table_is_the_report_table(tmp_path, capsys, data):
    np.savez(tmp_path / "both.npz", embeddings=data[0], labels=data[1])
    (tmp_path / "names.txt").write_text("cat\ndog\nbird\n\n", encoding="utf-8")
    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "both.npz", "--metrics", "curvature", "--metrics", "volume", "--class-names",
        tmp_path / "names.txt",
    )  # fmt: skip
    assert status == 0, err
    expected = expected_report(data, ["curvature", "volume"], class_names={0: "cat", 1: "dog", 2: "bird"})
    assert out == expected.table() + "\n"
    assert out.splitlines()[1].startswith("cat ")


def test_output_file_receives_result(tmp_path, capsys, data):
    np.savez(tmp_path / "both.npz", embeddings=data[0], labels=data[1])
    target = tmp_path / "geometry.csv"
    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "both.npz", "--metrics", "volume", "--format", "csv", "--output", target
    )
    assert status == 0, err
    assert out == ""
    assert_csv_matches(read_csv(target.read_text()), expected_report(data, ["volume"]), ["volume"])


def test_degenerate_class_warns_and_writes_nan(tmp_path, capsys, data):
    embeddings = np.concatenate([data[0], np.ones((3, DIMENSION), dtype=np.float32)])
    labels = np.concatenate([data[1], [9, 9, 9]])
    np.savez(tmp_path / "both.npz", embeddings=embeddings, labels=labels)
    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "both.npz", "--metrics", "curvature", "--format", "csv", "--k", "5"
    )
    assert status == 0
    rows = read_csv(out)
    assert rows[-1]["label"] == "9"
    assert rows[-1]["curvature"] == "nan"
    assert not math.isnan(float(rows[0]["curvature"]))
    warning_lines = [line for line in err.splitlines() if line.startswith("pmg-torch: warning:")]
    assert len(warning_lines) == 1
    assert "class 9" in warning_lines[0]
    assert "curvature" in warning_lines[0]

    status, out, err = run_cli(
        capsys, "analyze", tmp_path / "both.npz", "--metrics", "curvature", "--k", "5", "--quiet"
    )
    assert status == 0
    assert err == ""


def test_json_writes_nan_as_null(tmp_path, capsys, data):
    embeddings = np.concatenate([data[0], np.zeros((2, DIMENSION), dtype=np.float32)])
    labels = np.concatenate([data[1], [5, 5]])
    np.savez(tmp_path / "both.npz", embeddings=embeddings, labels=labels)
    status, out, _ = run_cli(
        capsys, "analyze", tmp_path / "both.npz", "--metrics", "curvature", "--format", "json", "--quiet"
    )
    assert status == 0
    assert "NaN" not in out
    assert json.loads(out)["values"]["curvature"]["5"] is None


def test_merged_report_equals_one_analyze_call(data):
    embeddings, labels = torch.from_numpy(data[0]), torch.from_numpy(data[1])
    inputs = Inputs(embeddings, labels, {0: "a", 1: "b", 2: "c"})
    options = {"k": 8, "seed": 3, "holes_threshold": 0.2, "n_projections": 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pmg_torch.DegenerateInputWarning)
        merged = compute_report(inputs, list(AVAILABLE_METRICS), options, show_progress=False)
        direct = analyze(embeddings, labels, metrics="all", class_names=inputs.class_names, **options)
    assert merged.classes == direct.classes
    assert merged.class_names == direct.class_names
    assert merged.n_samples == direct.n_samples
    assert merged.settings == direct.settings
    assert list(merged.values) == list(direct.values)
    for metric in direct.values:
        np.testing.assert_allclose(
            list(merged.values[metric].values()), list(direct.values[metric].values()), rtol=1e-12, err_msg=metric
        )
    torch.testing.assert_close(merged.similarity, direct.similarity, rtol=1e-12, atol=0)
    for label in direct.classes:
        torch.testing.assert_close(merged.local_curvature[label], direct.local_curvature[label], rtol=1e-12, atol=0)
        np.testing.assert_array_equal(merged.persistence_diagrams[label], direct.persistence_diagrams[label])


# Errors: status 2, one message on stderr, no traceback


def assert_input_error(status: int, out: str, err: str, *fragments: str) -> None:
    assert status == EXIT_INPUT_ERROR
    assert out == ""
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_error_mismatched_row_counts(tmp_path, capsys, data):
    np.save(tmp_path / "emb.npy", data[0])
    np.save(tmp_path / "lab.npy", data[1][:-1])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "emb.npy", "--labels", tmp_path / "lab.npy")
    assert_input_error(status, out, err, "119 labels for 120 embedding rows")


def test_error_three_dimensional_embeddings(tmp_path, capsys, data):
    np.save(tmp_path / "emb.npy", data[0].reshape(120, 2, 4))
    np.save(tmp_path / "lab.npy", data[1])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "emb.npy", "--labels", tmp_path / "lab.npy")
    assert_input_error(status, out, err, "2-D array of shape (N, D), got a 3-D array of shape (120, 2, 4)")


def test_error_two_dimensional_labels(tmp_path, capsys, data):
    np.save(tmp_path / "emb.npy", data[0])
    np.save(tmp_path / "lab.npy", data[1][:, None])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "emb.npy", "--labels", tmp_path / "lab.npy")
    assert_input_error(status, out, err, "labels must be a 1-D array of shape (N,), got a 2-D array")


def test_error_missing_file(tmp_path, capsys):
    status, out, err = run_cli(capsys, "analyze", tmp_path / "absent.npy", "--labels", tmp_path / "absent.npy")
    assert_input_error(status, out, err, "absent.npy: file not found")


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt"])
def test_error_corrupt_file(tmp_path, capsys, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x93NUMPY not really an array" if suffix == ".npy" else b"PK\x03\x04 truncated")
    status, out, err = run_cli(capsys, "analyze", path, "--labels", path)
    assert_input_error(status, out, err, f"cannot be read as a {suffix} file")


def test_error_unknown_suffix(tmp_path, capsys):
    (tmp_path / "emb.csv").write_text("1,2\n")
    status, out, err = run_cli(capsys, "analyze", tmp_path / "emb.csv")
    assert_input_error(status, out, err, "unknown file type '.csv'", "Expected .npy, .npz, .pt")


def test_error_unknown_metric(tmp_path, capsys, data):
    np.savez(tmp_path / "both.npz", embeddings=data[0], labels=data[1])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "both.npz", "--metrics", "volume,curvatur")
    assert_input_error(status, out, err, "unknown metric 'curvatur'", "Available metrics: curvature, volume")


@pytest.mark.parametrize(
    ("embeddings_dtype", "labels", "fragment"),
    [
        (np.int64, np.arange(4), "embeddings must be floating point (float16, float32 or float64), got int64"),
        (np.complex64, np.arange(4), "embeddings must be floating point (float16, float32 or float64), got complex64"),
        (np.float32, np.arange(4, dtype=np.float32), "labels must be integers, got float32"),
        (np.float32, np.array(["a", "b", "c", "d"]), "labels must be integers, got <U1"),
        (np.float32, np.ones(4, dtype=bool), "labels must be integers, got bool"),
    ],
)
def test_error_wrong_dtypes(tmp_path, capsys, embeddings_dtype, labels, fragment):
    np.save(tmp_path / "emb.npy", np.ones((4, 3), dtype=embeddings_dtype))
    np.save(tmp_path / "lab.npy", labels)
    status, out, err = run_cli(capsys, "analyze", tmp_path / "emb.npy", "--labels", tmp_path / "lab.npy")
    assert_input_error(status, out, err, fragment)


def test_error_float_tensor_labels_in_pt(tmp_path, capsys):
    torch.save({"embeddings": torch.ones(4, 3), "labels": torch.zeros(4)}, tmp_path / "val.pt")
    status, out, err = run_cli(capsys, "analyze", tmp_path / "val.pt")
    assert_input_error(status, out, err, "labels must be integers, got float32")


def test_error_object_array_is_not_unpickled(tmp_path, capsys):
    np.save(tmp_path / "emb.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    status, out, err = run_cli(capsys, "analyze", tmp_path / "emb.npy", "--labels", tmp_path / "emb.npy")
    assert_input_error(status, out, err, "cannot be read as a .npy file")


def test_error_labels_missing(tmp_path, capsys, data):
    np.save(tmp_path / "emb.npy", data[0])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "emb.npy")
    assert_input_error(status, out, err, "contains only the embeddings. Pass the labels with --labels FILE")


def test_error_ambiguous_npz_names_keys(tmp_path, capsys, data):
    np.savez(tmp_path / "run.npz", a=data[0], b=data[1])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "run.npz")
    assert_input_error(status, out, err, "contains 2 arrays ('a', 'b')", "--embeddings-key")


def test_error_unknown_key(tmp_path, capsys, data):
    np.savez(tmp_path / "run.npz", embeddings=data[0], labels=data[1])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "run.npz", "--labels-key", "targets")
    assert_input_error(status, out, err, "no array named 'targets'. Its arrays are 'embeddings', 'labels'")


@pytest.mark.parametrize(
    ("names", "fragment"),
    [
        ("cat\ndog\n", "has 2 names for labels 0 to 1, but the labels include 2"),
        ("cat\n\ndog\nbird\n", "line 2 is empty"),
        ("cat\ndog\ncat\n", "'cat' repeat"),
    ],
)
def test_error_bad_class_names(tmp_path, capsys, data, names, fragment):
    np.savez(tmp_path / "run.npz", embeddings=data[0], labels=data[1])
    (tmp_path / "names.txt").write_text(names, encoding="utf-8")
    status, out, err = run_cli(capsys, "analyze", tmp_path / "run.npz", "--class-names", tmp_path / "names.txt")
    assert_input_error(status, out, err, fragment)


def test_error_tangent_dim_above_k(tmp_path, capsys, data):
    np.savez(tmp_path / "run.npz", embeddings=data[0], labels=data[1])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "run.npz", "--k", "3", "--tangent-dim", "5")
    assert_input_error(status, out, err, "tangent_dim")


def test_error_unwritable_output(tmp_path, capsys, data):
    np.savez(tmp_path / "run.npz", embeddings=data[0], labels=data[1])
    target = tmp_path / "missing_folder" / "out.csv"
    status, out, err = run_cli(capsys, "analyze", tmp_path / "run.npz", "--metrics", "volume", "--output", target)
    assert_input_error(status, out, err, "cannot write the output")


@pytest.mark.parametrize(
    ("option", "value"), [("--k", "0"), ("--k", "two"), ("--volume-scale", "-1"), ("--holes-threshold", "nan")]
)
def test_error_invalid_option_values(tmp_path, capsys, option, value):
    status, out, err = run_cli(capsys, "analyze", tmp_path / "run.npz", option, value)
    assert_input_error(status, out, err, f"argument {option}")


def test_error_unavailable_device(tmp_path, capsys, data):
    np.savez(tmp_path / "run.npz", embeddings=data[0], labels=data[1])
    status, out, err = run_cli(capsys, "analyze", tmp_path / "run.npz", "--device", "tpu:x")
    assert_input_error(status, out, err, "invalid --device 'tpu:x'")


# Version, help, entry points


def test_version(capsys):
    status, out, _ = run_cli(capsys, "--version")
    assert status == 0
    assert out.strip() == f"pmg-torch {pmg_torch.__version__}"


def test_help_states_units(capsys):
    status, out, _ = run_cli(capsys, "analyze", "--help")
    assert status == 0
    flattened = " ".join(out.split())
    for option in ("--labels", "--metrics", "--k", "--seed", "--format", "--output", "--class-names", "--quiet"):
        assert option in out
    assert "in embedding distance units" in flattened
    assert "dimensionless, result in bits" in flattened
    assert "(default: 20)" in flattened


def test_module_entry_point_runs(tmp_path, data):
    np.savez(tmp_path / "run.npz", embeddings=data[0], labels=data[1])
    command = [sys.executable, "-m", "pmg_torch.cli", "analyze", str(tmp_path / "run.npz"), "--metrics", "volume"]
    result = subprocess.run([*command, "--format", "csv"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert_csv_matches(read_csv(result.stdout), expected_report(data, ["volume"]), ["volume"])


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("pmg-torch")
    if not script.exists():
        pytest.skip("the pmg-torch console script is not installed next to this interpreter; run pip install -e .")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.strip() == f"pmg-torch {pmg_torch.__version__}"
