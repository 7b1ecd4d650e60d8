"""--ckpt_path through the real CLI: architecture from the checkpoint, evaluation options from the user.

One tiny VOC-layout run is trained once per module; every test then meets the checkpoint as a user does,
through ``deeplab_lit.cli.main``. The data root is deleted after training, so predict and export prove
they need the checkpoint alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_lit.cli import main
from tests import fakes

EXPERIMENTS = Path(__file__).parents[2] / "experiments"
V3PLUS = EXPERIMENTS / "v3plus.yaml"


def tiny(root: Path, voc: Path) -> list[str]:
    """Shrink the v3+ paper config to a CPU smoke run on fake VOC data."""
    return [
        "--trainer.precision=32-true", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.logger=false", f"--trainer.default_root_dir={root}", "--trainer.callbacks=[]",
        "--model.init_args.pretrained_backbone=false", "--model.init_args.backbone=resnet18",
        "--model.init_args.channels=16", f"--data.init_args.root={voc}", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=2", "--data.init_args.crop_size=33",
        "--data.init_args.train_split=train",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A v3+ ResNet-18 checkpoint trained two steps on fake VOC, the VOC root, and a scratch folder."""
    base = tmp_path_factory.mktemp("trained")
    fakes.make_voc_sbd(base / "voc")
    args = tiny(base / "run", base / "voc")
    main(["fit", "--config", str(V3PLUS), *args, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    return {"ckpt": base / "run" / "checkpoints" / "last.ckpt", "voc": base / "voc", "base": base}


def validate_loss(trained: dict[str, Path], tmp_path: Path, *extra: str) -> float:
    args = tiny(tmp_path / "eval", trained["voc"])
    cli = main(["validate", "--config", str(V3PLUS), *args, *extra])
    return float(cli.trainer.callback_metrics["val/loss"])


TTA = "--model.init_args.inference={scales: [0.75, 1.0, 1.25], flip: true}"


def test_evaluation_options_given_with_a_checkpoint_take_effect(trained, tmp_path):
    ckpt = f"--ckpt_path={trained['ckpt']}"
    plain = validate_loss(trained, tmp_path, ckpt)
    with_tta = validate_loss(trained, tmp_path, ckpt, TTA)
    through_weights = validate_loss(trained, tmp_path, f"--model.init_args.weights={trained['ckpt']}", TTA)
    assert with_tta != pytest.approx(plain, abs=1e-6)  # the user's TTA ran
    assert with_tta == pytest.approx(through_weights, abs=1e-5)  # the same figure as the weights: route


def test_another_version_class_than_the_checkpoints_is_an_error_naming_both(trained, tmp_path):
    with pytest.raises(ValueError, match=r"holds a DeepLabV3Plus but the model given is DeepLabV2"):
        main(["validate", "--config", str(V3PLUS), *tiny(tmp_path, trained["voc"]),
              f"--ckpt_path={trained['ckpt']}", "--model=deeplab_lit.DeepLabV2"])  # fmt: skip


def test_an_architecture_option_that_contradicts_the_checkpoint_names_both_values(trained, tmp_path):
    args = [*tiny(tmp_path, trained["voc"]), f"--ckpt_path={trained['ckpt']}"]
    with pytest.raises(ValueError, match=r"output_stride=8 \(the checkpoint needs 16\)"):
        main(["validate", "--config", str(V3PLUS), *args, "--model.init_args.output_stride=8"])


def test_a_plain_state_dict_as_ckpt_path_says_to_use_weights(trained, tmp_path):
    state = torch.load(trained["ckpt"], weights_only=True)["state_dict"]
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    with pytest.raises(ValueError, match=r"not a training checkpoint.*--model.init_args.weights"):
        main(["validate", "--config", str(V3PLUS), *tiny(tmp_path, trained["voc"]), f"--ckpt_path={plain}"])


def test_a_checkpoint_with_another_class_count_names_both_counts_and_the_weights_route(trained, tmp_path):
    folder = fakes.make_folder_dataset(tmp_path / "folder", n=6, num_classes=3)
    args = [
        *tiny(tmp_path, trained["voc"])[:8], f"--ckpt_path={trained['ckpt']}",
        "--data=deeplab_lit.data.FolderDataModule", f"--data.init_args.root={folder}",
        "--data.init_args.class_names=[a, b, c]", "--data.init_args.num_workers=0",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"has 21 classes but the data module FolderDataModule has 3.*"
                       r"reinit_classifier true"):  # fmt: skip
        main(["validate", "--config", str(V3PLUS), *args])


def test_a_class_count_mismatch_blames_the_checkpoint_not_an_option_nobody_gave(trained, tmp_path):
    saved = torch.load(trained["ckpt"], weights_only=True)
    saved["hyper_parameters"]["num_classes"] = 6  # a run on 6 classes (not the default 21), data of 21
    six = tmp_path / "six.ckpt"
    torch.save(saved, six)
    with pytest.raises(ValueError, match=r"Checkpoint .*six\.ckpt has 6 classes but the data module "
                       r"VOCDataModule has 21") as caught:  # fmt: skip
        main(["validate", "--config", str(V3PLUS), *tiny(tmp_path, trained["voc"]), f"--ckpt_path={six}"])
    assert "was given" not in str(caught.value)


def test_an_explicit_class_count_that_disagrees_with_the_data_is_an_error(trained, tmp_path):
    with pytest.raises(ValueError, match=r"num_classes=0 was given but the data module VOCDataModule has 21"):
        main(["validate", "--config", str(V3PLUS), *tiny(tmp_path, trained["voc"]),
              "--model.init_args.num_classes=0"])  # fmt: skip


@pytest.fixture()
def without_data(trained, tmp_path) -> Path:
    """The checkpoint copied away, and the training data moved out of reach for the test."""
    hidden = trained["base"] / "voc-hidden"
    shutil.move(trained["voc"], hidden)
    yield trained["ckpt"]
    shutil.move(hidden, trained["voc"])


def test_predict_needs_only_the_checkpoint(without_data, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(photos / "a.jpg")
    out = tmp_path / "out"
    main(["predict", f"--ckpt_path={without_data}", f"--data.init_args.predict_path={photos}",
          f"--prediction.output_dir={out}", "--trainer.logger=false", "--trainer.accelerator=cpu",
          f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    labels = np.array(Image.open(out / "a.png"))
    assert labels.shape == (30, 41) and labels.max() < 21
    with_config = tmp_path / "out2"  # the training config names a data root that is not there: still fine
    main(["predict", "--config", str(V3PLUS), *tiny(tmp_path, Path("missing"))[:8],
          f"--ckpt_path={without_data}", f"--data.init_args.predict_path={photos}",
          f"--prediction.output_dir={with_config}", "--data.init_args.root=nowhere"])  # fmt: skip
    assert np.array_equal(np.array(Image.open(with_config / "a.png")), labels)


def test_export_needs_only_the_checkpoint_and_checks_the_output_first(without_data, tmp_path):
    pytest.importorskip("onnxruntime")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match=r"Cannot write the ONNX file.*--output"):
        main(["export", f"--ckpt_path={without_data}", f"--output={blocker / 'model.onnx'}"])
    path = main(["export", f"--ckpt_path={without_data}", f"--output={tmp_path / 'model.onnx'}",
                 "--exporter=torchscript"])  # fmt: skip
    assert Path(path).stat().st_size > 100_000


def test_an_unwritable_checkpoint_folder_stops_fit_before_training(trained, tmp_path):
    blocker = tmp_path / "a-file"  # a folder below a file cannot be created, even by root
    blocker.write_text("")
    args = [*tiny(tmp_path / "run", trained["voc"]), f"--checkpoint.dirpath={blocker / 'checkpoints'}"]
    with pytest.raises(PermissionError, match=r"Cannot write checkpoints.*before the run starts"):
        main(["fit", "--config", str(V3PLUS), *args, "--trainer.max_steps=1"])
