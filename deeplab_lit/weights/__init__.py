"""Weights for the networks of :mod:`deeplab_lit.models`: reading, registry, ImageNet init, loading.

File formats and safe reading, the registry of published weights, ImageNet initialisation, loading with
key and option checks, downloads.

It sits above :mod:`deeplab_lit.models` and imports it; the networks never import this package.
"""

from deeplab_lit.weights.imagenet import build_network, init_from_imagenet, load_imagenet_weights
from deeplab_lit.weights.load import build_published, load_weights, read_checkpoint
from deeplab_lit.weights.registry import describe_weights, get_weights, list_weights, register_weights

__all__ = [
    "build_network", "build_published", "describe_weights", "get_weights", "init_from_imagenet",
    "list_weights", "load_imagenet_weights", "load_weights", "read_checkpoint", "register_weights",
]  # fmt: skip
