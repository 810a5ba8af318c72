"""Time pmg-torch against the reference implementations on the same inputs and print the ratios.

Run from the repository root::

    python benchmarks/run.py                  # the full table
    python benchmarks/run.py --quick          # small sizes and one repeat, a smoke run
    python benchmarks/run.py --device cuda    # pmg-torch on the GPU, the references on the CPU
    python benchmarks/run.py --save benchmarks/RESULTS.md

Every number printed is measured in this one process (memory probes run in subprocesses), side by side: a median
of repeated ``time.perf_counter`` timings after a warm-up run, synchronising the device before and after each.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# ``python benchmarks/run.py`` puts only ``benchmarks/`` on the import path, but the imports need the repository
# root, which contains the ``benchmarks`` package itself, ``pmg_torch`` and ``callbacks``.
REPOSITORY = Path(__file__).resolve().parents[1]
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

import torch  # noqa: E402

from benchmarks.harness import MemoryRow, Row, Target, render_memory, render_rows, render_targets  # noqa: E402

Section = Callable[[], tuple[list[Row], list[Target]]]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Time pmg-torch against the reference implementations.")
    parser.add_argument("--device", default="cpu", help="device pmg-torch runs on, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats, for a smoke test")
    parser.add_argument("--save", type=Path, default=None, help="also write the output, with the machine, to this file")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch and for the BLAS and OpenMP pools of numpy, scikit-learn and scikit-dimension "
        "(default: each library's own default)",
    )
    parser.add_argument(
        "--skip-callback", action="store_true", help="leave out the Lightning callback timings and the memory probes"
    )
    return parser.parse_args(argv)


def describe_machine(device: torch.device) -> list[str]:
    """Return lines naming the CPU model, core count, torch version and, for CUDA, the GPU."""
    lines = [
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"Python {platform.python_version()}, torch {torch.__version__}, numpy {_version('numpy')}, "
        f"scikit-dimension {_version('skdim')}, ripser {_version('ripser')}, "
        f"pytorch-lightning {_version('pytorch_lightning')}",
        f"device for pmg-torch: {device}",
    ]
    if device.type == "cuda":
        lines.append(f"GPU: {torch.cuda.get_device_name(device)}")
    return lines


def _options(args: argparse.Namespace) -> str:
    """Return the command-line options that change what is measured, as typed."""
    options = " --quick" if args.quick else ""
    if args.device != "cpu":
        options += f" --device {args.device}"
    if args.threads is not None:
        options += f" --threads {args.threads}"
    if args.skip_callback:
        options += " --skip-callback"
    return options


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "unknown"


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _version(module_name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    distribution = {"skdim": "scikit-dimension", "pytorch_lightning": "pytorch-lightning"}.get(module_name, module_name)
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def run_section(name: str, section: Section, rows: list[Row], targets: list[Target]) -> bool:
    """Run one section, add its rows and targets, and return whether it succeeded.

    A section that raises adds one row that names the error instead, so that the other sections still report.
    """
    start = time.perf_counter()
    try:
        section_rows, section_targets = section()
    except Exception as error:  # noqa: BLE001 - one failed section must not hide the others' numbers
        traceback.print_exc(file=sys.stderr)
        rows.append(Row(name, None, None, note=f"FAILED: {type(error).__name__}: {error}"))
        return False
    rows.extend(section_rows)
    targets.extend(section_targets)
    print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run every section, print the tables and return 0, or 1 if a section failed."""
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        print(f"--device must be cpu or a CUDA device such as cuda or cuda:1, got {args.device!r}.", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        message = f"--device {args.device} was requested, but torch {torch.__version__} sees no CUDA device."
        print(message, file=sys.stderr)
        return 2

    from benchmarks import metric_rows

    if args.threads is not None:
        if args.threads < 1:
            print(f"--threads must be at least 1, got {args.threads}.", file=sys.stderr)
            return 2
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        # The limits stay in force for the rest of the process; the memory probes' subprocesses copy torch's count.
        threadpool_limits(limits=args.threads)

    sizes = metric_rows.QUICK if args.quick else metric_rows.FULL
    rows: list[Row] = []
    targets: list[Target] = []
    memory: list[MemoryRow] = []
    started = time.perf_counter()
    load_before = _load_average()
    sections: list[tuple[str, Section]] = [
        ("curvature", lambda: metric_rows.curvature_rows(sizes, device)),
        ("intrinsic dimension", lambda: metric_rows.dimension_rows(sizes, device)),
        ("holes", lambda: metric_rows.holes_rows(sizes, device)),
        ("volume", lambda: metric_rows.volume_rows(sizes, device)),
        ("suite", lambda: metric_rows.suite_rows(sizes, device)),
    ]
    if not args.skip_callback:
        sections.append(("callback", lambda: _callback_section(args.quick, device, memory)))
    succeeded = [run_section(name, section, rows, targets) for name, section in sections]

    lines = [
        f"# pmg-torch benchmarks{' (--quick)' if args.quick else ''}",
        "",
        f"Run on {datetime.date.today().isoformat()} with `python benchmarks/run.py{_options(args)}`.",
        "",
        *(f"- {line}" for line in describe_machine(device)),
        f"- 1-minute load average {load_before} before the run and {_load_average()} after it; a value above the "
        "core count means other processes competed for the CPU while it was timed",
        "",
        "Times are medians after a warm-up run. `reference / ours` above 1 means pmg-torch is faster.",
        "",
        render_rows(rows),
        "",
        render_targets(targets),
    ]
    if memory:
        lines += ["", render_memory(memory)]
    lines += ["", f"Whole run: {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines)
    print(text)
    if args.save is not None:
        args.save.write_text(text + "\n")
    return 0 if all(succeeded) else 1


def _callback_section(quick: bool, device: torch.device, memory: list[MemoryRow]) -> tuple[list[Row], list[Target]]:
    """Time the callback on the digits example and, in a full run, on a 512-d synthetic model; probe memory."""
    from benchmarks import callback_cost

    workloads = [callback_cost.load_digits_workload(with_expensive=not quick)]
    if quick:
        max_per_class, embedding_dim, val_rows, knn_rows = 50, 64, 2_000, 1_000
    else:
        max_per_class, embedding_dim, val_rows, knn_rows = 1000, 512, 30_000, 10_000
        workloads.append(callback_cost.synthetic_workload(val_rows, embedding_dim, max_per_class))
    rows, targets = callback_cost.callback_rows(
        workloads, device, repeats=1 if quick else 7, compute_repeats=1 if quick else 2
    )
    memory_rows, memory_targets = callback_cost.memory_rows(
        capture_rows=val_rows,
        knn_rows=knn_rows,
        embedding_dim=embedding_dim,
        k=20,
        max_per_class=max_per_class,
        device=device,
    )
    memory.extend(memory_rows)
    return rows, targets + memory_targets


if __name__ == "__main__":
    sys.exit(main())
