"""The CUDA paths of training and evaluation: mixed precision, channels-last, metrics on the device.

Every test here is marked ``gpu`` and skipped where no CUDA device is present (CI); run them with
``pytest -m gpu`` on a GPU machine.
"""

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils.data import DataLoader

from deeplab_lit.metrics import scores_from_confusion
from tests.modules.test_base import SMALL, TinySegmentation

pytestmark = pytest.mark.gpu


class RecordMetricDevices(Callback):
    """Remembers on which device the module's validation confusion matrices live."""

    def on_validation_epoch_end(self, trainer, pl_module):
        self.devices = {m.confmat.device.type for m in pl_module.modules() if hasattr(m, "confmat")}


@pytest.mark.parametrize("name", SMALL)
def test_every_version_trains_on_a_gpu_with_16_mixed_and_channels_last(name):
    cls, kwargs = SMALL[name]
    module = cls(num_classes=3, channels_last=True, **kwargs)
    before = {k: v.detach().clone() for k, v in module.named_parameters()}
    devices = RecordMetricDevices()
    trainer = Trainer(
        max_steps=10, accelerator="gpu", devices=1, precision="16-mixed", callbacks=[devices], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=1, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(
        module, DataLoader(TinySegmentation(), batch_size=2), DataLoader(TinySegmentation(2), batch_size=2)
    )
    assert trainer.global_step == 10
    assert devices.devices == {"cuda"}  # metrics accumulate on the GPU: no host transfer per step
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    # 16-mixed skips the steps whose scaled gradients overflow (GradScaler starts at 2**16), so 10 steps.
    after = dict(module.named_parameters())
    changed = [k for k, v in before.items() if not torch.equal(v, after[k].detach().cpu())]
    assert len(changed) > len(before) // 2, f"only {len(changed)} of {len(before)} parameters were trained"


def test_validation_on_a_gpu_reports_the_confusion_matrix_of_its_own_predictions():
    cls, kwargs = SMALL["v3"]
    module = cls(num_classes=3, **kwargs).cuda().eval()
    data = TinySegmentation(count=3)
    conf = torch.zeros(3, 3, dtype=torch.long, device="cuda")
    with torch.no_grad():
        for item in data:
            pred = module(item["image"][None].cuda()).argmax(1)[0]
            mask = item["mask"].cuda()
            keep = mask != 255
            conf += torch.bincount(mask[keep] * 3 + pred[keep], minlength=9).view(3, 3)
    expected = scores_from_confusion(conf)
    trainer = Trainer(accelerator="gpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    (result,) = trainer.validate(module, DataLoader(data, batch_size=1))
    assert result["val/mIoU"] == pytest.approx(expected["mIoU"].item(), abs=1e-5)
    assert result["val/pixel_acc"] == pytest.approx(expected["pixel_acc"].item(), abs=1e-5)


def test_speed_benchmark_runs_on_the_gpu_and_writes_a_gpu_table(tmp_path):
    pytest.importorskip("segmentation_models_pytorch")
    from benchmarks import speed

    out = tmp_path / "bench.md"
    speed.main(["--device", "cuda", "--quick", "--sections", "train", "infer", "--out", str(out)])
    text = out.read_text()
    assert f"GPU {torch.cuda.get_device_name()}" in text
    assert "| inference, v3 vs torchvision at" in text
    assert "| training step (forward + backward + SGD), v3plus vs smp at" in text
