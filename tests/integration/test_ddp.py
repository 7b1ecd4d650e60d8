"""Scale out: two DDP processes (gloo, CPU) through the real CLI give the single-process mIoU.

``fit`` runs with ``strategy: ddp`` in a subprocess (Lightning's DDP launcher re-executes the command
once per extra process), then the last checkpoint is validated with two processes and with one. mIoU
comes from one confusion matrix summed over the processes, so all three figures must be equal. The
validation set has an odd number of images on purpose: Lightning's default DistributedSampler would pad
it with a repeated image, counted twice; the datamodules' unrepeated evaluation sampler must not.

``trainer.sync_batchnorm`` cannot run here: torch's DDP refuses SyncBatchNorm on CPU modules ("SyncBatchNorm
layers only work with GPU modules"). What can be checked on a CPU is the conversion the CLI installs
(``deeplab_lit.callbacks.SyncBatchNorm``): it and its revert must leave every model computing the same
function, which Lightning's default conversion does not do for Xception-65.
"""

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch.nn.modules.batchnorm import _BatchNorm

from deeplab_lit.callbacks import SyncBatchNorm
from deeplab_lit.cli import main
from deeplab_lit.data.synthetic import generate_synthetic
from deeplab_lit.models import deeplab_v2, deeplab_v3, deeplab_v3plus
from tests.test_acceleration import randomise_batchnorm
from tests.tolerances import assert_close_to_scale

REPO = Path(__file__).parents[2]
NUM_TRAIN, NUM_VAL, BATCH = 8, 5, 2


def write_config(tmp_path: Path) -> Path:
    data_root = tmp_path / "synthetic"
    generation = {"num_train": NUM_TRAIN, "num_val": NUM_VAL, "image_size": 48, "max_objects": 3, "seed": 0}
    generate_synthetic(data_root, **generation)  # once, before the processes start
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": "ddp", "max_epochs": 1,
            "precision": "32-true", "enable_progress_bar": False, "enable_model_summary": False,
            "log_every_n_steps": 1, "default_root_dir": str(tmp_path / "runs"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "logs"), "name": "ddp", "version": "fit"},
            },
        },
        "model": {
            "class_path": "deeplab_lit.DeepLabV3Plus",
            "init_args": {"backbone": "resnet18", "output_stride": 16, "lr": 0.01, "head_lr_mult": 1.0},
        },
        "data": {
            "class_path": "deeplab_lit.data.SyntheticDataModule",
            "init_args": {
                "root": str(data_root), **generation, "batch_size": BATCH, "crop_size": 48, "num_workers": 0,
                "val_batch_size": 1,
            },
        },
        "checkpoint": {"dirpath": str(tmp_path / "ckpt")},
    }  # fmt: skip
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args: list[str], cwd: Path) -> None:
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)  # Lightning picks a free port
    done = subprocess.run(
        [sys.executable, "-m", "deeplab_lit", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def validation_rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "metrics.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row.get("val/mIoU")]


@pytest.mark.slow
def test_two_processes_give_the_single_process_miou(tmp_path):
    config = write_config(tmp_path)
    run_cli(["fit", "--config", str(config)], tmp_path)
    (fit_row,) = validation_rows(tmp_path / "logs" / "ddp" / "fit")
    # 8 images over 2 processes with batch 2: 2 steps per epoch (4 with one process).
    assert int(fit_row["step"]) == NUM_TRAIN // (2 * BATCH) - 1
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    assert checkpoint.is_file()

    run_cli(["validate", "--config", str(config), "--ckpt_path", str(checkpoint),
             "--trainer.logger.init_args.version", "validate"], tmp_path)  # fmt: skip
    (ddp_row,) = validation_rows(tmp_path / "logs" / "ddp" / "validate")

    single = main(["validate", "--config", str(config), "--ckpt_path", str(checkpoint), "--trainer.devices=1",
                   "--trainer.strategy=auto", "--trainer.logger=false"])  # fmt: skip
    assert single.trainer.world_size == 1
    single_miou = float(single.trainer.callback_metrics["val/mIoU"])
    single_acc = float(single.trainer.callback_metrics["val/pixel_acc"])

    assert 0.0 < single_miou < 1.0
    assert float(ddp_row["val/mIoU"]) == pytest.approx(single_miou, abs=1e-6)
    assert float(ddp_row["val/pixel_acc"]) == pytest.approx(single_acc, abs=1e-6)
    assert float(fit_row["val/mIoU"]) == pytest.approx(single_miou, abs=1e-6)


SYNC_BN_MODELS = {
    "v2-resnet18-msc": lambda: deeplab_v2(num_classes=3, backbone="resnet18", msc_scales=(1.0, 0.5)),
    "v3-resnet18-aux": lambda: deeplab_v3(num_classes=3, backbone="resnet18", multi_grid=None, aux_head=True),
    "v3plus-mobilenet_v2": lambda: deeplab_v3plus(num_classes=3, backbone="mobilenet_v2", separable=True),
    "v3plus-xception65": lambda: deeplab_v3plus(num_classes=3, backbone="xception65", separable=True),
}


def _randomised(build):
    torch.manual_seed(0)
    model = build().eval()
    randomise_batchnorm(model)
    return model


def _assert_same_function(model, converted):
    images = torch.randn(1, 3, 41, 41)
    with torch.no_grad():
        expected, actual = model(images), converted.eval()(images)
    # Bit for bit identical on a CPU; 1e-5 of the largest logit leaves room for other kernels, and the
    # change Lightning's own conversion makes to Xception-65 (2.7e-3 of it) still fails.
    assert_close_to_scale(actual, expected, 1e-5)


@pytest.mark.parametrize("build", SYNC_BN_MODELS.values(), ids=SYNC_BN_MODELS.keys())
def test_sync_batchnorm_conversion_and_revert_keep_the_network(build):
    # trainer.sync_batchnorm: true applies this conversion; it must not change what the model computes,
    # and neither must the revert Lightning applies after fitting.
    model = _randomised(build)
    converted = SyncBatchNorm().apply(copy.deepcopy(model))
    assert not [
        m
        for m in converted.modules()
        if isinstance(m, _BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)
    ]
    _assert_same_function(model, converted)
    reverted = SyncBatchNorm().revert(converted)
    assert not [m for m in reverted.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    _assert_same_function(model, reverted)


def test_torch_conversion_would_drop_xception_activations():
    # Why the project has its own plugin: Lightning's default (torch's conversion) changes Xception-65.
    model = _randomised(SYNC_BN_MODELS["v3plus-xception65"])
    with pytest.raises(AssertionError):
        _assert_same_function(model, TorchSyncBatchNorm().apply(copy.deepcopy(model)))


def test_cli_installs_the_plugin_for_sync_batchnorm(tmp_path):
    from tests.integration.test_cli import small_overrides

    config = REPO / "experiments" / "quickstart.yaml"
    overrides = [*small_overrides(config, tmp_path), "--trainer.sync_batchnorm=true"]
    cli = main(["--config", str(config), *overrides], run=False)  # run=False: no subcommand
    assert isinstance(cli.trainer._accelerator_connector._layer_sync, SyncBatchNorm)
