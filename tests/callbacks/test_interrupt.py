"""InterruptCheckpoint on a one-weight module: what it saves, through which CheckpointIO, and when not.

Each test sends a signal to this process from a callback at a known step (``os.kill(os.getpid(), ...)``).
The real program in a child process, signalled from outside, is ``tests/integration/test_interrupt.py``.
"""

import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from deeplab_lit.callbacks import AtomicCheckpointIO, InterruptCheckpoint, TrainingInterrupted


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - batch.sum()).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", (self.weight - batch.sum()).pow(2).sum())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SignalSelfAt(Callback):
    def __init__(self, step: int, signum: int = signal.SIGINT):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)  # arrives inside this training step


class RecordingIO(AtomicCheckpointIO):
    def __init__(self):
        super().__init__()
        self.saved = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved.append((Path(path).name, checkpoint["global_step"]))
        super().save_checkpoint(checkpoint, path, storage_options)


def test_interrupt_checkpoint_is_written_by_the_trainers_atomic_io_and_ctrl_c_works_after(tmp_path):
    io = RecordingIO()
    trainer = Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, plugins=[io],
                      callbacks=[SignalSelfAt(step=6), InterruptCheckpoint(),
                                 ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])  # fmt: skip
    data = DataLoader(torch.arange(8.0).view(8, 1), batch_size=2)
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit(Tiny(), data, data)
    assert stop.value.code == 128 + signal.SIGINT
    assert io.saved[-1] == ("last.ckpt", 7)  # the interrupted step (7th) completed, then saved
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 7
    with pytest.raises(KeyboardInterrupt):  # after the fit, Ctrl-C is Python's again
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)


def test_interrupt_checkpoint_keeps_an_earlier_runs_last_ckpt(tmp_path):
    """A fresh run in a folder with another run's last.ckpt writes last-v1.ckpt, as ModelCheckpoint does."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"global_step": 99}, folder / "last.ckpt")
    trainer = Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0,
                      callbacks=[SignalSelfAt(step=1, signum=signal.SIGTERM), InterruptCheckpoint(),
                                 ModelCheckpoint(dirpath=folder, save_last=True)])  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        trainer.fit(Tiny(), DataLoader(torch.arange(8.0).view(8, 1), batch_size=2))
    assert stop.value.code == 128 + signal.SIGTERM
    assert load(folder / "last.ckpt")["global_step"] == 99
    assert load(folder / "last-v1.ckpt")["global_step"] == 2


class SignalAfterTheCheck(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # after InterruptCheckpoint's check of this step


def test_sigterm_after_our_check_is_saved_when_lightnings_sigterm_exception_ends_the_run(tmp_path):
    """Lightning's own handler makes its loop raise SIGTERMException (exit status 0) first: still saved."""
    trainer = Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0,
                      callbacks=[InterruptCheckpoint(), SignalAfterTheCheck(),
                                 ModelCheckpoint(dirpath=tmp_path, save_last=True)])  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        trainer.fit(Tiny(), DataLoader(torch.arange(8.0).view(8, 1), batch_size=2))
    assert type(stop.value).__name__ == "SIGTERMException" and stop.value.code == 128 + signal.SIGTERM
    assert load(tmp_path / "last.ckpt")["global_step"] == 3


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="SIGUSR1 is POSIX")
def test_lightnings_slurm_requeue_handler_still_runs_on_sigusr1(tmp_path, monkeypatch):
    """With SLURM auto-requeue, Lightning's own SIGUSR1 handler (hpc checkpoint + ``scontrol requeue``)
    runs as before, and the run still ends in our resumable last.ckpt."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "deeplab",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here: Lightning logs that the requeue failed
    trainer = Trainer(max_epochs=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                      plugins=[SLURMEnvironment(auto_requeue=True)],
                      callbacks=[SignalSelfAt(step=2, signum=signal.SIGUSR1), InterruptCheckpoint(),
                                 ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])  # fmt: skip
    with pytest.raises(TrainingInterrupted) as stop:
        trainer.fit(Tiny(), DataLoader(torch.arange(8.0).view(8, 1), batch_size=2))
    assert stop.value.code == 128 + signal.SIGUSR1
    assert (tmp_path / "hpc_ckpt_1.ckpt").exists()  # written by Lightning's handler
    assert load(tmp_path / "ckpt" / "last.ckpt")["global_step"] == 3


def test_interrupt_on_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """The run still ends cleanly (exit 143) with one message; the epoch-end last.ckpt is intact."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    full_from = FullDiskFrom(step=5)
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):  # from then on, the temporary file is on /dev/full (writes: ENOSPC)
        handle, name = real_mkstemp(*args, **kwargs)
        if not full_from.full:
            return handle, name
        os.close(handle)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    folder = tmp_path / "ckpt"
    callbacks = [full_from, SignalSelfAt(step=5, signum=signal.SIGTERM), InterruptCheckpoint(),
                 ModelCheckpoint(dirpath=folder, save_last=True)]  # fmt: skip
    trainer = Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, plugins=[AtomicCheckpointIO()],
                      callbacks=callbacks)  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        trainer.fit(Tiny(), DataLoader(torch.arange(8.0).view(8, 1), batch_size=2))
    assert stop.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "the checkpoint could not be written: [Errno 28] Cannot write checkpoint" in err
    assert f"The checkpoints in {folder} are unchanged" in err
    assert load(folder / "last.ckpt")["global_step"] == 4  # the end of epoch 0


class FullDiskFrom(Callback):
    def __init__(self, step: int):
        self.step, self.full = step, False

    def on_train_batch_start(self, trainer, *args):
        self.full = self.full or trainer.global_step >= self.step
