"""DenseCRFCallback: mIoU and trimap mIoU before/after the dense CRF, in fit, validate and test runs."""

import csv
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from deeplab_lit import DeepLabV3Plus
from deeplab_lit.callbacks import DenseCRFCallback
from deeplab_lit.cli import main
from deeplab_lit.crf import CRFParams
from deeplab_lit.crf.pydensecrf_backend import is_available as pydensecrf_available
from deeplab_lit.data import SyntheticDataModule
from deeplab_lit.metrics import scores_from_confusion
from deeplab_lit.modules.base import SegmentationModule
from deeplab_lit.normalization import IMAGENET
from tests.integration.test_cli import EXPERIMENTS, small_overrides

HEIGHT, WIDTH = 24, 40
RED, BLUE = (200, 40, 40), (40, 60, 200)
BACKENDS = [
    "torch",
    pytest.param("pydensecrf", marks=pytest.mark.skipif(not pydensecrf_available(), reason="no pydensecrf")),
]


def edge_item(edge: int, seed: int) -> dict:
    """A red region left of column ``edge`` (class 0) and a blue one right of it (class 1), a little noisy."""
    image = torch.empty(3, HEIGHT, WIDTH, dtype=torch.uint8)
    image[:, :, :edge] = torch.tensor(RED, dtype=torch.uint8)[:, None, None]
    image[:, :, edge:] = torch.tensor(BLUE, dtype=torch.uint8)[:, None, None]
    noise = torch.randint(-4, 5, image.shape, generator=torch.Generator().manual_seed(seed))
    image = (image.int() + noise).clamp(0, 255).to(torch.uint8)
    mask = torch.zeros(HEIGHT, WIDTH, dtype=torch.int64)
    mask[:, edge:] = 1
    return {"image": IMAGENET.normalize(image), "mask": mask, "name": f"edge{edge}"}


class BlurredEdgeNet(nn.Module):
    """A fixed two-class "network": red-vs-blue scores, blurred and shifted right by ``shift`` pixels.

    Its boundary lies ``shift`` pixels inside the blue region with low confidence near the edge: the
    mistake the dense CRF exists to fix, since the colour edge says where the boundary really is.
    """

    def __init__(self, shift: int = 4, blur: int = 9) -> None:
        super().__init__()
        self.colour = nn.Conv2d(3, 2, 1, bias=False)
        self.colour.weight.data = torch.tensor([[1.0, 0, -1], [-1.0, 0, 1]])[:, :, None, None]
        # A box over columns x-shift-blur/2 .. x-shift+blur/2: blurs and moves the boundary right.
        span = 2 * (shift + blur // 2) + 1
        self.blur = nn.Conv2d(
            2, 2, (1, span), padding=(0, span // 2), padding_mode="replicate", bias=False, groups=2
        )
        kernel = torch.zeros(span)
        kernel[:blur] = 1.0 / blur
        self.blur.weight.data = kernel.expand(2, 1, 1, span).clone()
        self.gain = nn.Parameter(torch.tensor(0.5))  # something for the optimiser to train in fit runs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.blur(self.colour(images)) * self.gain

    def forward_train(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self(images)}


class BlurredEdgeModule(SegmentationModule):
    def __init__(self, shift: int = 4, **kwargs) -> None:
        self.shift = shift
        super().__init__(num_classes=2, **kwargs)

    def build_model(self) -> nn.Module:
        return BlurredEdgeNet(self.shift)


class EdgeDataModule(LightningDataModule):
    """Edges at several columns, one image per batch; raw pixels recoverable through ``normalization``."""

    def __init__(self, edges: tuple[int, ...] = (14, 18, 22, 26), with_normalization: bool = True) -> None:
        super().__init__()
        self.items = [edge_item(edge, seed) for seed, edge in enumerate(edges)]
        if with_normalization:
            self.normalization = IMAGENET

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=1)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=1)


class PixelsSeen(Callback):
    """Before the CRF callback's epoch end: how many pixels its after-CRF metric accumulated this run."""

    def __init__(self, crf: DenseCRFCallback) -> None:
        self.crf, self.pixels = crf, []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.pixels.append(int(self.crf.metrics["val"]["crf"].confmat.sum()))


def _trainer(callbacks, **kwargs) -> Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return Trainer(callbacks=callbacks, accelerator="cpu", devices=1, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, **kwargs)  # fmt: skip


def test_quickstart_fast_dev_run_logs_mIoU_after_crf(tmp_path):
    config = EXPERIMENTS / "quickstart.yaml"
    cli = main(["fit", "--config", str(config), *small_overrides(config, tmp_path)])
    (crf,) = [c for c in cli.trainer.callbacks if isinstance(c, DenseCRFCallback)]
    assert crf.params == CRFParams.from_preset("deeplab_v2") and crf.max_batches is None  # the whole val set
    metrics = cli.trainer.callback_metrics
    for key in ("val/mIoU_crf", "val/mIoU_crf_baseline", "val/trimap_mIoU/2px", "val/trimap_mIoU_crf/40px"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/mIoU_crf"]) <= 1.0
    # one batch validated and all of it refined: the baseline is the module's own mIoU
    assert float(metrics["val/mIoU_crf_baseline"]) == pytest.approx(float(metrics["val/mIoU"]), abs=1e-6)


@pytest.mark.parametrize(("name", "preset"), [("v1.yaml", "deeplab_v1_largefov"), ("v2.yaml", "deeplab_v2")])
def test_paper_configs_use_their_crf_preset(name, preset, tmp_path):
    config = EXPERIMENTS / name
    cli = main(["--config", str(config), *small_overrides(config, tmp_path)], run=False)
    (crf,) = [c for c in cli.trainer.callbacks if isinstance(c, DenseCRFCallback)]
    assert crf.params == CRFParams.from_preset(preset)


def test_validate_and_test_return_crf_and_trimap_keys(tmp_path):
    data = SyntheticDataModule(root=str(tmp_path / "synthetic"), num_train=2, num_val=2, image_size=40,
                               num_workers=0, batch_size=2, val_batch_size=2)  # fmt: skip
    model = DeepLabV3Plus(num_classes=data.num_classes, backbone="mobilenet_v2")
    crf = DenseCRFCallback(backend="torch", band_widths=[2, 5], iterations=3)
    trainer = _trainer([crf])
    (validated,) = trainer.validate(model, datamodule=data)
    keys = {"val/mIoU_crf", "val/mIoU_crf_baseline", "val/trimap_mIoU/2px", "val/trimap_mIoU/5px",
            "val/trimap_mIoU_crf/2px", "val/trimap_mIoU_crf/5px"}  # fmt: skip
    assert keys <= set(validated)
    assert validated["val/mIoU_crf_baseline"] == pytest.approx(validated["val/mIoU"], abs=1e-6)
    (tested,) = trainer.test(model, datamodule=data)
    assert {k.replace("val/", "test/") for k in keys} <= set(tested)
    assert not any(k.startswith("val/") for k in tested)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crf_fixes_a_blurred_boundary(backend):
    crf = DenseCRFCallback(backend=backend, num_workers=1, band_widths=[2, 10])
    (result,) = _trainer([crf]).validate(BlurredEdgeModule(), datamodule=EdgeDataModule())
    before, after = result["val/mIoU"], result["val/mIoU_crf"]
    assert before < 0.9  # 3 columns next to every edge mislabelled
    assert after > before + 0.1 and after > 0.97, (before, after)
    assert result["val/trimap_mIoU_crf/2px"] > result["val/trimap_mIoU/2px"] + 0.2
    assert result["val/mIoU_crf_baseline"] == pytest.approx(before, abs=1e-6)


def _rows_with(log_dir: Path, key: str) -> list[bool]:
    """For each logged validation (row with val/mIoU): whether it also has ``key``."""
    (metrics_csv,) = log_dir.rglob("metrics.csv")
    with metrics_csv.open() as f:
        return [bool(row[key]) for row in csv.DictReader(f) if row.get("val/mIoU")]


@pytest.mark.parametrize(
    ("kwargs", "active"),
    [({"every_n_epochs": 2}, [False, True, False, True]), ({"every_n_epochs": 3}, [False, False, True, True]),
     ({"only_last_epoch": True}, [False, False, False, True]), ({}, [True, True, True, True])],
)  # fmt: skip
def test_fit_runs_the_crf_every_n_epochs_and_in_the_last(kwargs, active, tmp_path):
    crf = DenseCRFCallback(backend="torch", iterations=2, band_widths=[2], **kwargs)
    seen = PixelsSeen(crf)
    trainer = _trainer([seen, crf], max_epochs=4, logger=CSVLogger(tmp_path), limit_train_batches=1)
    trainer.fit(BlurredEdgeModule(lr=1e-4), datamodule=EdgeDataModule())
    all_pixels = 4 * HEIGHT * WIDTH
    assert seen.pixels == [all_pixels if on else 0 for on in active]
    assert _rows_with(tmp_path, "val/mIoU_crf") == active
    assert _rows_with(tmp_path, "val/trimap_mIoU_crf/2px") == active


def test_max_batches_limits_the_crf_and_its_baseline_covers_the_same_batches():
    data = EdgeDataModule(edges=(14, 18, WIDTH))  # the third: all red, class 0, predicted right
    crf = DenseCRFCallback(backend="torch", iterations=2, max_batches=2, band_widths=[2])
    seen = PixelsSeen(crf)
    module = BlurredEdgeModule()
    (result,) = _trainer([seen, crf]).validate(module, datamodule=data)
    assert seen.pixels == [2 * HEIGHT * WIDTH]
    confmat = torch.zeros(2, 2, dtype=torch.long)
    with torch.no_grad():
        for item in data.items[:2]:
            pred = module(item["image"][None]).argmax(1)[0]
            confmat += torch.bincount(item["mask"].flatten() * 2 + pred.flatten(), minlength=4).view(2, 2)
    expected = scores_from_confusion(confmat)["mIoU"].item()
    assert result["val/mIoU_crf_baseline"] == pytest.approx(expected, abs=1e-6)
    assert result["val/mIoU"] > result["val/mIoU_crf_baseline"] + 0.01  # over all 3 images


def test_sanity_check_validation_is_skipped():
    crf = DenseCRFCallback(backend="torch", iterations=2, band_widths=[2])
    seen = PixelsSeen(crf)
    trainer = _trainer([seen, crf], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.num_sanity_val_steps = 1
    trainer.fit(BlurredEdgeModule(lr=1e-4), datamodule=EdgeDataModule())
    assert seen.pixels == [0, HEIGHT * WIDTH]  # the sanity check ran first, without the CRF


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"preset": "deeplab_v9"}, "deeplab_v9"), ({"backend": "cuda"}, "backend"),
     ({"bi_rgb_std": -1.0}, "bi_rgb_std"), ({"iterations": 0}, "iterations"),
     ({"every_n_epochs": 0}, "every_n_epochs"), ({"max_batches": 0}, "max_batches"),
     ({"num_workers": 0}, "num_workers"), ({"band_widths": []}, "band_widths"),
     ({"band_widths": [2, 0]}, "band_widths"), ({"stages": ["train"]}, "stages"),
     ({"stages": "val"}, "stages"),
     ({"only_last_epoch": True, "every_n_epochs": 2}, "only_last_epoch")],
)  # fmt: skip
def test_bad_arguments_fail_with_a_clear_message(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseCRFCallback(**kwargs)


def test_explicit_parameters_override_the_preset():
    crf = DenseCRFCallback(preset="deeplab_v1_largefov", iterations=5, bi_rgb_std=4.0)
    expected = CRFParams(iterations=5, pos_w=3, pos_xy_std=3, bi_w=4, bi_xy_std=121, bi_rgb_std=4)
    assert crf.params == expected


def test_a_trainer_without_a_normalising_datamodule_is_refused():
    crf = DenseCRFCallback(backend="torch")
    with pytest.raises(ValueError, match="normalization.*no datamodule"):
        _trainer([crf]).validate(BlurredEdgeModule(), dataloaders=EdgeDataModule().val_dataloader())
    with pytest.raises(ValueError, match="normalization.*EdgeDataModule without one"):
        _trainer([crf]).validate(BlurredEdgeModule(), datamodule=EdgeDataModule(with_normalization=False))


@pytest.mark.gpu
def test_on_a_gpu_the_metrics_and_the_crf_stay_on_the_module_device():
    crf = DenseCRFCallback(band_widths=[2])  # auto: the torch backend, on the GPU

    class Devices(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            self.devices = {
                m.confmat.device.type for m in crf.metrics["val"].modules() if hasattr(m, "confmat")
            }

    devices = Devices()
    trainer = Trainer(callbacks=[devices, crf], accelerator="gpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    (result,) = trainer.validate(BlurredEdgeModule(), datamodule=EdgeDataModule())
    assert devices.devices == {"cuda"}
    assert result["val/mIoU_crf"] > result["val/mIoU"] + 0.1


@pytest.mark.slow  # two spawned processes (gloo): 97 s on the shared 2-core development machine
def test_under_ddp_the_scores_are_those_of_the_whole_set():
    data = EdgeDataModule(edges=(14, 18, WIDTH, 26))  # rank 0 sees images 0 and 2, rank 1 images 1 and 3
    crf = DenseCRFCallback(backend="torch", iterations=2, band_widths=[2])
    (single,) = _trainer([crf]).validate(BlurredEdgeModule(), datamodule=data)
    (shard,) = _trainer([crf]).validate(BlurredEdgeModule(), datamodule=EdgeDataModule(edges=(14, WIDTH)))
    ddp = Trainer(callbacks=[crf], accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False)  # fmt: skip
    (result,) = ddp.validate(BlurredEdgeModule(), datamodule=data)
    for key in ("val/mIoU_crf_baseline", "val/trimap_mIoU/2px", "val/mIoU_crf"):
        assert result[key] == pytest.approx(single[key], abs=1e-6), key
    assert result["val/mIoU_crf_baseline"] != pytest.approx(shard["val/mIoU_crf_baseline"], abs=1e-3)
