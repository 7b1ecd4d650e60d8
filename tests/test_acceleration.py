"""The module's speed options keep results: channels-last, the BatchNorm-folded copy predict runs, fused
SGD, torch.compile. Folding itself, on every version, is ``tests/models/test_fusion.py``."""

import shutil

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader

from deeplab_lit import DeepLabV1, DeepLabV3Plus
from deeplab_lit.acceleration import _begin_cudagraph_step, fast_sgd_options
from deeplab_lit.inference import InferenceConfig, segment
from deeplab_lit.models.fusion import count_batchnorms
from tests.models.test_fusion import FOLDING_REL, randomise_batchnorm
from tests.tolerances import assert_close_to_scale

CL = torch.channels_last


def small_module(**kwargs):
    torch.manual_seed(0)
    return DeepLabV3Plus(num_classes=3, backbone="resnet18", output_stride=16, **kwargs)


# Channels-last runs other convolution kernels, which sum in another order. Measured on a 2-core CPU VM
# (three input seeds), as fractions of each tensor's largest magnitude: gradients differ by <= 1.5e-6,
# logits by <= 7e-7, the loss by <= 3e-7; 1e-4 is ~70x that. A 1e-2 change to any one of six weight
# tensors tried moves some gradient by >= 5e-3 and the logits by >= 1.4e-3: >= 14x over it.
CHANNELS_LAST_REL = 1e-4


def _dropout_off(module: nn.Module) -> None:
    for dropout in (m for m in module.modules() if isinstance(m, nn.Dropout)):
        dropout.p = 0.0  # random masks are drawn in memory order, so they differ between formats


def test_channels_last_gives_the_same_outputs_and_gradients():
    plain, fast = small_module(), small_module(channels_last=True)
    randomise_batchnorm(plain.model)
    fast.load_state_dict(plain.state_dict())
    assert fast.model.backbone.conv1.weight.is_contiguous(memory_format=CL)
    assert not plain.model.backbone.conv1.weight.is_contiguous(memory_format=CL)
    images = torch.randn(2, 3, 48, 40)  # a batch as the loader gives it: the first conv converts it
    masks = torch.randint(0, 3, (2, 48, 40))
    # Gradients with BatchNorm on its running statistics: with batch statistics of 2 crops at 3x3 px
    # (and of 2 values in ASPP's pooling branch) the backward pass is so ill-conditioned that float32
    # gradients of the two formats differ by up to 17% of a tensor's largest one (1.5e-12 in float64),
    # and no tolerance could tell rounding from a fault. Training-mode BatchNorm is checked by the loss.
    for module in (plain, fast):
        module.eval()
        module.compute_loss(module.model.forward_train(images), masks).backward()
    for (name, expected), actual in zip(plain.named_parameters(), fast.parameters(), strict=True):
        assert_close_to_scale(actual.grad, expected.grad, CHANNELS_LAST_REL, what=f"gradient of {name}")
    losses = []
    for module in (plain, fast):
        module.train()
        _dropout_off(module)
        with torch.no_grad():
            losses.append(module.compute_loss(module.model.forward_train(images), masks))
    assert_close_to_scale(losses[1], losses[0], CHANNELS_LAST_REL, what="training loss")
    plain.eval(), fast.eval()
    with torch.no_grad():
        assert_close_to_scale(fast(images), plain(images), CHANNELS_LAST_REL, what="logits")
        assert fast.model.backbone(images)["out"].is_contiguous(memory_format=CL)
        assert fast(images).is_contiguous(memory_format=CL)


class FoldedModelSpy(Callback):
    def __init__(self):
        self.batchnorms_seen: list[int] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batchnorms_seen.append(count_batchnorms(pl_module._folded["model"]))


def test_predict_runs_the_folded_copy_and_keeps_the_checkpoint_unfolded():
    module = small_module(channels_last=True)
    randomise_batchnorm(module.model)
    keys = set(module.state_dict())
    images = torch.randn(4, 3, 40, 56)
    batches = [{"image": images[i : i + 2], "name": [f"a{i}", f"b{i}"]} for i in (0, 2)]
    spy = FoldedModelSpy()
    trainer = Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, callbacks=[spy],
        enable_model_summary=False,
    )  # fmt: skip
    outputs = trainer.predict(module, dataloaders=DataLoader(batches, batch_size=None))
    assert spy.batchnorms_seen == [0, 0]
    assert module._folded == {} and set(module.state_dict()) == keys
    module.eval()
    with torch.no_grad():
        expected = module(images)
    actual = torch.cat([out["logits"] for out in outputs])
    assert_close_to_scale(actual, expected, FOLDING_REL)
    assert outputs[1]["name"] == ["a2", "b2"]


class MemoryFormatSpy(Callback):
    def __init__(self):
        self.formats: list[tuple[bool, bool]] = []  # (folded copy NHWC, the network itself NHWC)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        first = lambda model: next(m for m in model.modules() if isinstance(m, nn.Conv2d)).weight  # noqa: E731
        self.formats.append(
            (first(pl_module._folded["model"]).is_contiguous(memory_format=CL),
             first(pl_module.model).is_contiguous(memory_format=CL))
        )  # fmt: skip


@pytest.mark.parametrize(
    "inference",
    [InferenceConfig(), InferenceConfig(scales=(0.75, 1.0), flip=True), InferenceConfig(window=(33, 41))],
    ids=["plain", "tta", "sliding window"],
)
def test_predict_on_the_cpu_runs_a_channels_last_copy_with_the_eager_networks_labels(inference):
    module = small_module(inference=inference)
    randomise_batchnorm(module.model)
    images = torch.randn(2, 3, 45, 61)  # odd sizes
    spy = MemoryFormatSpy()
    options = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    trainer = Trainer(accelerator="cpu", callbacks=[spy], **options)
    (output,) = trainer.predict(module, dataloaders=DataLoader([{"image": images}], batch_size=None))
    assert spy.formats == [(True, False)]  # the copy is NHWC, the network (and its checkpoint) as it was
    assert not module._predict_channels_last  # and predict leaves no trace
    module.eval()
    with torch.no_grad():
        expected = segment(module.model, images, inference)
    assert_close_to_scale(output["logits"], expected, FOLDING_REL)
    assert torch.equal(output["preds"], expected.argmax(1))


def test_predict_without_folding_uses_the_network_itself():
    module = small_module(fuse_bn_for_inference=False)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = [{"image": torch.randn(1, 3, 32, 32)}]
    trainer.predict(module, dataloaders=DataLoader(batches, batch_size=None))
    assert module._folded == {}
    assert count_batchnorms(module.model) > 0


def test_optimizer_uses_the_fused_sgd_step(tmp_path):
    module = small_module()
    batches = [{"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}] * 2
    trainer = Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    before = module.model.head.project[0].weight.detach().clone()
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.defaults["fused"] is True
    assert not torch.equal(module.model.head.project[0].weight, before)  # the fused step did update


def test_fp16_loss_scaling_steps_with_foreach_sgd_not_the_fused_one(tmp_path):
    # GradScaler starts at 2**16, so the first steps overflow and are skipped; torch's fused SGD then
    # leaves uninitialised momentum buffers behind (the bug fast_sgd_options documents) and the weights
    # turn NaN a step later where that memory held garbage (on GPUs, reused allocator blocks; fresh CPU
    # pages are often zero, so the NaN check alone would not catch it here).
    torch.manual_seed(0)
    module = DeepLabV1(num_classes=3, backbone="resnet18", output_stride=16, lr=0.07)
    images = torch.randn(2, 3, 32, 32) + torch.arange(2).view(2, 1, 1, 1)
    batches = [{"image": images, "mask": torch.randint(0, 3, (2, 32, 32))}] * 8
    trainer = Trainer(
        accelerator="cpu", max_steps=8, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        # what 16-mixed is on a GPU (Lightning gives the CPU no GradScaler by itself)
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.precision_plugin.scaler.get_scale() < 2**16  # some steps were skipped
    bad = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"non-finite weights after fp16 training: {bad[:3]}"
    assert not trainer.optimizers[0].defaults.get("fused")


def test_fast_sgd_options_fall_back_when_fusing_is_not_allowed():
    params = [nn.Parameter(torch.zeros(3))]
    assert fast_sgd_options(params) == {"fused": True}
    assert fast_sgd_options(params, fused_allowed=False) == {}  # no foreach kernels on the CPU: a plain loop


def test_fast_sgd_options_ask_torch_whether_the_fused_step_runs_on_each_device():
    """torch's fused SGD refuses parameters on the meta device: one such parameter means no fused step."""
    cpu, meta = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, device="meta"))
    meta.grad = torch.zeros_like(meta)
    assert fast_sgd_options([meta]) == {} and fast_sgd_options([cpu, meta]) == {}
    with pytest.raises(RuntimeError, match="fused=True"):  # what the options spare the user
        torch.optim.SGD([meta], lr=0.1, fused=True).step()
    torch.optim.SGD([meta], lr=0.1, **fast_sgd_options([meta])).step()


def test_compile_option_keeps_state_dict_keys():
    plain, compiled = small_module(), small_module(compile=True)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert compiled.model.backbone._compiled_call_impl is not None
    assert compiled.model.head._compiled_call_impl is not None


def test_compile_takes_a_torch_compile_mode_by_name_and_rejects_others():
    compiled = small_module(compile="max-autotune-no-cudagraphs")
    assert compiled.model.backbone._compiled_call_impl is not None
    assert not compiled.model._forward_pre_hooks  # no CUDA graphs, no graph steps to mark
    # CUDA-graph modes: every call of the whole network begins a new graph step, or the parts' graphs
    # would overwrite outputs still in use (seen on an H100 before the hook existed)
    graphed = small_module(compile="reduce-overhead")
    assert list(graphed.model._forward_pre_hooks.values()) == [_begin_cudagraph_step]
    with pytest.raises(ValueError, match=r"compile must be true, false or one of .*got 'fastest'"):
        small_module(compile="fastest")


def _can_compile() -> bool:
    return torch._dynamo.is_dynamo_supported() and shutil.which("gcc") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _can_compile(), reason="torch.compile needs dynamo support and a C compiler")
def test_compiled_network_trains_and_matches_eager():
    torch.manual_seed(0)
    eager = DeepLabV1(num_classes=2, backbone="resnet18", output_stride=16)
    compiled = DeepLabV1(num_classes=2, backbone="resnet18", output_stride=16, compile=True)
    compiled.load_state_dict(eager.state_dict())
    images, masks = torch.randn(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    losses = []
    for module in (eager, compiled):
        loss = module.compute_loss(module.model.forward_train(images), masks)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    # Inductor fuses and reorders the sums, and training-mode BatchNorm over 8 values per channel at
    # layer4 amplifies the rounding: gradients differed by <= 3.3e-5 of each tensor's largest one on a
    # 2-core CPU VM; changing the classifier's weights by 1e-2 moved them by up to 8e-2 (conv1's: 5e-2).
    for (name, expected), actual in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert actual.grad is not None, name
        assert_close_to_scale(actual.grad, expected.grad, 1e-3, what=f"gradient of {name}")
