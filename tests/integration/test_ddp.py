"""Scale out: two DDP processes (gloo, CPU) through the real CLI give the single-process mIoU.

``fit`` runs with ``strategy: ddp`` in a subprocess (Lightning's DDP launcher re-executes the command
once per extra process), then the last checkpoint is validated with two processes and with one. mIoU
comes from one confusion matrix summed over the processes, so all three figures must be equal. The
validation set has an odd number of images on purpose: Lightning's default DistributedSampler would pad
it with a repeated image, counted twice; the datamodules' unrepeated evaluation sampler must not.

``trainer.sync_batchnorm``'s conversion is checked on a CPU in ``tests/callbacks/test_sync_batchnorm.py``.
"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deeplab_lit.cli import main
from deeplab_lit.data.synthetic import generate_synthetic

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
