"""Resume after a crash: SIGKILL + ``--ckpt_path last`` gives the uninterrupted result; atomic checkpoints;
a non-finite loss stops the run and keeps the last good checkpoint."""

import contextlib
import errno
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
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.callbacks import (
    AtomicCheckpointIO,
    BestAndLastCheckpoint,
    CheckpointWriteError,
    NonFiniteLossError,
    NonFiniteLossGuard,
)
from deeplab_lit.cli import main

REPO = Path(__file__).parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
STEPS_PER_EPOCH = 4  # num_train=8, batch_size=2


@pytest.fixture(autouse=True)
def restore_determinism_flag():
    """``Trainer(deterministic=True)`` turns torch's global flag on: give it back to other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


class KillAtStep(Callback):
    """SIGKILL the own process after optimizer step ``step`` (no clean-up, no finally blocks run)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args, **kwargs):
        if trainer.global_step == self.step:
            print(f"KillAtStep: SIGKILL after step {trainer.global_step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def fit_args(root: Path, data: Path, epochs: int = 3) -> list[str]:
    """The real quickstart config (its callbacks and plugins included), shrunk to seconds on a CPU."""
    return ["fit", "--config", str(QUICKSTART), "--trainer.accelerator=cpu", f"--trainer.max_epochs={epochs}",
            "--trainer.deterministic=true", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
            "--model.init_args.backbone=resnet18", f"--data.init_args.root={data}",
            "--data.init_args.num_train=8", "--data.init_args.num_val=4", "--data.init_args.image_size=32",
            "--data.init_args.crop_size=24",
            "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=2",
            "--data.init_args.num_workers=0"]  # fmt: skip


def run_cli_subprocess(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run ``python -m deeplab_lit`` in its own session; return its exit code and output.

    After the main process ends, whatever it forked and left behind (a SIGKILL skips every clean-up, so
    e.g. a CRF process pool survives it) is killed through the session's process group.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "offline"}  # fmt: skip
    log = tmp_path / "subprocess.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "deeplab_lit", *args], cwd=tmp_path, env=env, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
        try:
            code = process.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return code, log.read_text()


def val_scores(cli) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


def test_sigkilled_run_resumes_from_last_to_the_uninterrupted_result(tmp_path):
    data = tmp_path / "data"
    reference = main(fit_args(tmp_path / "reference", data))
    assert reference.trainer.global_step == 3 * STEPS_PER_EPOCH

    crashed = tmp_path / "crashed"
    kill_step = 2 * STEPS_PER_EPOCH + 1  # mid-epoch 2; last.ckpt is the end of epoch 1
    code, output = run_cli_subprocess(
        [*fit_args(crashed, data), f"--trainer.callbacks+={__name__}.KillAtStep",
         f"--trainer.callbacks.step={kill_step}"], tmp_path,
    )  # fmt: skip
    assert code == -signal.SIGKILL, output[-3000:]
    last = crashed / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2 * STEPS_PER_EPOCH

    resumed = main([*fit_args(crashed, data), "--ckpt_path", "last"])
    assert resumed.trainer.global_step == reference.trainer.global_step
    expected, got = val_scores(reference), val_scores(resumed)
    assert expected.keys() == got.keys() and "val/mIoU" in got
    assert got == pytest.approx(expected, abs=1e-6)
    resumed_state, reference_state = resumed.model.state_dict(), reference.model.state_dict()
    assert all(torch.equal(resumed_state[k], reference_state[k]) for k in reference_state)  # bit-identical


class WorseningModule(LightningModule):
    """One weight; ``val/score`` gets worse every epoch, so only epoch 0 is ever the best."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight - 1).pow(2).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_last_ckpt_follows_the_newest_state_even_without_improvement(tmp_path):
    """Lightning's ``save_last`` refreshes last.ckpt only with a new best; resuming needs the newest."""
    data = DataLoader(torch.zeros(4, 1), batch_size=2)
    for checkpoint_class, expected_step in ((ModelCheckpoint, 2), (BestAndLastCheckpoint, 6)):
        folder = tmp_path / checkpoint_class.__name__
        callback = checkpoint_class(dirpath=folder, monitor="val/score", mode="max", save_last=True)
        trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[callback])  # fmt: skip
        trainer.fit(WorseningModule(), data, data)
        assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == expected_step


# ------------------------------------------------------------------------------------ atomic checkpoints
class FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("injected serialisation failure")


@pytest.mark.parametrize(
    "checkpoint_io", [AtomicCheckpointIO(), TorchCheckpointIO()], ids=["ours", "lightning"]
)
def test_failure_while_serialising_leaves_the_previous_last_ckpt_loadable(checkpoint_io, tmp_path):
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint_io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    with pytest.raises(RuntimeError, match="injected"):
        checkpoint_io.save_checkpoint(
            {"global_step": 2, "w": torch.zeros(1000), "bad": FailsToPickle()}, path
        )
    loaded = checkpoint_io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


SAVE_THEN_HANG = """
import pathlib, sys, time, torch
from deeplab_lit.callbacks import AtomicCheckpointIO

class SlowToPickle:
    def __reduce__(self):
        pathlib.Path(sys.argv[2]).touch()  # tell the test we are inside the second save
        time.sleep(120)
        return (int, (0,))

io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, sys.argv[1])
io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000), "slow": SlowToPickle()}, sys.argv[1])
"""


def test_sigkill_while_saving_keeps_the_previous_last_ckpt(tmp_path):
    """A real SIGKILL inside ``save_checkpoint``: the old file stays whole, the temporary sits beside it."""
    path, inside = tmp_path / "ckpt" / "last.ckpt", tmp_path / "inside_second_save"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-c", SAVE_THEN_HANG, str(path), str(inside)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not inside.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert inside.exists(), "the writer never reached its second save"
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    loaded = torch.load(path, weights_only=True)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")


# ------------------------------------------------------------------------------------ non-finite loss
class PoisonedSegmentation(Dataset):
    """Tiny images; item ``poisoned`` is all NaN, so its training step has a NaN loss."""

    def __init__(self, count: int = 8, poisoned: int = 3):
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, 24, 24, generator=gen)
        self.images[poisoned] = float("nan")
        self.masks = torch.randint(0, 3, (count, 24, 24), generator=gen)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index], "mask": self.masks[index]}


@pytest.mark.parametrize("check_every_n_steps", [1, 4])
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    check_every_n_steps, tmp_path
):
    module = DeepLabV3Plus(num_classes=3, backbone="resnet18", lr=0.01)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, save_last=True,
                                  filename="step{step}")  # fmt: skip
    trainer = Trainer(
        max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[NonFiniteLossGuard(check_every_n_steps), checkpoints],
        plugins=[AtomicCheckpointIO()],
    )  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at global step 3\b") as error:
        trainer.fit(module, DataLoader(PoisonedSegmentation(poisoned=3), batch_size=1))
    assert f"Resume from it (--ckpt_path {tmp_path / 'last.ckpt'})" in str(error.value)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["last.ckpt", "stepstep=1.ckpt", "stepstep=2.ckpt", "stepstep=3.ckpt"]
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # the state before the bad step, which never updated the weights
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


class NaNAtStep(LightningModule):
    """One weight; the loss is NaN from optimizer step ``bad_step`` on."""

    def __init__(self, bad_step: int):
        super().__init__()
        self.weight, self.bad_step = torch.nn.Parameter(torch.zeros(1)), bad_step

    def training_step(self, batch, batch_idx):
        loss = (self.weight - 1).pow(2).sum()
        return loss * float("nan") if self.global_step >= self.bad_step else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_non_finite_loss_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    trainer = Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                      callbacks=[NonFiniteLossGuard()])  # fmt: skip
    with pytest.raises(NonFiniteLossError, match="at global step 2") as error:
        trainer.fit(NaNAtStep(bad_step=2), DataLoader(torch.zeros(8, 1), batch_size=1))
    message = str(error.value)
    assert "nothing to resume" in message and "start again with a lower learning rate" in message
    assert "Resume from it" not in message


# ------------------------------------------------------------------------------------ full disk
def test_full_disk_names_the_path_free_space_and_size_and_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch
):
    """The temporary file is opened on /dev/full, whose writes fail with ENOSPC in the kernel, so torch.save
    fails exactly as on a full disk (an ``inline_container.cc`` RuntimeError over the OSError)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    io, path = AtomicCheckpointIO(), tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_full_disk(*args, **kwargs):
        handle, name = real_mkstemp(*args, **kwargs)  # the real temporary file, to be cleaned up
        os.close(handle)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_full_disk)
    with pytest.raises(CheckpointWriteError) as error:
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(2**20)}, path)  # 4 MiB of tensors
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert f"Cannot write checkpoint {path}: No space left on device" in message
    assert re.search(r"\d+\.\d [KMGT]?B free in ", message) and "needs about 4.0 MB" in message
    assert "The previous last.ckpt is intact" in message and "inline_container" not in message
    monkeypatch.undo()
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1 and torch.equal(loaded["w"], torch.ones(1000))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # the temporary file is gone
