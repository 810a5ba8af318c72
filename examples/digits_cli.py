"""Train the digits classifier through LightningCLI, with everything set in a YAML config.

Run from the repository root::

    python examples/digits_cli.py fit --config configs/digits.yaml
    python examples/digits_cli.py fit --config configs/digits.yaml --trainer.max_epochs=3

The config lists :class:`callbacks.ManifoldGeometryCallback` under ``trainer.callbacks``, so any of its arguments
can be set there or on the command line. LightningCLI needs ``jsonargparse[signatures]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running ``python examples/digits_cli.py`` puts only ``examples/`` on the import path. The repository root
# contains ``callbacks`` and ``pmg_torch``, which the config names by class path and which a checkout that is not
# pip-installed imports from there.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from digits import DigitsClassifier, DigitsDataModule  # noqa: E402
from pytorch_lightning.cli import LightningCLI  # noqa: E402


def main(args: list[str] | None = None) -> None:
    """Run LightningCLI on ``args``, or on the command line when ``args`` is ``None``."""
    LightningCLI(DigitsClassifier, DigitsDataModule, args=args)


if __name__ == "__main__":
    main()
