"""Weights & Biases logging that works with or without an account, and the resolved config in every logger.

``WandbLogger`` is Lightning's, with the project's defaults (project ``deeplab-lit``) and one addition:
it goes offline by itself when ``WANDB_MODE=offline`` is set or when no W&B API key is configured (no
``WANDB_API_KEY``, no ``wandb login``), printing one line that says where the run is and how to upload it
later with ``wandb sync``. With a key it logs online as usual.

``LearningRateMonitor`` is Lightning's, quiet instead of failing when the trainer has no logger
(``--trainer.logger=false``), so the configs can always list it.

``ConfigToLoggers`` is LightningCLI's ``SaveConfigCallback`` (which writes ``config.yaml`` to the log
folder) that also hands the whole resolved config (trainer, model, data, checkpoint, seed) to every
logger, so a W&B run's config panel holds every option of the run and runs can be filtered by any.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor as _LightningLearningRateMonitor
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_info

#: ``WANDB_MODE`` values that mean "write locally, upload later".
OFFLINE_MODES = ("offline", "dryrun")


def wandb_api_key_configured() -> bool:
    """Whether W&B has credentials (``WANDB_API_KEY`` or ``wandb login``), without prompting or network."""
    import wandb

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(wandb.login(prompt=False, verify=False))  # wandb >= 0.22
    except TypeError:  # older wandb: no `prompt` argument
        return wandb.api.api_key is not None


def resolve_offline(offline: bool | None) -> tuple[bool, str]:
    """Decide offline mode: ``(offline, why)``.

    An explicit ``offline`` wins; else ``WANDB_MODE`` decides when set; else offline when no API key is
    configured.
    """
    if offline is not None:
        return offline, "offline=True" if offline else "offline=False"
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in OFFLINE_MODES, f"WANDB_MODE={mode}"
    if wandb_api_key_configured():
        return False, "an API key is configured"
    return True, "no W&B API key is configured (WANDB_API_KEY or `wandb login`)"


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with project defaults and automatic offline mode.

    Args:
        name: Run name shown in W&B (the configs use e.g. ``v3-voc``).
        project: W&B project.
        save_dir: Folder of the local ``wandb/`` run files; the CLI sets it to ``trainer.default_root_dir``
            when left None (outside the CLI: the current folder).
        offline: True/False forces the mode; None (default) is offline when ``WANDB_MODE=offline`` or
            no API key is configured, online otherwise.
        log_model: Upload checkpoints as W&B artifacts: True at the end of training, ``"all"`` as they are
            written. Not possible offline (a notice says so and it is turned off).
        id: Run id, to continue an existing W&B run (e.g. when resuming from a checkpoint).
        entity: W&B user or team.
        group: Group runs together (e.g. one ablation).
        tags: Tags of the run.
        notes: Free-text description.
        **kwargs: Further ``wandb.init`` arguments.
    """

    def __init__(
        self,
        name: str | None = None,
        project: str = "deeplab-lit",
        save_dir: str | None = None,
        offline: bool | None = None,
        log_model: bool | Literal["all"] = False,
        id: str | None = None,  # wandb's own name for it
        entity: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        **kwargs: Any,
    ) -> None:
        try:
            import wandb  # noqa: F401  (an optional extra: say how to get it, or how to log without it)
        except ImportError as err:
            raise ModuleNotFoundError(
                "WandbLogger needs the wandb package: pip install 'deeplab-lit[wandb]'. Or log without it: "
                "--trainer.logger=CSVLogger --trainer.logger.save_dir=logs, or --trainer.logger=false"
            ) from err
        self.offline, reason = resolve_offline(offline)
        save_dir = "." if save_dir is None else os.fspath(save_dir)
        # LightningCLI resolves **kwargs down to wandb.init's signature and passes every unset one as None
        # (mode=None, resume=None...), which would override Lightning's and ours: keep only those given.
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        if self.offline:
            kwargs.setdefault("mode", "offline")  # wandb.init's own argument: no global WANDB_MODE change
            runs = os.path.join(save_dir, "wandb", "offline-run-*")
            rank_zero_info(f"W&B logs offline ({reason}) to {runs}; upload later with: wandb sync {runs}")
            if log_model:
                rank_zero_info("W&B: log_model is off in offline mode; checkpoints stay on disk only.")
                log_model = False
        extra: dict[str, Any] = {"entity": entity, "group": group, "tags": tags, "notes": notes}
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            log_model=log_model,
            id=id,
            **{k: v for k, v in extra.items() if v is not None},
            **kwargs,
        )


class ConfigToLoggers(SaveConfigCallback):
    """Write ``config.yaml`` to the log folder (as LightningCLI does) and log the config to every logger.

    The config arrives as the hyper-parameter ``config`` (nested: ``config.model.init_args.lr``...).
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Log the resolved config (rank 0 only; Lightning calls this once per run)."""
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        config.pop("config", None)  # the --config file paths
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class LearningRateMonitor(_LightningLearningRateMonitor):
    """Lightning's ``LearningRateMonitor`` (``lr-SGD/pg1``...), doing nothing when there is no logger."""

    def on_train_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        """Set up as Lightning's does, if the trainer has a logger."""
        self._has_logger = bool(trainer.loggers)
        if self._has_logger:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        """Log the step's learning rates (``logging_interval: step``)."""
        if getattr(self, "_has_logger", False):
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        """Log the epoch's learning rates (``logging_interval: epoch``)."""
        if getattr(self, "_has_logger", False):
            super().on_train_epoch_start(trainer, *args, **kwargs)
