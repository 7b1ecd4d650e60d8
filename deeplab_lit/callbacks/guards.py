"""``NonFiniteLossGuard``: stop training at the first NaN/inf loss and keep the last good checkpoint.

A diverged run (too high a learning rate, a corrupt image, fp16 overflow) otherwise trains on NaN weights
for hours and overwrites ``last.ckpt`` with them. The guard checks the training loss before the backward
pass, so the step that produced it never updates the parameters, and refuses every checkpoint once a bad
loss has been seen, so the newest checkpoint on disk is the last one written before it.

Reading the loss's flag on the host costs a device synchronisation; ``check_every_n_steps`` trades it
against updates on NaN weights before the error (:class:`NonFiniteLossGuard`).

The CLI adds the guard to a config that lacks it (:func:`deeplab_lit.cli.lightning_cli.add_safeguards`).
Without it (the Python API), :class:`~deeplab_lit.callbacks.BestAndLastCheckpoint` still never makes
weights holding NaN or inf a best checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; raised by :class:`NonFiniteLossGuard`."""


class NonFiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` at the first non-finite training loss, naming its step and value.

    The step is Lightning's ``global_step`` when the loss was computed (the number of optimizer steps
    done before it, as in the logged curves). The bad step's parameters update never happens; BatchNorm
    running statistics of that forward pass may already hold NaN, but no checkpoint is written after it.
    Under ``precision: 16-mixed`` the loss checked is the scaled one (NaN and inf stay NaN and inf; the
    non-finite *gradients* that the gradient scaler skips on its own are not this guard's business).

    Args:
        check_every_n_steps: Read the device-side flag every N training steps (and always before a
            checkpoint is written and before validation). Reading the flag on the host is a device
            synchronisation: with 1 (the default) the guard reads it every step, which stalls the GPU
            queue briefly once per step (Lightning's progress bar already reads the loss every step, so
            this is usually free). With N the error still names the first bad step and its loss, but up
            to N-1 updates on NaN weights happen before it (none of them reaches a checkpoint).

    Raises:
        ValueError: If ``check_every_n_steps`` is not a positive int.
    """

    def __init__(self, check_every_n_steps: int = 1) -> None:
        super().__init__()
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int):
            raise ValueError(f"check_every_n_steps must be a positive int, got {check_every_n_steps!r}")
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be a positive int, got {check_every_n_steps!r}")
        self.check_every_n_steps = check_every_n_steps
        self._first_step: Tensor | None = None  # -1 until a bad loss is seen, then its global step
        self._first_value: Tensor | None = None
        self._unchecked = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Forget anything from an earlier ``fit``."""
        self._first_step = self._first_value = None
        self._unchecked = 0

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Record a non-finite loss on the device; check on the host every ``check_every_n_steps``."""
        value = loss.detach().float()
        if self._first_step is None or self._first_value is None:  # set together
            self._first_step = torch.full((), -1, dtype=torch.long, device=value.device)
            self._first_value = torch.zeros((), dtype=torch.float32, device=value.device)
        first = (~torch.isfinite(value)) & (self._first_step < 0)
        self._first_step = torch.where(
            first, self._first_step.new_full((), trainer.global_step), self._first_step
        )
        self._first_value = torch.where(first, value, self._first_value)
        self._unchecked += 1
        if self._unchecked >= self.check_every_n_steps:
            self.check(trainer)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to write a checkpoint after a bad loss (raising here aborts the save)."""
        self.check(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Do not validate (and log) NaN weights."""
        self.check(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check what the last steps of the epoch left unchecked."""
        self.check(trainer)

    def check(self, trainer: Trainer) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite loss was recorded (one host read)."""
        self._unchecked = 0
        if self._first_step is None or self._first_value is None:
            return
        step = int(self._first_step.item())
        if step < 0:
            return
        value = float(self._first_value.item())
        callback = trainer.checkpoint_callback
        kept = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        late = trainer.global_step - step
        remedies = (
            "a lower learning rate (model.init_args.lr) or clipped gradients (trainer.gradient_clip_val)"
        )
        raise NonFiniteLossError(
            f"Training loss is {value} at global step {step}: training stopped"
            + (f" (seen {late} step(s) later, check_every_n_steps={self.check_every_n_steps})" * bool(late))
            + ". No checkpoint was written after that step; "
            + (
                f"the last good one is {kept}. Resume from it (--ckpt_path {kept}) with {remedies}, "
                if kept
                else f"none had been written before it, so there is nothing to resume: start again with "
                f"{remedies}, "
            )
            + "and check the data of that step."
        )
