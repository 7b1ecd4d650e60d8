"""A timm encoder trains, validates and round-trips through a checkpoint like the built-in backbones."""

from pathlib import Path

import torch

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.cli import main
from tests.integration.test_cli import EXPERIMENTS, small_overrides


def test_v3plus_on_convnext_trains_through_the_cli_and_reloads_from_its_checkpoint(tmp_path: Path):
    config = EXPERIMENTS / "quickstart.yaml"  # DeepLab v3+ on the synthetic data
    args = [a for a in small_overrides(config, tmp_path) if not a.startswith("--trainer.fast_dev_run")]
    args += ["--model.init_args.backbone=timm:convnext_atto", "--model.init_args.output_stride=16",
             "--model.init_args.channels=16", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
             "--trainer.logger=false", f"--checkpoint.dirpath={tmp_path / 'ckpt'}"]  # fmt: skip
    cli = main(["fit", "--config", str(config), *args])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss"]) and 0.0 <= float(metrics["val/mIoU"]) <= 1.0
    # the encoder is the backbone: its parameters are the base-learning-rate group, nothing else is
    backbone_group, head_group = cli.trainer.optimizers[0].param_groups
    encoder = {id(p) for p in cli.model.model.backbone.body.parameters()}
    assert {id(p) for p in backbone_group["params"]} == encoder
    assert not encoder & {id(p) for p in head_group["params"]}

    restored = DeepLabV3Plus.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", map_location="cpu")
    assert restored.hparams.backbone == "timm:convnext_atto"
    images = torch.randn(2, 3, 41, 35)
    with torch.no_grad():
        expected, actual = cli.model.eval()(images), restored.eval()(images)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)  # the same weights, the same arithmetic


def test_freeze_bn_reaches_timm_norm_act_layers():
    # timm's BatchNormAct2d (BatchNorm + activation, EfficientNet's every norm) is a BatchNorm to freeze_bn
    module = DeepLabV3Plus(num_classes=3, backbone="timm:efficientnet_b0", channels=16, freeze_bn=True)
    module.train()
    norms = [m for m in module.model.backbone.modules() if type(m).__name__ == "BatchNormAct2d"]
    assert len(norms) > 40
    assert all(not m.training and not m.weight.requires_grad for m in norms)
    assert module.model.decoder.training  # the rest trains
