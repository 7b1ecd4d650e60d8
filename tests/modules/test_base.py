"""The shared LightningModule: what every version inherits, tested through the real models."""

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, Dataset

from deeplab_lit import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus
from deeplab_lit.inference import InferenceConfig
from deeplab_lit.metrics import scores_from_confusion
from deeplab_lit.models import deeplab_v1, deeplab_v2, deeplab_v3, deeplab_v3plus
from deeplab_lit.modules import SegmentationModule

SMALL = {
    "v1-vgg": (DeepLabV1, {"backbone": "vgg16"}),
    "v1-resnet": (DeepLabV1, {"backbone": "resnet18"}),
    "v2-msc": (DeepLabV2, {"backbone": "resnet18", "msc_scales": [1.0, 0.75, 0.5]}),
    "v3": (DeepLabV3, {"backbone": "resnet18", "multi_grid": [1, 2], "aux_head": True}),
    "v3plus": (DeepLabV3Plus, {"backbone": "mobilenet_v2", "separable": True}),
}


class TinySegmentation(Dataset):
    """Images whose left half is class 1 and right half class 2, with an ignore column."""

    def __init__(self, count: int = 4, size: tuple[int, int] = (33, 41)):
        gen = torch.Generator().manual_seed(0)
        self.items = []
        for _ in range(count):
            mask = torch.ones(size, dtype=torch.long)
            mask[:, size[1] // 2 :] = 2
            mask[:, size[1] // 2] = 255
            image = torch.randn(3, *size, generator=gen) * 0.1 + mask.clamp(max=3).float()
            self.items.append({"image": image, "mask": mask, "name": "x"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


@pytest.mark.parametrize("name", SMALL)
def test_each_version_gives_logits_at_odd_input_size_and_trains_with_batch_one(name):
    cls, kwargs = SMALL[name]
    module = cls(num_classes=4, **kwargs)
    module.eval()
    with torch.no_grad():
        assert module(torch.randn(2, 3, 45, 53)).shape == (2, 4, 45, 53)
    module.train()
    batch = {"image": torch.randn(1, 3, 37, 37), "mask": torch.randint(0, 4, (1, 37, 37))}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# Each version's options, and the builder call they must amount to (YAML lists as tuples, [] as None where
# the builder takes None); values off the defaults, so that an option not passed on would show.
BUILT_AS = {
    "v1-caffe": (DeepLabV1, {"backbone": "resnet18", "output_stride": 16, "style": "caffe"},
                 deeplab_v1, {"backbone": "resnet18", "output_stride": 16, "style": "caffe"}),
    "v2-msc": (DeepLabV2, {"backbone": "resnet18", "atrous_rates": [2, 4], "msc_scales": [1.0, 0.5]},
               deeplab_v2, {"backbone": "resnet18", "atrous_rates": (2, 4), "msc_scales": (1.0, 0.5)}),
    "v2-no-msc": (DeepLabV2, {"backbone": "resnet18", "msc_scales": []},
                  deeplab_v2, {"backbone": "resnet18", "msc_scales": None}),
    "v3": (DeepLabV3, {"backbone": "resnet18", "output_stride": 8, "atrous_rates": [3, 6, 9],
                       "multi_grid": [1, 2], "aux_head": True},
           deeplab_v3, {"backbone": "resnet18", "output_stride": 8, "atrous_rates": (3, 6, 9),
                        "multi_grid": (1, 2), "aux_head": True}),
    "v3-no-grid": (DeepLabV3, {"backbone": "resnet18", "multi_grid": []},
                   deeplab_v3, {"backbone": "resnet18", "multi_grid": None}),
    "v3plus": (DeepLabV3Plus, {"backbone": "mobilenet_v2", "separable": True, "channels": 16, "lr": 0.1},
               deeplab_v3plus, {"backbone": "mobilenet_v2", "separable": True, "channels": 16}),
}  # fmt: skip


@pytest.mark.parametrize("name", BUILT_AS)
def test_each_version_builds_what_its_builder_builds_from_the_same_options(name):
    cls, options, builder, expected = BUILT_AS[name]
    torch.manual_seed(0)
    module = cls(num_classes=3, **options)
    torch.manual_seed(0)
    direct = builder(num_classes=3, **expected)
    assert repr(module.model) == repr(direct)  # every layer's kind, stride, dilation, padding, width
    assert getattr(module.model, "scales", None) == getattr(direct, "scales", None)  # MSC
    ours, theirs = module.model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_module_without_builder_says_how_to_name_one():
    class Unnamed(SegmentationModule):
        pass

    with pytest.raises(TypeError, match="Unnamed names no builder.*builder = "):
        Unnamed(num_classes=2)


def test_loss_covers_every_output_with_aux_weight():
    module = DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None, aux_head=True, aux_weight=0.5)
    masks = torch.randint(0, 3, (2, 8, 8))
    out = torch.randn(2, 3, 8, 8)
    aux = torch.randn(2, 3, 8, 8)
    ce = torch.nn.functional.cross_entropy
    expected = ce(out, masks) + 0.5 * ce(aux, masks)
    assert torch.allclose(module.compute_loss({"out": out, "aux": aux}, masks), expected)


def _fit(module, max_steps=3):
    trainer = Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(TinySegmentation(), batch_size=2))
    return trainer


def test_head_gets_ten_times_the_lr_and_poly_schedule_decays_every_step():
    module = DeepLabV3Plus(num_classes=3, backbone="resnet18", lr=0.01)
    trainer = _fit(module, max_steps=4)
    optimizer = trainer.optimizers[0]
    backbone_group, head_group = optimizer.param_groups
    backbone_params = {id(p) for p in module.model.backbone.parameters()}
    assert all(id(p) in backbone_params for p in backbone_group["params"])
    assert not any(id(p) in backbone_params for p in head_group["params"])
    # poly: lr = base * (1 - step / max_steps) ** 0.9 after 4 of 4 steps -> 0
    assert backbone_group["initial_lr"] == pytest.approx(0.01)
    assert head_group["initial_lr"] == pytest.approx(0.1)
    assert backbone_group["lr"] == pytest.approx(0.0, abs=1e-12)


def test_freeze_bn_keeps_backbone_statistics_and_weights_fixed():
    module = DeepLabV2(num_classes=3, backbone="resnet18", freeze_bn=True, lr=0.1)
    bn = module.model.backbone.bn1
    before_mean, before_weight = bn.running_mean.clone(), bn.weight.clone()
    _fit(module, max_steps=2)
    assert torch.equal(bn.running_mean, before_mean)
    assert torch.equal(bn.weight, before_weight)
    assert not bn.training or not module.training


def test_validate_reports_set_level_scores_equal_to_a_direct_confusion_matrix():
    module = DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None)
    module.eval()
    data = TinySegmentation(count=3)
    conf = torch.zeros(3, 3, dtype=torch.long)
    with torch.no_grad():
        for item in data:
            pred = module(item["image"][None]).argmax(1)[0]
            keep = item["mask"] != 255
            conf += torch.bincount(item["mask"][keep] * 3 + pred[keep], minlength=9).view(3, 3)
    expected = scores_from_confusion(conf)
    trainer = Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", enable_model_summary=False)
    (result,) = trainer.validate(module, DataLoader(data, batch_size=1))
    for key in ("val/mIoU", "val/pixel_acc", "val/mean_acc", "val/loss"):
        assert key in result
    assert result["val/mIoU"] == pytest.approx(expected["mIoU"].item(), abs=1e-5)
    assert result["val/pixel_acc"] == pytest.approx(expected["pixel_acc"].item(), abs=1e-5)
    (tested,) = trainer.test(module, DataLoader(data, batch_size=1))
    assert tested["test/mIoU"] == pytest.approx(expected["mIoU"].item(), abs=1e-5)


def test_tta_inference_config_is_used_by_validation():
    plain = DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None)
    tta = DeepLabV3(num_classes=3, backbone="resnet18", multi_grid=None,
                    inference=InferenceConfig(scales=(0.75, 1.0), flip=True))  # fmt: skip
    tta.load_state_dict(plain.state_dict())
    batch = next(iter(DataLoader(TinySegmentation(count=1), batch_size=1)))
    plain.eval()
    tta.eval()
    with torch.no_grad():
        a = plain._evaluate(batch, "val")["logits"]
        b = tta._evaluate(batch, "val")["logits"]
    assert a.shape == b.shape and not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_classes": 0}, "num_classes"), ({"lr": -1.0}, "lr"), ({"class_names": ["a"]}, "class_names"),
     ({"backbone": "resnet9000"}, "resnet9000")],
)  # fmt: skip
def test_bad_options_fail_with_a_clear_message(kwargs, match):
    args = {"num_classes": 3, "backbone": "resnet18", "multi_grid": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        DeepLabV3(**args)
