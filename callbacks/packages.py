"""The two Lightning packages, ``pytorch_lightning`` and ``lightning.pytorch``, seen as one.

They ship the same Trainer under two import paths, and each checks callbacks and loggers against its own classes:
``Trainer(callbacks=cb)`` with a single callback and LightningCLI's ``class_path`` accept only subclasses of the
package's own ``Callback``. :data:`CallbackBase` derives from the ``Callback`` of both packages when ``lightning``
is installed, so one callback class serves Trainers from either. :func:`tensorboard_writers` finds the
TensorBoard loggers of both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

__all__ = ["LIGHTNING_INSTALLED", "CallbackBase", "tensorboard_writers"]

try:
    from lightning.pytorch.callbacks import Callback as LightningCallback
    from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
except ImportError:  # the unified `lightning` package is optional
    LIGHTNING_INSTALLED = False
    TENSORBOARD_LOGGERS: tuple[type[Any], ...] = (TensorBoardLogger,)
else:
    LIGHTNING_INSTALLED = True
    TENSORBOARD_LOGGERS = (TensorBoardLogger, LightningTensorBoardLogger)


def _callback_base() -> type:
    if not LIGHTNING_INSTALLED:
        return Callback
    # Both bases define the same hooks as no-ops, so the method resolution order between them does not matter.
    return type(
        "CallbackBase",
        (Callback, LightningCallback),
        {"__doc__": "The ``Callback`` of ``pytorch_lightning`` and of ``lightning.pytorch``.", "__module__": __name__},
    )


if TYPE_CHECKING:
    CallbackBase = Callback
else:
    CallbackBase = _callback_base()


def tensorboard_writers(trainer: pl.Trainer | Any) -> list[Any]:
    """Return the ``SummaryWriter`` of every TensorBoard logger of ``trainer``, from either Lightning package."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TENSORBOARD_LOGGERS)]
