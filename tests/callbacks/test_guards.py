"""NonFiniteLossGuard: a non-finite loss stops the run naming the step, and keeps the last good checkpoint."""

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.callbacks import AtomicCheckpointIO, NonFiniteLossError, NonFiniteLossGuard


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
