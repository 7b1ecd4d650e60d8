"""``deeplab-lit predict --weights NAME photos/ --output out/``: published weights to masks, no config.

A tiny checkpoint written here is registered under a name (no download); the masks the command writes
must be the network's own argmax on the images normalised as the registry entry says.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deeplab_lit.cli import main
from deeplab_lit.data.voc import VOC_CLASSES
from deeplab_lit.models import deeplab_v3
from deeplab_lit.normalization import CAFFE_BGR
from deeplab_lit.weights.registry import WeightsEntry
from tests.weights.test_registry import TINY_OPTIONS, hub, randomize, register, sha256  # noqa: F401


@pytest.fixture
def tiny_voc_weights(tmp_path, hub, register):  # noqa: F811
    """A registered 21-class tiny DeepLab v3 (Caffe BGR normalisation, so taking it from the entry shows)."""
    torch.manual_seed(0)
    model = randomize(deeplab_v3(num_classes=21, **TINY_OPTIONS)).eval()
    path = tmp_path / "tiny_voc.pth"
    torch.save(model.state_dict(), path)
    entry = WeightsEntry(
        name="tiny_v3.voc_test", url=path.as_uri(), file_name=path.name, sha256=sha256(path),
        module_class="deeplab_lit.DeepLabV3", options=TINY_OPTIONS, num_classes=21, class_names=VOC_CLASSES,
        normalization=CAFFE_BGR, data="written by the test", data_class="deeplab_lit.data.VOCDataModule",
    )  # fmt: skip
    return model, register(entry)


def test_predict_by_name_writes_the_networks_masks_for_a_folder(tmp_path, tiny_voc_weights):
    model, entry = tiny_voc_weights
    photos, out = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (45, 61), "b": (38, 50)}  # two sizes: predicted one at a time at their own size
    for stem, (height, width) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(photos / f"{stem}.png")
    main(["predict", "--weights", entry.name, str(photos), "--output", str(out), "--trainer.accelerator=cpu"])
    for stem, (height, width) in sizes.items():
        written = np.asarray(Image.open(out / f"{stem}.png"))
        pixels = torch.from_numpy(np.asarray(Image.open(photos / f"{stem}.png"))).permute(2, 0, 1)[None]
        with torch.no_grad():
            expected = model(entry.normalization.normalize(pixels)).argmax(1)[0].numpy()
        assert written.shape == (height, width)
        assert (written == expected).mean() > 0.999  # BatchNorm folded for predict: float rounding only
    assert (out / "config.yaml").is_file()  # how the masks were made


def test_list_weights_names_the_published_checkpoints(capsys):
    assert main(["predict", "--list-weights"]) is None
    listed = capsys.readouterr().out
    assert "deeplabv3_resnet101.coco_voc" in listed and "deeplabv2_resnet101_msc.voc_trainaug" in listed


def test_predict_by_name_without_images_says_what_it_needs(tiny_voc_weights):
    _, entry = tiny_voc_weights
    with pytest.raises(SystemExit, match=r"needs exactly one image file, folder or glob"):
        main(["predict", "--weights", entry.name, "--output", "out"])


def test_an_initialisation_without_a_label_set_is_not_offered_for_predict():
    with pytest.raises(SystemExit, match=r"fine-tune it with model.init_args.weights"):
        main(["predict", "--weights", "deeplabv1_resnet101.coco_init", "photos/"])
