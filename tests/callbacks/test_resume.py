"""What a resume needs on disk: last.ckpt always the newest state, written atomically (a failed or killed
save, a full disk leave the previous one whole). The resume itself is ``tests/integration/test_resume.py``."""

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
from torch.utils.data import DataLoader

from deeplab_lit.callbacks import AtomicCheckpointIO, BestAndLastCheckpoint, CheckpointWriteError

REPO = Path(__file__).parents[2]  # on the writer process's PYTHONPATH


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
    """Resuming needs the newest state (Lightning 2.6's ``save_last`` refreshes it only with a new best)."""
    data = DataLoader(torch.zeros(4, 1), batch_size=2)
    callback = BestAndLastCheckpoint(dirpath=tmp_path, monitor="val/score", mode="max", save_last=True)
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(WorseningModule(), data, data)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6  # 3 epochs x 2 steps
    assert Path(callback.best_model_path).name.startswith("epoch=0")  # only epoch 0 was the best


def test_every_hook_of_model_checkpoint_reaches_the_last_ckpt_checkpoint():
    """``last.ckpt`` is a second ModelCheckpoint driven through the hooks: a hook that a newer Lightning
    adds to ModelCheckpoint and this class does not pass on would silently never reach it."""
    hooks = {name for name, value in vars(Callback).items() if callable(value) and not name.startswith("_")}
    implemented = {name for name in hooks if name in vars(ModelCheckpoint)}
    assert implemented and implemented <= set(vars(BestAndLastCheckpoint))


def fit_worsening(folder, epochs, ckpt_path=None):
    data = DataLoader(torch.zeros(4, 1), batch_size=2)
    callback = BestAndLastCheckpoint(dirpath=folder, monitor="val/score", mode="max", save_last=True)
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback])  # fmt: skip
    trainer.fit(WorseningModule(), data, data, ckpt_path=ckpt_path)
    return callback


@pytest.mark.parametrize("written_by", ["this version", "the single-callback version"])
def test_a_resumed_run_goes_on_writing_the_last_ckpt_it_resumed_from(written_by, tmp_path):
    fit_worsening(tmp_path, epochs=1)
    if written_by == "the single-callback version":  # whose state names last.ckpt in last_model_path only
        checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
        (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("BestAndLastCheckpoint")]
        del state["newest"]
        torch.save(checkpoint, tmp_path / "last.ckpt")
    callback = fit_worsening(tmp_path, epochs=3, ckpt_path=tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.glob("last*")) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6
    assert callback.last_model_path == str(tmp_path / "last.ckpt")


def test_a_new_run_keeps_an_earlier_runs_last_ckpt(tmp_path):
    torch.save({"global_step": 99}, tmp_path / "last.ckpt")
    callback = fit_worsening(tmp_path, epochs=2)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 99
    assert torch.load(tmp_path / "last-v1.ckpt", weights_only=True)["global_step"] == 4
    assert callback.last_model_path == str(tmp_path / "last-v1.ckpt") and callback.save_last is False


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


class DivergingModule(WorseningModule):
    """``val/score`` improves every epoch, but from epoch 1 on the weight is NaN (no NaN guard here)."""

    def validation_step(self, batch, batch_idx):
        self.log("val/score", float(self.current_epoch))

    def on_train_epoch_end(self):
        if self.current_epoch >= 1:
            with torch.no_grad():
                self.weight.fill_(float("nan"))


def test_weights_holding_nan_are_never_a_best_checkpoint(tmp_path):
    """Issue 20 case 4: a diverged run without the NaN guard (Python API) keeps its last finite best."""
    data = DataLoader(torch.zeros(4, 1), batch_size=2)
    callback = BestAndLastCheckpoint(
        dirpath=tmp_path, monitor="val/score", mode="max", save_last=True, save_top_k=2
    )
    trainer = Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[callback])  # fmt: skip
    with pytest.warns(UserWarning, match="hold NaN or inf: not saved as a best checkpoint"):
        trainer.fit(DivergingModule(), data, data)
    assert Path(callback.best_model_path).name.startswith("epoch=0")  # epochs 1 and 2 scored higher
    assert list(callback.best_k_models) == [callback.best_model_path]
    assert torch.load(callback.best_model_path, weights_only=True)["state_dict"]["weight"].isfinite().all()
