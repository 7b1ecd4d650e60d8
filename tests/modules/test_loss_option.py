"""The module's ``loss`` option: one loss for training, validation and test, kept in checkpoints."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

from deeplab_lit import DeepLabV3, DeepLabV3Plus
from deeplab_lit.data import SyntheticDataModule
from deeplab_lit.losses import CrossEntropy

TINY = {"backbone": "resnet18", "multi_grid": None, "output_stride": 16}


class CallLog(nn.Module):
    """A user's loss that records each call's shapes and step, and returns the mean logit + 1."""

    def __init__(self, ignore_index: int = -1):
        super().__init__()
        self.ignore_index = ignore_index
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def forward(self, logits, masks, step):
        assert logits.shape[-2:] == masks.shape[-2:] and logits.dtype == torch.float32
        self.calls.append((tuple(logits.shape), step))
        return logits.mean() + 1.0


LOG = {"class_path": f"{__name__}.CallLog"}


def test_the_default_loss_is_todays_cross_entropy_on_every_output():
    module = DeepLabV3(num_classes=3, aux_head=True, aux_weight=0.5, **TINY)
    assert isinstance(module.criterion, CrossEntropy)
    masks = torch.randint(0, 3, (2, 8, 8))
    masks[:, 0] = 255
    out, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    expected = F.cross_entropy(out, masks, ignore_index=255) + 0.5 * F.cross_entropy(
        aux, masks, ignore_index=255
    )
    assert torch.allclose(module.compute_loss({"out": out, "aux": aux}, masks), expected)
    assert not any(key.startswith("criterion.") for key in module.state_dict())  # old checkpoints load


def test_training_validation_and_test_all_call_the_one_loss():
    module = DeepLabV3(num_classes=3, aux_head=True, aux_weight=0.5, ignore_index=250, loss=LOG, **TINY)
    assert module.criterion.ignore_index == 250  # the module's, passed at construction
    batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}
    module.training_step(batch, 0)
    assert module.criterion.calls == [((2, 3, 32, 32), 0), ((2, 3, 32, 32), 0)]  # out and aux
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
        module.test_step(batch, 0)
    assert len(module.criterion.calls) == 4


def test_the_trainable_crf_output_gets_the_loss_too():
    module = DeepLabV3Plus(
        num_classes=3, channels=16, crf_rnn={"iterations": 1, "network_loss_weight": 0.5}, loss=LOG, **TINY
    )
    from deeplab_lit.normalization import IMAGENET

    module.normalization = IMAGENET
    batch = {"image": torch.randn(1, 3, 24, 24), "mask": torch.randint(0, 3, (1, 24, 24))}
    module.training_step(batch, 0)
    assert len(module.criterion.calls) == 2  # the CRF's output and the network's
    module.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
    assert len(module.criterion.calls) == 4  # network and CRF, as val/loss and val/loss_crf_rnn


def tiny_synthetic(root, imbalance=20.0, preflight=True):
    return SyntheticDataModule(
        str(root), num_train=4, num_val=2, image_size=32, batch_size=2, crop_size=32, val_batch_size=2,
        num_workers=0, imbalance=imbalance, preflight=preflight, max_objects=6,
    )  # fmt: skip


def trainer(tmp_path):
    return Trainer(
        fast_dev_run=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        accelerator="cpu", default_root_dir=str(tmp_path),
    )  # fmt: skip


def test_auto_weights_are_counted_at_setup_and_survive_a_checkpoint_without_recounting(tmp_path):
    auto = {"class_path": "deeplab_lit.losses.CrossEntropy", "init_args": {"class_weights": "auto"}}
    module = DeepLabV3Plus(num_classes=6, channels=16, loss=auto, **TINY)
    data = tiny_synthetic(tmp_path / "data")
    fit = trainer(tmp_path)
    fit.fit(module, data)
    weights = module.criterion.class_weight.clone()
    counts = data.class_counts
    frequency = torch.tensor(counts.pixels, dtype=torch.float64) / torch.tensor(counts.image_pixels)
    present = frequency[frequency > 0]
    assert torch.allclose(weights[: len(frequency)].double()[frequency > 0], present.quantile(0.5) / present)
    assert len(present) < 6 and (weights[len(frequency) :] == 1).all()  # classes absent from 4 images: 1
    fit.save_checkpoint(tmp_path / "auto.ckpt")
    loaded = DeepLabV3Plus.load_from_checkpoint(tmp_path / "auto.ckpt")
    assert torch.equal(loaded.criterion.class_weight, weights)
    # read as weights (weights:, predict --weights), the loss's state is training state, not the network's
    started = DeepLabV3Plus(num_classes=6, channels=16, weights=str(tmp_path / "auto.ckpt"), **TINY)
    assert isinstance(started.criterion, CrossEntropy) and started.criterion.class_weight is None
    for key, value in started.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    # no counts this time (preflight off): evaluation keeps the checkpoint's weights instead of recounting
    trainer(tmp_path).validate(loaded, tiny_synthetic(tmp_path / "data", preflight=False))
    assert torch.equal(loaded.criterion.class_weight, weights)


def test_auto_weights_without_counts_say_where_they_come_from(tmp_path):
    auto = {"class_path": "deeplab_lit.losses.CrossEntropy", "init_args": {"class_weights": "auto"}}
    module = DeepLabV3Plus(num_classes=6, channels=16, loss=auto, **TINY)
    with pytest.raises(ValueError, match="preflight: true"):
        trainer(tmp_path).fit(module, tiny_synthetic(tmp_path / "data", preflight=False))


LOSSES = "deeplab_lit.losses"
CLI_LOSSES = {
    "default": None,
    "auto_weights": f"{{class_path: {LOSSES}.CrossEntropy, init_args: {{class_weights: auto}}}}",
    "bootstrapped": f"{{class_path: {LOSSES}.CrossEntropy, init_args: {{top_k_percent_pixels: 0.25, "
    "hard_example_mining_step: 10}}",
    "ohem": f"{{class_path: {LOSSES}.OHEMCrossEntropy, init_args: {{thresh: 0.7, min_kept: 100}}}}",
    "ce_lovasz": f"{{class_path: {LOSSES}.Sum, init_args: {{losses: [{{class_path: {LOSSES}.CrossEntropy}}, "
    f"{{class_path: {LOSSES}.LovaszSoftmax}}], weights: [1.0, 0.5]}}}}",
    "own": f"{{class_path: {__name__}.CallLog}}",
}


@pytest.mark.parametrize("name", CLI_LOSSES)
def test_each_loss_fits_through_the_command_line(name, tmp_path):
    from deeplab_lit.cli import main
    from tests.integration.test_cli import EXPERIMENTS, small_overrides

    config = EXPERIMENTS / "quickstart.yaml"
    option = [] if CLI_LOSSES[name] is None else [f"--model.init_args.loss={CLI_LOSSES[name]}"]
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            *small_overrides(config, tmp_path),
            "--trainer.logger=false",
            *option,
        ]
    )
    loss = cli.trainer.callback_metrics["train/loss"]
    assert cli.trainer.global_step == 1 and torch.isfinite(loss)
    assert "val/loss" in cli.trainer.callback_metrics
    expected = {"default": "CrossEntropy", "auto_weights": "CrossEntropy", "bootstrapped": "CrossEntropy"}
    assert type(cli.model.criterion).__name__ == expected.get(name, type(cli.model.criterion).__name__)
    if name == "auto_weights":
        assert torch.isfinite(cli.model.criterion.class_weight).all()
    if name == "bootstrapped":
        assert cli.model.criterion.top_k_percent_pixels == 0.25
    if name == "ohem":
        assert cli.model.criterion.min_kept == 100
    if name == "ce_lovasz":
        assert [type(m).__name__ for m in cli.model.criterion.losses] == ["CrossEntropy", "LovaszSoftmax"]
    if name == "own":
        assert len(cli.model.criterion.calls) >= 2  # training and validation
