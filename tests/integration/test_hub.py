"""``torch.hub.load`` from the repository directory (``source="local"``): the hubconf's entry points.

No downloads: a tiny checkpoint written here is registered under a name and loaded through ``hubconf.py``;
the published entry points are built on the meta device without their weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deeplab_lit.models import MultiScaleSegmenter, Segmenter
from deeplab_lit.weights.registry import get_weights
from tests.weights.test_registry import hub, register, sha256, tiny_checkpoint, tiny_entry  # noqa: F401

REPO = str(Path(__file__).parents[2])


def test_torch_hub_loads_a_registered_checkpoint_from_the_repository(tmp_path, hub, register):  # noqa: F811
    model, path = tiny_checkpoint(tmp_path)
    entry = register(tiny_entry(path.as_uri(), path.name, sha256(path)))
    loaded = torch.hub.load(REPO, "deeplab", source="local", weights=entry.name)
    assert type(loaded) is Segmenter and not loaded.training  # the plain network, ready to predict
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = entry.normalization.normalize(torch.randint(0, 256, (1, 3, 40, 52), dtype=torch.uint8))
    with torch.no_grad():
        logits = loaded(x)
    assert logits.shape == (1, 3, 40, 52) and torch.equal(logits, model(x))
    assert (hub / path.name).is_file()  # downloaded once into (the test's) torch checkpoint folder
    fresh = torch.hub.load(REPO, "deeplab", source="local", weights=entry.name, pretrained=False)
    assert not torch.equal(fresh.head[4].weight, model.head[4].weight)


def test_published_entry_points_build_their_networks():
    with torch.device("meta"):  # the architecture only: no download, no memory
        v2 = torch.hub.load(REPO, "deeplabv2_resnet101_msc", source="local", pretrained=False)
        v3 = torch.hub.load(REPO, "deeplabv3_resnet101", source="local", pretrained=False)
    assert isinstance(v2, MultiScaleSegmenter) and v2.scales == (1.0, 0.75, 0.5)
    assert v3.backbone.output_stride == 8 and v3.aux_classifier is not None
    assert v3.head[4].out_channels == get_weights("deeplabv3_resnet101.coco_voc").num_classes == 21
