"""Interruptions end in a resumable checkpoint: SIGINT, SIGTERM and SIGUSR1 sent to a real ``fit`` process.

The child runs the real quickstart config (its AtomicCheckpointIO, guards and RNG checkpointing included)
on tiny synthetic data, 4 steps per epoch. A :class:`BlockAt` callback stops it at a chosen point (a
training step, a validation batch, the sanity check) and waits there until the test has signalled it, so
the signal lands at a known step however slow the machine is. Signals sent to this process itself
(``os.kill(os.getpid(), ...)``) check the rest in-process, seconds each.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from deeplab_lit.callbacks import AtomicCheckpointIO, InterruptCheckpoint, TrainingInterrupted
from deeplab_lit.cli import main

REPO = Path(__file__).parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
STEPS_PER_EPOCH = 4  # num_train=8, batch_size=2


class BlockAt(Callback):
    """Once, at ``where`` (``training`` step ``step``, ``validation`` at ``step``, ``sanity``): write
    ``marker`` and wait until the test deletes it (at most 120 s)."""

    def __init__(self, marker: str, where: str = "training", step: int = 0):
        self.marker, self.where, self.step, self.done = Path(marker), where, step, False

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if self.where == "training" and trainer.global_step == self.step:
            self._block()

    def on_validation_batch_end(self, trainer, *args, **kwargs):
        if self.where == "sanity" and trainer.sanity_checking:
            self._block()
        elif self.where == "validation" and not trainer.sanity_checking and trainer.global_step == self.step:
            self._block()

    def _block(self):
        if self.done:
            return
        self.done = True
        self.marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + 120
        while self.marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


class StartStep(Callback):
    """Remember the global step at which training (re)started."""

    def on_train_start(self, trainer, *args):
        self.step = trainer.global_step


def fit_args(root: Path, data: Path, epochs: int = 3) -> list[str]:
    """The quickstart config shrunk to seconds on a CPU (as tests/test_resume.py)."""
    return ["fit", "--config", str(QUICKSTART), "--trainer.accelerator=cpu", f"--trainer.max_epochs={epochs}",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
            "--model.init_args.backbone=resnet18", f"--data.init_args.root={data}",
            "--data.init_args.num_train=8", "--data.init_args.num_val=4", "--data.init_args.image_size=32",
            "--data.init_args.crop_size=24", "--data.init_args.batch_size=2",
            "--data.init_args.val_batch_size=2", "--data.init_args.num_workers=0"]  # fmt: skip


def block_args(marker: Path, where: str, step: int = 0) -> list[str]:
    return [f"--trainer.callbacks+={__name__}.BlockAt", f"--trainer.callbacks.marker={marker}",
            f"--trainer.callbacks.where={where}", f"--trainer.callbacks.step={step}"]  # fmt: skip


def signal_child(args: list[str], tmp_path: Path, marker: Path, signum: int, to_group: bool = False):
    """Run ``python -m deeplab_lit *args``; when it blocks at ``marker``, send it ``signum`` (to its whole
    process group, as a terminal's Ctrl-C, if ``to_group``), let it go on once it took the signal.

    Returns its exit code, its output and the child processes (DataLoader workers) that the signal killed.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}  # fmt: skip
    log = tmp_path / "child.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "deeplab_lit", *args], cwd=tmp_path, env=env,
                                   stdout=out, stderr=out, start_new_session=True)  # fmt: skip
        try:
            wait_for(lambda: marker.exists() or process.poll() is not None, "the child to block")
            assert process.poll() is None, log.read_text()[-3000:]
            workers = children(process.pid)
            (os.killpg if to_group else os.kill)(process.pid, signum)
            wait_for(lambda: taken(log) or process.poll() is not None, "the child to take the signal")
            time.sleep(1.0)  # time for a worker that would die of it to do so
            killed = [pid for pid in workers if not alive(pid)]
            marker.unlink(missing_ok=True)
            code = process.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text(), killed


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def taken(log: Path) -> int:
    """How many signals the child has said it received."""
    text = log.read_text()
    return len(re.findall(r"Received SIG\w+: stopping", text))


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def test_ctrl_c_mid_epoch_saves_last_ckpt_and_fit_ckpt_path_last_resumes_there(tmp_path, caplog):
    data, root, marker = tmp_path / "data", tmp_path / "run", tmp_path / "blocked"
    step = STEPS_PER_EPOCH + 1  # the first step of epoch 1: last.ckpt is the end of epoch 0
    args = [*fit_args(root, data), *block_args(marker, "training", step), "--data.init_args.num_workers=2"]
    code, output, killed = signal_child(args, tmp_path, marker, signal.SIGINT, to_group=True)
    assert code == 128 + signal.SIGINT, output[-3000:]
    assert not killed  # the DataLoader workers ignored the Ctrl-C that reached them too
    folder = root / "checkpoints"
    last = load(folder / "last.ckpt")
    assert last["global_step"] == step  # mid-epoch, after the step the signal arrived in
    epoch_end = [load(p)["global_step"] for p in folder.glob("epoch*.ckpt")]
    assert epoch_end == [STEPS_PER_EPOCH]  # the validation-time checkpoint of epoch 0 is older
    assert last["callbacks"]["InterruptCheckpoint"]["signal"] == "SIGINT"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
    assert str(folder / "last.ckpt") in output
    assert "-m deeplab_lit fit --config" in output and output.rstrip().count("--ckpt_path last") >= 1

    resumed = main(
        [*fit_args(root, data), "--ckpt_path", "last", f"--trainer.callbacks+={__name__}.StartStep"]
    )
    start = next(c for c in resumed.trainer.callbacks if isinstance(c, StartStep))
    assert start.step == step
    assert f"SIGINT during the training of epoch 1 at global step {step}" in caplog.text  # said on resume
    assert resumed.trainer.global_step == 3 * STEPS_PER_EPOCH
    assert "val/mIoU" in resumed.trainer.callback_metrics


@pytest.mark.parametrize(
    "signum, where, step, to_group",
    [
        # to the main process only, as `kill <pid>` or Kubernetes: torch's DataLoader workers exit on a
        # SIGTERM of their own (their C handler), and the main process then fails on their death
        (signal.SIGTERM, "training", STEPS_PER_EPOCH + 2, False),
        # to every process, as SLURM's --signal; cut short, not repeated on resume
        (getattr(signal, "SIGUSR1", signal.SIGINT), "validation", STEPS_PER_EPOCH, True),
    ],
    ids=["sigterm-during-training", "sigusr1-during-validation"],
)
def test_scheduler_signals_save_a_resumable_last_ckpt(signum, where, step, to_group, tmp_path):
    data, root, marker = tmp_path / "data", tmp_path / "run", tmp_path / "blocked"
    args = [
        *fit_args(root, data, epochs=2),
        *block_args(marker, where, step),
        "--data.init_args.num_workers=1",
    ]
    code, output, killed = signal_child(args, tmp_path, marker, signum, to_group=to_group)
    assert not killed  # the training and validation loaders' workers ignored it
    assert code == 128 + signum, output[-3000:]
    last = load(root / "checkpoints" / "last.ckpt")
    assert last["global_step"] == step
    assert last["callbacks"]["InterruptCheckpoint"]["during"] == where
    if where == "training":  # resuming from a training step: the SIGINT test
        return
    # cut short: its partial scores reached neither a log nor a top-k checkpoint, and resuming works
    assert not list((root / "checkpoints").glob("epoch*.ckpt"))
    assert "is not repeated when resuming" in output
    resumed = main([*fit_args(root, data, epochs=2), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 2 * STEPS_PER_EPOCH
    assert "val/mIoU" in resumed.trainer.callback_metrics


# ------------------------------------------------------------------ in-process: signals sent to this process
class SignalSelf(Callback):
    """Send ``signals`` (names) to this process, one after the other, at ``where`` (as :class:`BlockAt`)."""

    def __init__(self, signals: list[str], where: str = "training", step: int = 0):
        self.signals, self.where, self.step = [getattr(signal, s) for s in signals], where, step

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if self.where == "training" and trainer.global_step == self.step:
            self._send()

    def on_validation_batch_end(self, trainer, *args, **kwargs):
        if self.where == "sanity" and trainer.sanity_checking:
            self._send()

    def _send(self):
        for signum in self.signals:
            os.kill(os.getpid(), signum)
            time.sleep(0.1)  # the handler runs here


def signal_self_args(signals: str, where: str, step: int = 0) -> list[str]:
    return [f"--trainer.callbacks+={__name__}.SignalSelf", f"--trainer.callbacks.signals={signals}",
            f"--trainer.callbacks.where={where}", f"--trainer.callbacks.step={step}"]  # fmt: skip


def test_second_ctrl_c_stops_at_once_without_touching_the_checkpoints(tmp_path, capsys):
    data, root = tmp_path / "data", tmp_path / "run"
    with pytest.raises(SystemExit) as stop:  # Lightning's KeyboardInterrupt path: sys.exit(1)
        main([*fit_args(root, data), *signal_self_args("[SIGINT, SIGINT]", "training", STEPS_PER_EPOCH + 1)])
    assert stop.value.code != 0
    assert "Stopped at once: no checkpoint written" in capsys.readouterr().err
    assert load(root / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH  # epoch 0's, unchanged


def test_signal_during_sanity_check_saves_nothing_and_resume_last_then_says_there_is_nothing(
    tmp_path, capsys
):
    data, root = tmp_path / "data", tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        main([*fit_args(root, data), *signal_self_args("[SIGTERM]", "sanity")])
    assert stop.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "during the sanity check" in err and "no checkpoint written" in err
    assert not list(root.rglob("*.ckpt"))
    with pytest.raises(FileNotFoundError, match="no earlier run") as error:
        main(["validate", *fit_args(root, data)[1:], "--ckpt_path", "last"])
    assert str(root / "checkpoints") in str(error.value) and "checkpoint file instead" in str(error.value)
    with pytest.warns(
        UserWarning, match=r"no last\.ckpt .* in .*checkpoints: no earlier run.*Starting a new run"
    ):
        cli = main([*fit_args(root, data), "--ckpt_path", "last"])  # a cluster script's first submission
    assert cli.trainer.global_step > 0 and (root / "checkpoints" / "last.ckpt").is_file()


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
