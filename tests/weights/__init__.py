from __future__ import annotations

import os
from typing import Any

from deeplab_lit.models import Backbone, build_backbone
from deeplab_lit.weights import load_imagenet_weights


def imagenet_backbone(name: str, source: bool | str | os.PathLike[str], **options: Any) -> Backbone:
    """``build_backbone(name, **options)`` with the ImageNet weights ``source`` loaded into it."""
    backbone = build_backbone(name, **options)
    load_imagenet_weights(backbone, name, source)
    return backbone
