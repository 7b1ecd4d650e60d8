"""Each version class writes its architecture options out (LightningCLI reads the signature); the
builder declares them. These tests catch the two drifting apart: a name, a default, a type, a docstring.
"""

from __future__ import annotations

import inspect

import pytest

from deeplab_lit import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus, SegmentationModule
from deeplab_lit.models.deeplab import BUILDERS

VERSIONS = {"v1": DeepLabV1, "v2": DeepLabV2, "v3": DeepLabV3, "v3+": DeepLabV3Plus}


def _options(cls: type) -> dict[str, inspect.Parameter]:
    """The options a version class takes: its own ``__init__``'s, then the base class's it does not set."""
    own = dict(inspect.signature(cls.__init__).parameters)
    base = inspect.signature(SegmentationModule.__init__).parameters
    return {**{k: v for k, v in base.items() if k not in own}, **own}


def _documented(cls: type) -> str:
    return (cls.__doc__ or "") + (SegmentationModule.__doc__ or "")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_builder_option_is_a_module_option_with_the_same_default_and_type(version):
    cls, builder = VERSIONS[version], BUILDERS[version]
    assert cls.builder is builder
    options = _options(cls)
    drift = []
    for name, wanted in inspect.signature(builder).parameters.items():
        given = options.get(name)
        if given is None:
            drift.append(f"{name}: not an option of {cls.__name__}")
            continue
        if name != "num_classes" and given.default != wanted.default:  # num_classes: the module has VOC's 21
            drift.append(f"{name}: default {given.default!r} in {cls.__name__}, builder {wanted.default!r}")
        if given.annotation != wanted.annotation:
            drift.append(f"{name}: type {given.annotation} in {cls.__name__}, {wanted.annotation} in builder")
        if f"{name}:" not in _documented(cls):
            drift.append(f"{name}: documented neither in {cls.__name__} nor in SegmentationModule")
    assert drift == []


def test_the_check_catches_a_drifted_default(monkeypatch):
    def drifted(*, num_classes: int, backbone: str = "resnet50") -> None: ...

    monkeypatch.setitem(BUILDERS, "v3", drifted)
    monkeypatch.setattr(DeepLabV3, "builder", drifted)
    with pytest.raises(AssertionError, match="default 'resnet101' in DeepLabV3, builder 'resnet50'"):
        test_every_builder_option_is_a_module_option_with_the_same_default_and_type("v3")
