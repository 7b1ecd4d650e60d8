"""Same seed + ``deterministic: true``: the same metrics and weights, augmenting in workers."""

import os
from pathlib import Path

import pytest
import torch

from deeplab_lit.cli import main
from deeplab_lit.data.loaders import worker_init

QUICKSTART = Path(__file__).parents[2] / "experiments" / "quickstart.yaml"


@pytest.fixture(autouse=True)
def restore_determinism_flag():
    """``Trainer(deterministic=True)`` turns torch's global flag on: give it back to other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def run(tmp_path: Path, name: str, seed: int):
    cli = main(["fit", "--config", str(QUICKSTART), f"--seed_everything={seed}", "--trainer.accelerator=cpu",
                "--trainer.deterministic=true", "--trainer.max_epochs=2", "--trainer.limit_train_batches=2",
                "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path / name}",
                "--model.init_args.backbone=resnet18", f"--data.init_args.root={tmp_path / 'data'}",
                "--data.init_args.num_train=6", "--data.init_args.num_val=3",
                "--data.init_args.image_size=40", "--data.init_args.crop_size=32",
                "--data.init_args.batch_size=2", "--data.init_args.val_batch_size=3",
                "--data.init_args.num_workers=2"])  # fmt: skip
    scores = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    return cli, scores


def test_same_seed_and_deterministic_give_identical_runs_and_another_seed_does_not(tmp_path):
    first, scores = run(tmp_path, "a", seed=0)
    loader = first.trainer.train_dataloader
    assert loader.num_workers == 2 and loader.worker_init_fn is worker_init  # augmentation seeded per worker
    assert os.environ["PL_SEED_WORKERS"] == "1"  # LightningCLI's seed_everything(seed, workers=True)
    assert torch.are_deterministic_algorithms_enabled()

    second, again = run(tmp_path, "b", seed=0)
    assert "val/mIoU" in scores and "train/loss" in scores
    assert again == scores  # exactly, every logged figure
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name

    _, other = run(tmp_path, "c", seed=1)
    assert other["train/loss"] != scores["train/loss"]  # the seed does matter: the test can fail
