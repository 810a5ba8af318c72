"""Regenerate ``docs/tensorboard.png``: the TensorBoard view of a digits training run, as a user sees it.

The script trains ``examples/train_digits.py`` into a temporary log folder, serves that folder with TensorBoard on
127.0.0.1 at a free port, and has headless Chromium take a screenshot of the custom-scalars page (or another
page). Run it from the repository root on a machine with Debian's ``chromium`` package
(``apt-get install -y chromium``)::

    python scripts/make_screenshot.py                      # writes docs/tensorboard.png
    python scripts/make_screenshot.py --page images --output /tmp/images.png

It is not part of the test suite, because CI has no Chromium. It connects to nothing but the TensorBoard server it
starts on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
#: Seconds to wait for TensorBoard to respond, and for Chromium to render and write the screenshot.
SERVER_TIMEOUT = 120
CHROMIUM_TIMEOUT = 180
#: Hash parameters of every page: no smoothing, so each plotted point is a logged value.
PAGE_OPTIONS = "_smoothingWeight=0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs of the digits run (default: 8)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "tensorboard.png", help="PNG file to write")
    parser.add_argument(
        "--page",
        default="custom_scalars",
        help="TensorBoard page, e.g. custom_scalars or images (default: custom_scalars)",
    )
    parser.add_argument("--width", type=int, default=1400, help="browser window width in pixels (default: 1400)")
    parser.add_argument("--height", type=int, default=1400, help="browser window height in pixels (default: 1400)")
    parser.add_argument("--logdir", type=Path, help="serve this log folder instead of training a new run")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def train_digits(logdir: Path, epochs: int) -> None:
    command = [sys.executable, str(REPO_ROOT / "examples" / "train_digits.py"), "--epochs", str(epochs)]
    subprocess.run([*command, "--logdir", str(logdir)], check=True, cwd=logdir)


def wait_for_server(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + SERVER_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"TensorBoard exited with status {server.returncode} before serving {url}.")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(1)
    raise TimeoutError(f"TensorBoard did not respond at {url} within {SERVER_TIMEOUT} s.")


def screenshot(url: str, output: Path, width: int, height: int, profile: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise FileNotFoundError("Chromium not found on PATH; install Debian's package with `apt-get install chromium`.")
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        "--virtual-time-budget=20000",
        f"--screenshot={output}",
        f"--window-size={width},{height}",
        url,
    ]
    subprocess.run(command, check=True, timeout=CHROMIUM_TIMEOUT, capture_output=True)
    if not output.is_file():
        raise RuntimeError(f"Chromium exited without writing {output}.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pmg_screenshot_") as scratch:
        scratch_dir = Path(scratch)
        logdir = args.logdir
        if logdir is None:
            logdir = scratch_dir / "logs"
            logdir.mkdir()
            train_digits(logdir, args.epochs)
        port = free_port()
        # Started in the folder's parent with a relative path, so the page shows "logs" rather than a temporary path.
        logdir = logdir.resolve()
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", logdir.name, "--host", HOST, "--port", str(port)],
            cwd=logdir.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_server(f"http://{HOST}:{port}/", server)
            url = f"http://{HOST}:{port}/#{args.page}&{PAGE_OPTIONS}"
            screenshot(url, args.output.resolve(), args.width, args.height, scratch_dir / "chromium")
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
