"""Where a run's scalars go besides ``metrics.jsonl``: ``train.logger`` names them, as the
``--report_to`` of diffusers' training scripts does.

- ``"tensorboard"``: event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard``, which needs the
  ``tensorboard`` package: ``pip install "hetvae[train]"``). Without it the run goes on with
  ``metrics.jsonl`` alone, after one warning.
- ``"wandb"``: a Weights & Biases run in ``RUN/wandb/``, named after the run folder, in the project
  ``$WANDB_PROJECT`` (default ``hetvae``), its config the run's resolved config. ``WANDB_MODE=offline``
  writes it locally only (``wandb sync`` uploads it later). A run that asks for it without the
  package installed is refused before it starts.
- ``"none"``: ``metrics.jsonl`` only.

Only rank 0 logs. Nothing is opened before the first record, so a run that fails to start leaves
no logger files behind.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hetvae.schema import ConfigError

__all__ = ["LOGGERS", "Loggers", "logger_names"]

LOGGERS = ("tensorboard", "wandb")
"""The loggers ``train.logger`` may name (besides ``"none"``)."""

WANDB_PROJECT_DEFAULT = "hetvae"


def logger_names(setting: str | list[str]) -> list[str]:
    """The loggers of a ``train.logger`` value: ``"none"`` -> ``[]``, ``"wandb"`` -> ``["wandb"]``, a
    list as it is."""
    if isinstance(setting, str):
        return [] if setting == "none" else [setting]
    return list(setting)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Loggers:
    """The loggers of ``train.logger`` for run folder ``run_dir``.

    Args:
        setting: ``train.logger``.
        run_dir: the run folder (created by the time the first record is logged).
        tensorboard_dir: where TensorBoard's event files go.
        config: the run's resolved config as plain data (wandb stores it with the run).
        warn: the caller's ``logger.warning``.

    Raises:
        ConfigError: ``wandb`` named but not installed (naming ``train.logger`` and the install).
    """

    def __init__(self, setting: str | list[str], run_dir: str | os.PathLike, *, tensorboard_dir: str | os.PathLike,
                 config: Mapping[str, Any], warn: Callable[..., object]) -> None:
        self.names = logger_names(setting)
        self.run_dir = Path(run_dir)
        self.tensorboard_dir = Path(tensorboard_dir)
        self.config = dict(config)
        self.warn = warn
        if "wandb" in self.names and not _installed("wandb"):
            raise ConfigError(
                "train.logger", f"names 'wandb' ({setting!r}), which is not installed: pip install wandb "
                "(or set train.logger=tensorboard or none)"
            )
        self._tensorboard: Any = None
        self._wandb: Any = None
        self._opened = False

    def _open(self) -> None:
        self._opened = True
        if "tensorboard" in self.names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.warn("train.logger: tensorboard is not installed (pip install \"hetvae[train]\"); the scalars "
                          "go to metrics.jsonl only")
            else:
                self._tensorboard = SummaryWriter(str(self.tensorboard_dir))
        if "wandb" in self.names:
            import wandb

            self._wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT_DEFAULT),
                name=self.run_dir.name,
                dir=str(self.run_dir),
                config=self.config,
            )

    def log(self, record: Mapping[str, float], step: int) -> None:
        """Log the numbers of ``record`` (``step`` and values that are not numbers left out) at ``step``."""
        if not self.names:
            return
        if not self._opened:
            self._open()
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tensorboard is not None:
            for key, value in scalars.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
