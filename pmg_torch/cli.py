"""The ``pmg-torch`` command line: per-class manifold geometry of embeddings saved to disk.

Example::

    pmg-torch analyze embeddings.npy --labels labels.npy
    pmg-torch analyze run.npz --embeddings-key emb --labels-key y --metrics curvature,volume --format csv
    pmg-torch analyze val.pt --class-names classes.txt --format json --output geometry.json

This module is the only place in the package that writes to stdout. Results go to stdout (or ``--output``);
warnings, the progress bar and errors go to stderr. A problem with the input files or the options ends the
command with exit status 2 and a one-line message, without a traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from . import __version__
from ._validation import DegenerateInputWarning
from .analysis import AVAILABLE_METRICS, ManifoldReport, analyze
from .topology import MAX_RIPSER_POINTS

PROGRAM = "pmg-torch"
EXIT_OK = 0
EXIT_INPUT_ERROR = 2

#: Array names taken as the embeddings or the labels of an ``.npz`` or ``.pt`` file when no key option is given.
EMBEDDINGS_NAMES = ("embeddings", "features", "x")
LABELS_NAMES = ("labels", "targets", "y")

#: File suffixes the command reads, and how.
NUMPY_SUFFIXES = (".npy", ".npz")
TORCH_SUFFIXES = (".pt", ".pth")


class InputError(Exception):
    """A problem with the input files or the options that the user has to fix, so the command exits with status 2."""


@dataclass
class Inputs:
    """Embeddings and labels read from disk and checked against each other."""

    embeddings: Tensor
    labels: Tensor
    class_names: dict[int, str] | None


# Reading


def read_arrays(path: Path) -> dict[str, Tensor | np.ndarray]:
    """Read every array of an ``.npy``, ``.npz`` or ``.pt`` file into a mapping from array name to array.

    An ``.npy`` file and a ``.pt`` file holding one tensor give a single array named ``""``. An ``.npz`` file gives
    its named arrays, and a ``.pt`` file holding a dict gives its tensor values. No arbitrary object is unpickled:
    ``.npy`` and ``.npz`` files are read with ``allow_pickle=False``, and ``.pt`` files with
    ``torch.load(weights_only=True)``, which loads only tensors, numbers, strings and containers of them.

    Raises:
        InputError: if the file is missing, has an unknown suffix, cannot be parsed, or contains no array.
    """
    if not path.exists():
        raise InputError(f"{path}: file not found.")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file.")
    suffix = path.suffix.lower()
    if suffix not in NUMPY_SUFFIXES + TORCH_SUFFIXES:
        raise InputError(f"{path}: unknown file type {suffix!r}. Expected .npy, .npz, .pt or .pth.")
    try:
        arrays = _read_torch(path) if suffix in TORCH_SUFFIXES else _read_numpy(path)
    except (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: cannot be read as a {suffix} file ({_first_line(error)}).") from error
    if not arrays:
        raise InputError(f"{path}: contains no array.")
    return arrays


def _read_numpy(path: Path) -> dict[str, Tensor | np.ndarray]:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        return {"": loaded}
    with loaded:
        # Indexing an NpzFile reads and decompresses that member, so every member is read here before closing.
        return {name: loaded[name] for name in loaded.files}


def _read_torch(path: Path) -> dict[str, Tensor | np.ndarray]:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Tensor):
        return {"": loaded}
    if isinstance(loaded, Mapping):
        return {str(name): value for name, value in loaded.items() if isinstance(value, Tensor)}
    raise ValueError(f"expected a tensor or a dict of tensors, found {type(loaded).__name__}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def select_array(
    arrays: Mapping[str, Tensor | np.ndarray], path: Path, key: str | None, role: str, names: Sequence[str]
) -> Tensor | np.ndarray:
    """Pick the ``role`` array ("embeddings" or "labels") out of the arrays of one file.

    With ``key`` given, that array is taken. Otherwise a file that contains a single array gives it, and a file of
    several arrays gives the one with a name from ``names`` (checked in order).

    Raises:
        InputError: if ``key`` is given but the file has no array of that name or contains one unnamed array, or if
            no array can be chosen without a key.
    """
    option = f"--{role}-key"
    if key is not None:
        if list(arrays) == [""]:
            raise InputError(f"{path}: contains a single unnamed array, so {option} {key!r} does not apply. Remove it.")
        if key not in arrays:
            raise InputError(f"{path}: has no array named {key!r}. Its arrays are {_list_names(arrays)}.")
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    for name in names:
        if name in arrays:
            return arrays[name]
    raise InputError(
        f"{path}: contains {len(arrays)} arrays ({_list_names(arrays)}), and none is named as {role} "
        f"({', '.join(names)}). Choose one with {option}."
    )


def _list_names(arrays: Mapping[str, Any]) -> str:
    return ", ".join(repr(name) for name in arrays)


# Checking


def as_embeddings(array: Tensor | np.ndarray, path: Path) -> Tensor:
    """Return ``array`` as an ``(N, D)`` floating-point tensor, or raise :class:`InputError` saying what is wrong."""
    tensor = _as_tensor(array, path, "embeddings", _is_floating, "floating point (float16, float32 or float64)")
    if tensor.ndim != 2:
        raise InputError(
            f"{path}: embeddings must be a 2-D array of shape (N, D), got a {tensor.ndim}-D array of shape "
            f"{tuple(tensor.shape)}."
        )
    if tensor.shape[0] < 1 or tensor.shape[1] < 1:
        raise InputError(
            f"{path}: embeddings must have at least one row and one column, got shape {tuple(tensor.shape)}."
        )
    return tensor


def as_labels(array: Tensor | np.ndarray, path: Path, n_rows: int) -> Tensor:
    """Return ``array`` as an ``(N,)`` int64 tensor of class labels, or raise :class:`InputError`."""
    tensor = _as_tensor(array, path, "labels", _is_integer, "integers")
    if tensor.ndim != 1:
        raise InputError(
            f"{path}: labels must be a 1-D array of shape (N,), got a {tensor.ndim}-D array of shape "
            f"{tuple(tensor.shape)}."
        )
    if tensor.shape[0] != n_rows:
        raise InputError(
            f"{path}: there are {tensor.shape[0]} labels for {n_rows} embedding rows. Expected one label per row."
        )
    if tensor.dtype == torch.uint64 and bool((tensor > torch.iinfo(torch.int64).max).any()):
        raise InputError(f"{path}: labels must fit in int64, got values above {torch.iinfo(torch.int64).max}.")
    return tensor.to(torch.int64)


def _is_floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _is_integer(dtype: torch.dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def _as_tensor(
    array: Tensor | np.ndarray, path: Path, role: str, accepts: Callable[[torch.dtype], bool], expected: str
) -> Tensor:
    dtype_name = str(array.dtype).removeprefix("torch.")
    wrong_dtype = InputError(f"{path}: {role} must be {expected}, got {dtype_name}.")
    if isinstance(array, np.ndarray):
        if array.dtype.kind not in "biuf":
            raise wrong_dtype
        try:
            # torch.from_numpy rejects non-native byte order, which .npy files written on another machine can have.
            array = torch.from_numpy(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("=")))
        except TypeError as error:
            raise wrong_dtype from error
    if not accepts(array.dtype):
        raise wrong_dtype
    return array


def read_class_names(path: Path, labels: Tensor) -> dict[int, str]:
    """Read one class name per line, line ``i`` naming label ``i``, and return the names of the labels present.

    Surrounding whitespace of each name and empty lines at the end of the file are ignored.

    Raises:
        InputError: if the file cannot be read, a name is empty or repeated, or a label has no line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the class names ({_first_line(error)}).") from error
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise InputError(f"{path}: line {names.index('') + 1} is empty. Expected one class name per line.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{path}: class names must be distinct, but {', '.join(map(repr, repeated))} repeat.")
    present = sorted(int(label) for label in torch.unique(labels))
    unnamed = [label for label in present if not 0 <= label < len(names)]
    if unnamed:
        raise InputError(
            f"{path}: has {len(names)} names for labels 0 to {len(names) - 1}, but the labels include {unnamed[0]}."
        )
    return {label: names[label] for label in present}


def read_inputs(arguments: argparse.Namespace) -> Inputs:
    """Read and check the embeddings, the labels and the class names the options name."""
    embeddings_path = Path(arguments.embeddings)
    embeddings_file = read_arrays(embeddings_path)
    embeddings = as_embeddings(
        select_array(embeddings_file, embeddings_path, arguments.embeddings_key, "embeddings", EMBEDDINGS_NAMES),
        embeddings_path,
    )
    if arguments.labels is None:
        labels_path, labels_file = embeddings_path, embeddings_file
        if len(embeddings_file) == 1:
            raise InputError(f"{embeddings_path}: contains only the embeddings. Pass the labels with --labels FILE.")
    else:
        labels_path = Path(arguments.labels)
        labels_file = read_arrays(labels_path)
    labels = as_labels(
        select_array(labels_file, labels_path, arguments.labels_key, "labels", LABELS_NAMES),
        labels_path,
        embeddings.shape[0],
    )
    class_names = None if arguments.class_names is None else read_class_names(Path(arguments.class_names), labels)
    return Inputs(embeddings, labels, class_names)


def parse_metrics(values: Sequence[str] | None) -> list[str]:
    """Split ``--metrics`` values on commas and check every name; ``None`` means every available metric."""
    if values is None:
        return list(AVAILABLE_METRICS)
    metrics = [name.strip() for value in values for name in value.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in AVAILABLE_METRICS]
    if unknown:
        raise InputError(
            f"unknown metric {', '.join(map(repr, unknown))}. Available metrics: {', '.join(AVAILABLE_METRICS)}."
        )
    if not metrics:
        raise InputError(f"--metrics names no metric. Available metrics: {', '.join(AVAILABLE_METRICS)}.")
    return list(dict.fromkeys(metrics))


def parse_device(name: str) -> torch.device:
    """Return the torch device called ``name``, or raise :class:`InputError` if it is invalid or not available."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise InputError(f"invalid --device {name!r} ({_first_line(error)}).") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name!r} requested, but CUDA is not available on this machine.")
    return device


# Output


def format_report(report: ManifoldReport, output_format: str, input_files: Mapping[str, str | None]) -> str:
    """Render ``report`` as the aligned text table, CSV or JSON.

    The JSON document is :meth:`ManifoldReport.to_dict` with two more keys: ``pmg_torch_version`` and
    ``input_files``, the paths the values came from.
    """
    if output_format == "csv":
        return report_csv(report)
    if output_format == "json":
        document = {"pmg_torch_version": __version__, "input_files": dict(input_files), **report.to_dict()}
        return json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n"
    return report.table() + "\n"


def report_csv(report: ManifoldReport) -> str:
    """Write one CSV row per class: label, name, row counts, then one column per metric.

    Floats are written with ``repr`` so that they read back to the same value; NaN is written ``nan``.
    """
    metrics = list(report.values)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "class_name", "n_samples", "n_duplicates", "n_nonfinite", *metrics])
    for label in report.classes:
        counts = [report.n_samples[label], report.n_duplicates[label], report.n_nonfinite[label]]
        row_values = [repr(float(report.values[metric][label])) for metric in metrics]
        writer.writerow([label, report.class_names[label], *counts, *row_values])
    return buffer.getvalue()


def json_safe(value: Any) -> Any:
    """Return ``value`` with NaN and infinite floats replaced by ``None``, so that it is valid JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


# The command


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append "(default: ...)" to an option's help only when the default is a value the user would type."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """Build the ``pmg-torch`` argument parser with its ``analyze`` subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="Measure the geometry of each class's embeddings (perceptual manifolds).",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    analyze_parser = commands.add_parser(
        "analyze",
        help="compute per-class geometry metrics of saved embeddings",
        description=(
            "Compute geometry metrics for each class of saved embeddings and print them as a table, CSV or JSON. "
            "Files may be .npy, .npz or .pt/.pth. Without a key option, an .npz or .pt file that contains one array "
            f"gives it, and one with several arrays gives the one named {'/'.join(EMBEDDINGS_NAMES)} (embeddings) "
            f"or {'/'.join(LABELS_NAMES)} (labels)."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_input_arguments(analyze_parser)
    _add_metric_arguments(analyze_parser)
    _add_output_arguments(analyze_parser)
    return parser


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("input")
    group.add_argument("embeddings", metavar="EMBEDDINGS", help="file of embeddings, a float array of shape (N, D)")
    group.add_argument(
        "--labels",
        metavar="FILE",
        help="file of class labels, an integer array of shape (N,); may be omitted when EMBEDDINGS is an .npz or "
        ".pt file that also contains the labels",
    )
    group.add_argument("--embeddings-key", metavar="NAME", help="name of the embeddings array in an .npz or .pt file")
    group.add_argument(
        "--labels-key",
        metavar="NAME",
        help="name of the labels array in the labels file (or in EMBEDDINGS when --labels is omitted)",
    )
    group.add_argument(
        "--class-names", metavar="FILE", help="text file of class names, one per line; line i names label i"
    )
    group.add_argument(
        "--device", default="cpu", metavar="DEVICE", help="torch device to compute on, e.g. cpu, cuda or cuda:1"
    )


def _add_metric_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("metrics")
    group.add_argument(
        "--metrics",
        action="append",
        metavar="NAMES",
        help="metrics to compute, separated by commas; the option may be repeated (default: all of "
        f"{', '.join(AVAILABLE_METRICS)})",
    )
    group.add_argument(
        "--k",
        type=_positive_int,
        default=20,
        metavar="K",
        help="nearest neighbours per point for curvature and kNN dimension, at least 2",
    )
    group.add_argument(
        "--tangent-dim",
        type=_positive_int,
        default=None,
        metavar="DIM",
        help="dimension of the local tangent spaces for curvature (default: chosen per class from the data)",
    )
    group.add_argument(
        "--curvature-method",
        choices=("tangent", "reference"),
        default="tangent",
        help="curvature estimator: tangent, the mean principal angle between neighbouring tangent spaces in "
        "radians, or reference, the formula of the published curvature code",
    )
    group.add_argument(
        "--id-method",
        choices=("tle", "mle", "twonn", "pr"),
        default="tle",
        help="intrinsic-dimension estimator: tle, mle (Levina-Bickel), twonn, or pr (participation ratio)",
    )
    group.add_argument(
        "--volume-scale",
        type=_positive_float,
        default=1.0,
        metavar="D",
        help="scale d in volume = 1/2 log2 det(I + (d/m) Zc^T Zc); dimensionless, result in bits",
    )
    group.add_argument(
        "--holes-threshold",
        type=_non_negative_float,
        default=0.1,
        metavar="DISTANCE",
        help="persistence (death - birth, in embedding distance units) above which an H1 bar counts as a hole",
    )
    group.add_argument(
        "--holes-max-points",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"max rows per class given to ripser, subsampled with --seed (default: {MAX_RIPSER_POINTS})",
    )
    group.add_argument(
        "--n-projections",
        type=_positive_int,
        default=10,
        metavar="N",
        help="random projections averaged for nonconvexity",
    )
    group.add_argument(
        "--seed", type=int, default=0, metavar="SEED", help="seed for subsampling and random projections"
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format; csv has one row per class, json writes NaN as null",
    )
    group.add_argument("--output", metavar="FILE", help="write the result to FILE instead of stdout")
    group.add_argument(
        "--quiet", action="store_true", help="hide the progress bar and the warnings about classes with NaN values"
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def analysis_options(arguments: argparse.Namespace) -> dict[str, Any]:
    """Return the keyword arguments of :func:`pmg_torch.analyze` that the options set, except the metrics."""
    return {
        "k": arguments.k,
        "tangent_dim": arguments.tangent_dim,
        "curvature_method": arguments.curvature_method,
        "id_method": arguments.id_method,
        "volume_scale": arguments.volume_scale,
        "holes_threshold": arguments.holes_threshold,
        "holes_max_points": arguments.holes_max_points,
        "n_projections": arguments.n_projections,
        "seed": arguments.seed,
    }


def compute_report(
    inputs: Inputs, metrics: Sequence[str], options: Mapping[str, Any], *, show_progress: bool
) -> ManifoldReport:
    """Run :func:`pmg_torch.analyze` one class at a time, so that a progress bar can advance per class.

    Every per-class metric of a class depends only on that class's rows, so the merged report equals one
    ``analyze`` call on all classes. Shape similarity compares classes and is computed afterwards in one call over
    all classes. The bar goes to stderr, appears only on a terminal, and only when the work takes over a second.
    """
    clouds = {int(label): inputs.embeddings[inputs.labels == label] for label in torch.unique(inputs.labels)}
    ordered = [metric for metric in AVAILABLE_METRICS if metric in metrics]
    per_class_metrics = [metric for metric in ordered if metric != "shape_similarity"]
    progress = tqdm(
        clouds, desc="classes", unit="class", file=sys.stderr, delay=1.0, disable=None if show_progress else True
    )
    parts = {
        label: analyze({label: clouds[label]}, metrics=per_class_metrics, class_names=inputs.class_names, **options)
        for label in progress
    }
    cross = None
    if "shape_similarity" in ordered:
        cross = analyze(clouds, metrics=["shape_similarity"], class_names=inputs.class_names, **options)
    return merge_reports(parts, cross, ordered)


def merge_reports(
    parts: Mapping[int, ManifoldReport], cross: ManifoldReport | None, metrics: Sequence[str]
) -> ManifoldReport:
    """Join single-class reports, and the cross-class report of shape similarity, into one report."""
    classes = list(parts)
    values = {}
    for metric in metrics:
        source = {label: cross if metric == "shape_similarity" else parts[label] for label in classes}
        values[metric] = {label: source[label].values[metric][label] for label in classes}
    first = parts[classes[0]]
    return ManifoldReport(
        classes=classes,
        class_names={label: parts[label].class_names[label] for label in classes},
        values=values,
        n_samples={label: parts[label].n_samples[label] for label in classes},
        n_duplicates={label: parts[label].n_duplicates[label] for label in classes},
        n_nonfinite={label: parts[label].n_nonfinite[label] for label in classes},
        local_curvature={label: curve for part in parts.values() for label, curve in part.local_curvature.items()},
        similarity=None if cross is None else cross.similarity,
        persistence_diagrams={
            label: diagram for part in parts.values() for label, diagram in part.persistence_diagrams.items()
        },
        settings={**first.settings, "metrics": list(metrics)},
    )


def run_analyze(arguments: argparse.Namespace) -> int:
    """Run ``pmg-torch analyze``: read the inputs, compute the report, and write it."""
    metrics = parse_metrics(arguments.metrics)
    device = parse_device(arguments.device)
    inputs = read_inputs(arguments)
    inputs = Inputs(inputs.embeddings.to(device), inputs.labels.to(device), inputs.class_names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DegenerateInputWarning)
        try:
            report = compute_report(inputs, metrics, analysis_options(arguments), show_progress=not arguments.quiet)
        except (ValueError, TypeError) as error:
            raise InputError(_first_line(error)) from error
    _report_warnings(caught, quiet=arguments.quiet)
    input_files = {"embeddings": arguments.embeddings, "labels": arguments.labels, "class_names": arguments.class_names}
    write_output(format_report(report, arguments.format, input_files), arguments.output)
    return EXIT_OK


def _report_warnings(caught: Sequence[warnings.WarningMessage], *, quiet: bool) -> None:
    """Print each distinct degenerate-class warning as a plain line on stderr, and re-issue other warnings.

    The shape-similarity pass cleans every class again, so a warning about a class's non-finite rows can come
    twice, but it is printed once.
    """
    printed = set()
    for warning in caught:
        if issubclass(warning.category, DegenerateInputWarning):
            message = str(warning.message)
            if not quiet and message not in printed:
                print(f"{PROGRAM}: warning: {message}", file=sys.stderr)
            printed.add(message)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def write_output(text: str, output: str | None) -> None:
    """Write ``text`` to the file ``output``, or to stdout when it is ``None``."""
    if output is None:
        sys.stdout.write(text)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as error:
        raise InputError(f"{output}: cannot write the output ({_first_line(error)}).") from error


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pmg-torch`` command with ``argv`` (default ``sys.argv[1:]``) and return its exit status.

    Returns:
        0 on success, 2 for invalid options or unusable input files (after a message on stderr).
    """
    parser = build_parser()
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits after --help, --version and usage errors; returning the status keeps main() callable.
        if exit_request.code is None:
            return EXIT_OK
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_INPUT_ERROR
    try:
        return run_analyze(arguments)
    except InputError as error:
        print(f"{PROGRAM} {arguments.command}: error: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR


if __name__ == "__main__":
    sys.exit(main())
