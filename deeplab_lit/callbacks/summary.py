"""``RunSummary``: what a finished fit produced and what to run next, printed once at its end.

A run's figures are spread over the progress bar, the loggers and the checkpoint folder; a researcher who
just ran the quickstart wants one answer: how good is the model (best validation mIoU, and after the dense
CRF where a :class:`~deeplab_lit.callbacks.DenseCRFCallback` ran), where are the checkpoint and the
pictures, and which command segments their own photos with it. :class:`~deeplab_lit.cli.DeepLabCLI` adds it
to every run (``summary.*`` options).
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only


class RunSummary(Callback):
    """Print the best mIoU (offline and trained CRF too), the checkpoint and picture folders, next commands.

    Args:
        monitor: The validation metric whose best value is reported (the checkpoint callback's, when one
            monitors it, so the figure is the saved checkpoint's).
        command: How the user runs this program, for the suggested commands.
    """

    def __init__(self, monitor: str = "val/mIoU", command: str = "deeplab-lit") -> None:
        self.monitor = monitor
        self.command = command
        self.best: dict[str, tuple[float, int]] = {}  # metric -> (best value, epoch)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember the best value of the monitored metric and of the CRF's figures seen so far."""
        if trainer.sanity_checking:
            return
        metrics, epoch = trainer.callback_metrics, trainer.current_epoch
        crf, baseline = f"{self.monitor}_crf", f"{self.monitor}_crf_baseline"
        # the trained CRF (crf_rnn) and the network alone at its best epoch
        trained, network = f"{self.monitor}_crf_rnn", f"{self.monitor}_crf_rnn_network"
        for name in (self.monitor, crf, trained):
            number = float(metrics[name]) if name in metrics else math.nan
            if math.isfinite(number) and number > self.best.get(name, (-math.inf, 0))[0]:
                self.best[name] = (number, epoch)
                if name == crf and baseline in metrics:  # the same images without the CRF, same epoch
                    self.best[baseline] = (float(metrics[baseline]), epoch)
                if name == trained and self.monitor in metrics:
                    self.best[network] = (float(metrics[self.monitor]), epoch)

    def state_dict(self) -> dict[str, Any]:
        """Keep the best figures in checkpoints, so a resumed run reports over the whole run."""
        return {"best": {name: list(pair) for name, pair in self.best.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the best figures of the run before the interruption."""
        self.best = {name: (float(v), int(e)) for name, (v, e) in state_dict.get("best", {}).items()}

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the summary (rank 0 only)."""
        print(self.render(trainer))

    def render(self, trainer: Trainer) -> str:
        """Return the summary's text."""
        lines = ["", "Run summary"]
        if self.monitor in self.best:
            value, epoch = self.best[self.monitor]
            lines.append(f"  best {self.monitor}: {value:.4f} (epoch {epoch})")
        else:
            lines.append(f"  {self.monitor}: never computed (no validation ran)")
        crf, baseline = self.best.get(f"{self.monitor}_crf"), self.best.get(f"{self.monitor}_crf_baseline")
        if crf is not None:
            before = f"{baseline[0]:.4f} without" if baseline is not None else "no figure without"
            lines.append(f"  best with the dense CRF: {crf[0]:.4f} (epoch {crf[1]}; {before} it, same set)")
        trained = self.best.get(f"{self.monitor}_crf_rnn")
        if trained is not None:
            network = self.best.get(f"{self.monitor}_crf_rnn_network")
            alone = f"; the network alone {network[0]:.4f}" if network is not None else ""
            lines.append(
                f"  best with the trained CRF (crf_rnn): {trained[0]:.4f} (epoch {trained[1]}{alone})"
            )
        checkpoint = _checkpoint_callback(trainer)
        best_path = checkpoint.best_model_path if checkpoint is not None else ""
        if checkpoint is not None:
            lines.append(f"  best checkpoint: {best_path or '(none saved)'}")
            if checkpoint.last_model_path:
                lines.append(f"  last checkpoint: {checkpoint.last_model_path} (resume: --ckpt_path last)")
        for folder, what in _picture_folders(trainer):
            lines.append(f"  {what}: {folder}")
        for logger in trainer.loggers:
            log_dir = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
            if log_dir:
                lines.append(f"  {type(logger).__name__} files: {log_dir}")
        if best_path:
            ckpt = shlex.quote(best_path)
            lines += [
                "Next:",
                f"  segment your photos:  {self.command} predict --ckpt_path {ckpt} "
                "--data.init_args.predict_path photos/ --prediction.output_dir masks/",
                f"  evaluate again:       {self.command} validate --ckpt_path {ckpt}",
            ]
        return "\n".join(lines)


def _checkpoint_callback(trainer: Trainer) -> ModelCheckpoint | None:
    """Return the trainer's checkpoint callback that saved a best model (else the first one), or None."""
    found = [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
    return next((c for c in found if c.best_model_path), found[0] if found else None)


def _picture_folders(trainer: Trainer) -> list[tuple[Path, str]]:
    """Return the folders that callbacks wrote pictures to (an ``output_folder`` attribute that exists)."""
    folders = []
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        folder = getattr(callback, "output_folder", None)
        if folder is not None and Path(folder).is_dir():
            folders.append((Path(folder), f"{type(callback).__name__} pictures"))
    return folders
