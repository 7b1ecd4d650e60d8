"""``InterruptCheckpoint``: Ctrl-C, SIGTERM and SIGUSR1 end a ``fit`` in a checkpoint that resumes it.

Without it, Ctrl-C raises ``KeyboardInterrupt`` wherever the process happens to be and Lightning ends the
run without saving, and a scheduler's SIGTERM (or SLURM's SIGUSR1 before the time limit) stops it the
same way: ``last.ckpt`` stays at the previous validation, possibly hours back.

With it, the first of these signals only sets a flag: the run stops at the next consistent point (the end
of the current training step or validation batch), writes the whole training state to the ``last.ckpt``
that ``--ckpt_path last`` looks for, prints the command that resumes the run and exits with status
``128 + signal number``. A second Ctrl-C stops at once, without a checkpoint. What a resumed run gives, and
how the handlers live with Lightning's own, data loader workers and distributed training: see
:class:`InterruptCheckpoint`.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: The signals that end a fit in a checkpoint (SIGUSR1 does not exist on Windows).
INTERRUPT_SIGNALS = tuple(
    s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGUSR1")) if s
)
_LATE_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None),) if s)  # Lightning's SLURM requeue signal


class TrainingInterrupted(SystemExit):
    """A fit stopped by a signal: exit status ``128 + signum``, as a shell reports a process killed by it."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class InterruptCheckpoint(Callback):
    """Save a resumable checkpoint when SIGINT, SIGTERM or SIGUSR1 interrupts ``fit``.

    The CLI always adds it; with a plain ``Trainer`` add it to ``callbacks``. It has no options: the
    checkpoint goes to ``last.ckpt`` in the folder of ``trainer.checkpoint_callback`` (a
    ``ModelCheckpoint``), else to ``<default_root_dir>/checkpoints/last.ckpt``.

    The first signal stops the run at the end of the current training step (optimiser and learning-rate
    schedule stepped), or at the end of the current validation batch when it arrives during a validation,
    and writes the whole training state with ``trainer.save_checkpoint``, through the trainer's checkpoint
    plugin (the atomic :class:`~deeplab_lit.callbacks.AtomicCheckpointIO` in every config of this
    project), so the previous ``last.ckpt`` survives a failure during the save. The exit status is
    ``128 + signal number`` (130, 143, 138 for SIGUSR1): the run did not finish. A second Ctrl-C stops at
    once, and the last checkpoint on disk is untouched.

    What resuming from it gives (measured against uninterrupted runs, tests/integration/test_interrupt.py):

    - Interrupted in a training step: the resumed run continues at the next step with the same weights,
      optimiser, schedule and loop counters. Lightning restarts the epoch's data loader, so the rest of the
      epoch sees a new shuffle (see :mod:`deeplab_lit.callbacks.resume`).
    - Interrupted during a validation: the validation stops after the current batch, its partial scores are
      neither logged nor used to pick the best checkpoint, and the training state (which a validation does
      not change) is saved. Lightning resumes *after* that validation and does not repeat it; the same
      holds for a validation that was due right after the interrupted training step. ``validate
      --ckpt_path <checkpoint>`` gives its scores. The message says so.
    - Interrupted during the sanity check (before the first training step of a fresh run): nothing was
      trained, so nothing is saved and an earlier ``last.ckpt`` in the folder is left as it was.

    The checkpoint records what interrupted it (``callbacks["InterruptCheckpoint"]``: signal, epoch, step,
    where), and a run resumed from it says so.

    Signals and Lightning. Lightning's own SIGTERM handler (it sets ``trainer.received_sigterm`` and its
    loops then raise ``SIGTERMException``, a ``SystemExit`` with exit status 0) stays installed and calls
    this one; when its exception ends the run first, this callback saves in ``on_exception`` at the same
    consistent points and sets the exit status. Lightning's SLURM auto-requeue
    (``SLURMEnvironment(auto_requeue=True)``, its SIGUSR1 handler saves ``hpc_ckpt_<n>.ckpt`` and runs
    ``scontrol requeue``) keeps working: this callback hands SIGUSR1 back while Lightning installs its
    handlers, then puts its own in front of Lightning's and calls it from there.

    Signals and data loader workers. Handlers are installed in ``setup``, before the data loaders start
    their worker processes: the workers inherit them and ignore these signals (a terminal's Ctrl-C reaches
    the whole process group, and a worker that died of it would fail the next batch before the checkpoint
    is written); the main process alone decides. Except SIGTERM: torch's DataLoader workers install a C
    handler of their own that exits on it, so a SIGTERM sent to every process (``kill -TERM -<pgid>``,
    ``scancel``) would end them and the main process would then fail on their death (``DataLoader worker
    ... is killed by signal``); the datamodules' ``worker_init_fn``
    (:func:`deeplab_lit.data.loaders.worker_init`) ignores it, so it is saved as above. A loader of your
    own needs the same ``worker_init_fn``. In distributed training all processes agree on the training
    step to stop at (one reduction of one number per step), since writing a checkpoint is collective; a
    signal during a validation is acted on at the first training step after it (validation shards may be
    uneven, so no collective runs per validation batch).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pid = -1
        self._active = False
        self._previous: dict[int, Any] = {}  # the handlers before ours, kept for a handler left behind
        self._installed: set[int] = set()
        self._signum: int | None = None
        self._batches_done = 0
        self._resumed_from: dict[str, Any] = {}
        self._interrupt_state: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- signal handling
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """For ``fit``, install the handlers before any data loader worker starts, so that they inherit them.

        ``estimated_stepping_batches`` starts the training loader's workers in ``configure_optimizers``,
        after ``setup`` and before ``on_fit_start``. Lightning adds its SIGTERM handler later and calls
        ours from it.
        """
        if stage != TrainerFn.FITTING:
            return
        self._pid, self._signum, self._interrupt_state, self._resumed_from = os.getpid(), None, {}, {}
        self._active, self._installed, self._batches_done = True, set(), 0
        self._install(INTERRUPT_SIGNALS)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Hand SIGUSR1 back for a moment: Lightning installs its SLURM requeue handler only where none is."""
        self._restore(_LATE_SIGNALS)

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install the SIGUSR1 handler again, in front of Lightning's SLURM requeue handler if any."""
        self._install(_LATE_SIGNALS)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Install the SIGUSR1 handler (runs without a sanity check); say what a resumed run resumed from."""
        self._install(_LATE_SIGNALS)
        if self._resumed_from and trainer.ckpt_path:
            rank_zero_info(f"Resuming from {trainer.ckpt_path}: {_describe(self._resumed_from)}.")

    def _install(self, signums: tuple[int, ...]) -> None:
        """Put :meth:`_handle` in front of the current handlers of ``signums`` (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("InterruptCheckpoint: fit runs outside the main thread, signals are not handled")
            return
        for signum in signums:
            if signum in self._installed:
                continue
            current = signal.getsignal(signum)
            owner = getattr(current, "__self__", None)
            if isinstance(owner, InterruptCheckpoint):  # left behind by an earlier fit: not a real handler
                current = owner._previous.get(signum, signal.SIG_DFL)
            self._previous[signum] = current
            signal.signal(signum, self._handle)
            self._installed.add(signum)

    def _restore(self, signums: tuple[int, ...] | None = None) -> None:
        """Give ``signums`` (default: every signal, ending the fit) back the handler they had before ours."""
        if signums is None:
            self._active, signums = False, tuple(self._installed)
        if threading.current_thread() is threading.main_thread():
            for signum in set(signums) & self._installed:
                handler = self._previous.get(signum)
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
                self._installed.discard(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """Note the first signal; a second Ctrl-C stops at once; chain the handler installed before ours."""
        if os.getpid() != self._pid:
            return  # a DataLoader worker forked during the fit: the main process decides when to stop
        previous = self._previous.get(signum, signal.SIG_DFL)
        if not self._active:  # this handler outlived its fit (Lightning restores it after on_exception)
            _call_default(signum, previous, frame)
            return
        if self._signum is None:
            self._signum = signum
            again = " Press Ctrl-C again to stop at once without saving." if signum == signal.SIGINT else ""
            _write_stderr(
                f"\nReceived {signal.Signals(signum).name}: stopping after the current training step (or "
                f"validation batch) and saving a checkpoint to resume from.{again}\n"
            )
        elif signum == signal.SIGINT == self._signum:
            _write_stderr("\nSecond Ctrl-C: stopping at once, no checkpoint written.\n")
            raise KeyboardInterrupt
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)  # e.g. Lightning's SLURM requeue handler for SIGUSR1

    # ----------------------------------------------------------------------------------- stopping points
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Count the batches of the new epoch from zero."""
        self._batches_done = 0

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop after a complete training step if a signal arrived."""
        self._batches_done = batch_idx + 1
        self._stop_if_signalled(trainer)

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Stop a validation (or sanity check) after the current batch if a signal arrived during fit.

        Single process only: evaluation shards may be uneven across processes (the datamodules' unrepeated
        sampler), so no collective may run per validation batch; distributed runs stop at the first
        training step after the validation.
        """
        if trainer.state.fn == TrainerFn.FITTING and trainer.world_size == 1:
            self._stop_if_signalled(trainer)

    def _stop_if_signalled(self, trainer: Trainer) -> None:
        """Raise :class:`TrainingInterrupted` on every process once any of them received a signal."""
        signum = self._signum or 0
        if trainer.world_size > 1:  # all processes must stop at the same step: saving is collective
            signum = int(trainer.strategy.reduce(torch.tensor(signum, device=trainer.strategy.root_device),
                                                 reduce_op="max").item())  # fmt: skip
            self._signum = self._signum or signum or None
        if signum:
            raise TrainingInterrupted(signum)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """After a signal (ours or Lightning's ``SIGTERMException``): save, and say how to resume."""
        self._restore()
        if self._signum is None:
            return
        if isinstance(exception, KeyboardInterrupt):
            folder = Path(self._checkpoint_path(trainer)).parent
            self._say(trainer, f"Stopped at once: no checkpoint written; those in {folder} are unchanged.")
            return
        if not isinstance(exception, TrainingInterrupted | SIGTERMException):
            return
        if exception.code in (None, 0):  # Lightning's SIGTERMException exits with status 0
            exception.code = 128 + self._signum
        if trainer.sanity_checking:
            self._say(trainer, _SANITY_MESSAGE.format(signal=signal.Signals(self._signum).name))
            return
        self._save(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Give the signals their previous handlers back after a fit that ended normally."""
        self._restore()

    # ----------------------------------------------------------------------------------- the checkpoint
    def _save(self, trainer: Trainer) -> None:
        """Write the interrupt checkpoint and print where it is and how to resume."""
        assert self._signum is not None
        during = "validation" if trainer.validating else "training"
        self._interrupt_state = {
            "signal": signal.Signals(self._signum).name,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "during": during,
            "batches_done": self._batches_done,  # of the interrupted epoch
            "batches_per_epoch": trainer.num_training_batches,
        }
        path = self._checkpoint_path(trainer)
        if trainer.is_global_zero and os.path.islink(path):  # ``save_last="link"``: never write through
            os.unlink(path)  # the link into the top-k file it points to
        try:
            trainer.save_checkpoint(path)
        except Exception as error:  # e.g. a full disk: say it, and let Lightning end the run cleanly
            folder = os.path.dirname(os.path.abspath(path))
            message = f"Interrupted by {_describe(self._interrupt_state)}, but the checkpoint could not be "
            self._say(trainer, f"{message}written: {error}\nThe checkpoints in {folder} are unchanged.")
            return
        self._say(trainer, self._saved_message(trainer, path))

    def _checkpoint_path(self, trainer: Trainer) -> str:
        """``last.ckpt`` in the checkpoint callback's folder, the file ``--ckpt_path last`` resumes."""
        callback = trainer.checkpoint_callback
        if not isinstance(callback, ModelCheckpoint) or not callback.dirpath:
            return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
        if callback.last_model_path:  # this run's own (or the resumed run's) last checkpoint
            return callback.last_model_path
        metrics = {"epoch": torch.tensor(trainer.current_epoch), "step": torch.tensor(trainer.global_step)}
        path, version = callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST), 1
        while os.path.exists(path):  # an earlier run's last.ckpt: keep it, as ModelCheckpoint does (last-v1)
            path = callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST, ver=version)
            version += 1
        return path

    def _saved_message(self, trainer: Trainer, path: str) -> str:
        """Return the lines printed after the save: what was saved, where, and the command that resumes."""
        state = self._interrupt_state
        found_by_last = isinstance(trainer.checkpoint_callback, ModelCheckpoint)
        lines = [
            f"Interrupted by {_describe(state)}. Saved the training state to",
            f"  {os.path.abspath(path)}",
            "Resume with:",
            f"  {_resume_command('last' if found_by_last else os.path.abspath(path))}",
        ]
        if state["during"] == "validation":
            lines.append(
                f"The validation at step {state['global_step']} was cut short: it is not repeated when "
                f"resuming; `validate --ckpt_path {os.path.abspath(path)}` gives its scores."
            )
        return "\n".join(lines)

    def _say(self, trainer: Trainer, message: str) -> None:
        if trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        """Return what interrupted the run: in the interrupt checkpoint only (empty in every other one)."""
        return dict(self._interrupt_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember what interrupted the run being resumed, to say it at the start of training."""
        self._resumed_from = dict(state_dict)


_SANITY_MESSAGE = (
    "Interrupted by {signal} during the sanity check, before the first training step: nothing was "
    "trained, no checkpoint written (an earlier last.ckpt in the checkpoint folder is unchanged). "
    "Run the same command again to start."
)


def _describe(state: dict[str, Any]) -> str:
    """E.g. ``SIGTERM during the training of epoch 1 at global step 6 (batch 2 of 4)``."""
    return (
        f"{state['signal']} during the {state['during']} of epoch {state['epoch']} at global step "
        f"{state['global_step']} (after batch {state['batches_done']} of {state['batches_per_epoch']})"
    )


def _resume_command(ckpt_path: str) -> str:
    """Return this process's command line with ``--ckpt_path ckpt_path``, or a sentence saying so."""
    argv = list(sys.argv)
    if not argv or not os.path.normpath(argv[0]).endswith(os.path.join("deeplab_lit", "__main__.py")):
        return f"the same fit command (or Trainer.fit) with ckpt_path={ckpt_path!r}"
    words, skip = [], False
    for word in argv[1:]:
        if skip:
            skip = False
        elif word == "--ckpt_path":
            skip = True
        elif not word.startswith("--ckpt_path="):
            words.append(word)
    return shlex.join([Path(sys.executable).name, "-m", "deeplab_lit", *words, "--ckpt_path", ckpt_path])


def _write_stderr(text: str) -> None:
    """Write from a signal handler: one ``write`` system call, safe even if a ``print`` was interrupted."""
    try:
        os.write(2, text.encode())
    except OSError:
        pass


def _call_default(signum: int, handler: Callable[..., Any] | int | None, frame: FrameType | None) -> None:
    """Do what ``handler`` (the one before ours) would have done with ``signum``."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:  # SIG_DFL (or unknown): restore it and deliver the signal again
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
