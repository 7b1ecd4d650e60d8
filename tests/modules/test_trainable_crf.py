"""The crf_rnn option: a trainable dense CRF after the network of every version, trained end to end."""

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader

from deeplab_lit import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus
from deeplab_lit.callbacks import DenseCRFCallback
from deeplab_lit.normalization import IMAGENET
from tests.modules.test_base import TinySegmentation

VERSIONS = {
    "v1": (DeepLabV1, {"backbone": "resnet18"}),
    "v2": (DeepLabV2, {"backbone": "resnet18", "atrous_rates": [1, 2]}),
    "v3": (DeepLabV3, {"backbone": "resnet18", "multi_grid": None}),
    "v3plus": (DeepLabV3Plus, {"backbone": "resnet18", "channels": 16}),
}


class TinyData(LightningDataModule):
    """TinySegmentation, and the normalisation that recovers its raw pixels (as deeplab_lit's have)."""

    normalization = IMAGENET

    def train_dataloader(self):
        return DataLoader(TinySegmentation(), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TinySegmentation(count=2), batch_size=1)


def _trainer(tmp_path=None, callbacks=(), max_steps=3, **kwargs):
    return Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", callbacks=list(callbacks),
        default_root_dir=tmp_path, **kwargs,
    )  # fmt: skip


def _assert_same_outputs(first, second):
    """Both modules, in eval mode, give the same refined logits for the same images."""
    first.eval(), second.eval()
    images = torch.randn(1, 3, 29, 31)
    with torch.no_grad():
        assert torch.allclose(first(images), second(images), atol=1e-5)


def _crf_state(module):
    return {name: p.detach().clone() for name, p in module.crf_rnn.named_parameters()}


@pytest.mark.parametrize("name", VERSIONS)
def test_a_short_fit_trains_the_crf_parameters_of_every_version(name):
    cls, kwargs = VERSIONS[name]
    module = cls(num_classes=3, lr=0.01, crf_rnn={"iterations": 2, "lr_mult": 10}, **kwargs)
    before = _crf_state(module)
    _trainer(limit_val_batches=0).fit(module, datamodule=TinyData())
    after = _crf_state(module)
    assert not torch.equal(before["compatibility"], after["compatibility"])
    assert not torch.equal(before["kernel_weights"], after["kernel_weights"])
    assert torch.equal(before["log_bandwidths"], after["log_bandwidths"])  # fixed unless learn_bandwidths
    assert all(
        "crf" in name
        for name, p in module.named_parameters()
        if any(p is q for q in module.crf_rnn.parameters())
    )


def test_the_crf_has_its_own_parameter_group_without_weight_decay():
    module = DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None, lr=0.01, crf_rnn={"lr_mult": 3})
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=TinyData())
    *_, crf_group = trainer.optimizers[0].param_groups
    assert {id(p) for p in crf_group["params"]} == {
        id(module.crf_rnn.kernel_weights),
        id(module.crf_rnn.compatibility),
    }
    assert crf_group["initial_lr"] == pytest.approx(0.03)
    assert crf_group["weight_decay"] == 0.0


def test_one_run_reports_the_network_the_offline_crf_and_the_trained_crf():
    module = DeepLabV2(num_classes=3, backbone="resnet18", atrous_rates=[1, 2], crf_rnn={"iterations": 3})
    (result,) = _trainer(callbacks=[DenseCRFCallback(preset="deeplab_v2")]).validate(
        module, datamodule=TinyData()
    )
    for key in ("val/mIoU", "val/mIoU_crf", "val/mIoU_crf_rnn", "val/loss_crf_rnn"):
        assert key in result
    # the trained CRF's figure is computed on its own output, not the network's
    module.eval()
    data, conf = TinySegmentation(count=2), torch.zeros(3, 3, dtype=torch.long)
    module.normalization = IMAGENET
    with torch.no_grad():
        for item in data:
            pred = module(item["image"][None]).argmax(1)[0]
            keep = item["mask"] != 255
            conf += torch.bincount(item["mask"][keep] * 3 + pred[keep], minlength=9).view(3, 3)
    iou = conf.diag() / (conf.sum(0) + conf.sum(1) - conf.diag()).clamp(min=1)
    present = (conf.sum(0) + conf.sum(1)) > 0
    assert result["val/mIoU_crf_rnn"] == pytest.approx(iou[present].mean().item(), abs=1e-5)


def test_network_loss_weight_adds_a_loss_on_the_networks_own_logits():
    module = DeepLabV3(
        num_classes=3, backbone="resnet18", multi_grid=None, crf_rnn={"network_loss_weight": 0.5}
    )
    masks = torch.randint(0, 3, (2, 8, 8))
    out, network = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    ce = torch.nn.functional.cross_entropy
    assert torch.allclose(
        module.compute_loss({"out": out, "network": network}, masks),
        ce(out, masks) + 0.5 * ce(network, masks),
    )


def test_checkpoint_round_trip_keeps_the_learned_crf(tmp_path):
    module = DeepLabV3Plus(
        num_classes=3, backbone="resnet18", channels=16, crf_rnn={"iterations": 2, "lr_mult": 10}
    )
    trainer = _trainer(tmp_path, limit_val_batches=0)
    trainer.fit(module, datamodule=TinyData())
    path = tmp_path / "crf.ckpt"
    trainer.save_checkpoint(path)
    restored = DeepLabV3Plus.load_from_checkpoint(path)
    for name, value in _crf_state(module).items():
        assert torch.equal(getattr(restored.crf_rnn, name), value)
    _assert_same_outputs(restored, module)


def test_bad_crf_rnn_options_and_a_missing_normalisation_are_refused():
    with pytest.raises(ValueError, match=r"unknown crf_rnn option\(s\) \['iteration'\]"):
        DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None, crf_rnn={"iteration": 5})
    with pytest.raises(ValueError, match="lr_mult must be a number >= 0"):
        DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None, crf_rnn={"lr_mult": -1})
    module = DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None, crf_rnn={})
    with pytest.raises(ValueError, match="crf_rnn needs the raw RGB images"):
        module(torch.randn(1, 3, 17, 19))


def test_learn_bandwidths_trains_the_bandwidths_through_the_lattice():
    options = {"iterations": 2, "learn_bandwidths": True, "lr_mult": 10}
    module = DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None, lr=0.01, crf_rnn=options)
    before = _crf_state(module)
    _trainer(limit_val_batches=0).fit(module, datamodule=TinyData())
    moved = (_crf_state(module)["log_bandwidths"] - before["log_bandwidths"]).abs()
    assert (moved > 0).all() and torch.isfinite(moved).all()


def test_weights_from_a_run_with_the_trained_crf_bring_it_along(tmp_path):
    options = {"iterations": 2, "lr_mult": 10}
    trained = DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None, crf_rnn=options)
    trainer = _trainer(tmp_path, limit_val_batches=0)
    trainer.fit(trained, datamodule=TinyData())
    trainer.save_checkpoint(tmp_path / "crf.ckpt")
    # left unset: the CRF is part of what the weights compute, so its options and parameters come along
    weights = str(tmp_path / "crf.ckpt")
    common = {"num_classes": 3, "backbone": "resnet18", "multi_grid": None, "weights": weights}
    adopted = DeepLabV3(**common)
    assert adopted.hparams.crf_rnn == options
    # set: the user's options, the trained parameters
    longer = {"iterations": 2, "eval_iterations": 6}
    evaluated = DeepLabV3(**common, crf_rnn=longer)
    assert evaluated.crf_rnn.eval_iterations == 6
    for module in (adopted, evaluated):
        for name, value in _crf_state(trained).items():
            assert torch.equal(getattr(module.crf_rnn, name), value)
    _assert_same_outputs(adopted, trained)
