"""Interruptions end in a resumable checkpoint: SIGINT, SIGTERM and SIGUSR1 sent to a real ``fit`` process.

The child runs the real quickstart config (its AtomicCheckpointIO, guards and RNG checkpointing included)
on tiny synthetic data, 4 steps per epoch. A :class:`BlockAt` callback stops it at a chosen point (a
training step, a validation batch, the sanity check) and waits there until the test has signalled it, so
the signal lands at a known step however slow the machine is. Signals sent to this process itself
(``os.kill(os.getpid(), ...)``) check the rest of the CLI's behaviour in-process, seconds each;
``tests/callbacks/test_interrupt.py`` checks the callback itself on a one-weight module.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

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
    """The quickstart config shrunk to seconds on a CPU (as tests/integration/test_resume.py)."""
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
    "signum, where, step, to_group, workers",
    [
        # to the main process only, as `kill <pid>` or Kubernetes
        (signal.SIGTERM, "training", STEPS_PER_EPOCH + 2, False, 1),
        # to every process, as scancel: the DataLoader workers ignore it (data.loaders.worker_init), else
        # torch's handler ends them and the main process dies of it before saving
        (signal.SIGTERM, "training", STEPS_PER_EPOCH + 2, True, 2),
        # to every process, as SLURM's --signal; cut short, not repeated on resume
        (getattr(signal, "SIGUSR1", signal.SIGINT), "validation", STEPS_PER_EPOCH, True, 1),
    ],
    ids=["sigterm-during-training", "sigterm-to-process-group", "sigusr1-during-validation"],
)
def test_scheduler_signals_save_a_resumable_last_ckpt(signum, where, step, to_group, workers, tmp_path):
    data, root, marker = tmp_path / "data", tmp_path / "run", tmp_path / "blocked"
    args = [
        *fit_args(root, data, epochs=2),
        *block_args(marker, where, step),
        f"--data.init_args.num_workers={workers}",
    ]
    code, output, killed = signal_child(args, tmp_path, marker, signum, to_group=to_group)
    assert code == 128 + signum, output[-3000:]
    assert "killed by signal" not in output
    if not (to_group and signum == signal.SIGTERM):  # the dense CRF's process pool (not ours) dies of that
        assert not killed  # the training and validation loaders' workers ignored it
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
