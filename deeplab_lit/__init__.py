"""deeplab-lit: DeepLab v1, v2, v3 and v3+ for semantic segmentation, in PyTorch Lightning.

The Lightning modules (``deeplab_lit.DeepLabV3`` ...) are imported on first use (PEP 562), so that
``import deeplab_lit.models`` (pure PyTorch) and ``deeplab-lit --version`` do not pay for Lightning.
"""

from __future__ import annotations

import logging
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("deeplab-lit")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

#: The console command's name and one-line description (``deeplab-lit --help`` and every subcommand's).
PROG = "deeplab-lit"
DESCRIPTION = (
    "DeepLab v1, v2, v3 and v3+ for semantic segmentation, in PyTorch Lightning: train, evaluate (with the "
    "dense CRF), segment photos and export, from YAML configs or published weights."
)

# Info lines of the package's own (Lightning-free) layers, such as how a backbone was built, shown as
# Lightning shows its own: on stderr unless the application configured logging itself.
_logger = logging.getLogger(__name__)
_logger.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False

if TYPE_CHECKING:
    from deeplab_lit.modules import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus, SegmentationModule

_LAZY = {"DeepLabV1", "DeepLabV2", "DeepLabV3", "DeepLabV3Plus", "SegmentationModule"}

__all__ = [
    "DESCRIPTION",
    "PROG",
    "DeepLabV1",
    "DeepLabV2",
    "DeepLabV3",
    "DeepLabV3Plus",
    "SegmentationModule",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the Lightning modules when one is first asked for (``deeplab_lit.DeepLabV3``)."""
    if name in _LAZY:
        value = getattr(import_module("deeplab_lit.modules"), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'deeplab_lit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
