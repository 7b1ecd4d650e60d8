"""Load published and own DeepLab checkpoints into our models, checking everything they imply.

:func:`load_weights` takes a registered name (:mod:`deeplab_lit.weights.registry`), a path or a URL, read
by :func:`~deeplab_lit.weights.formats.read_checkpoint` (this project's, torchvision's and
kazuto1011/deeplab-pytorch's checkpoints, recognised from their keys), and loads it into a model built by
:mod:`deeplab_lit.models.deeplab` (``Segmenter`` or ``MultiScaleSegmenter``).

A checkpoint also implies options that are not in its tensors (output stride, ASPP rates, ResNet style,
MSC, auxiliary head). The model's structure (strides, dilations, paddings, pooling of every layer) is
compared with a model built with those options on the meta device, and a mismatch raises one ValueError
that names the file, the options it needs and the model's. Every tensor is loaded with strict key and
shape checks; another class count raises unless ``reinit_classifier=True``, which loads everything but the
layers that output class scores. :func:`~deeplab_lit.weights.options.resolve_options` (re-exported)
reconciles the implied options with the ones given, before a network is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deeplab_lit.models.deeplab import BUILDERS, MultiScaleSegmenter, Segmenter, builder_kwargs
from deeplab_lit.models.heads import ASPP, ASPPSum, DeepLabV3Head, FCNHead, LargeFOVHead, separable_options
from deeplab_lit.normalization import Normalization
from deeplab_lit.weights.formats import (
    FORMATS,
    OPTIONS,
    Checkpoint,
    UnsafeCheckpointError,
    entry_options,
    read_checkpoint,
)
from deeplab_lit.weights.imagenet import build_network
from deeplab_lit.weights.options import module_version, resolve_options
from deeplab_lit.weights.registry import class_version, get_weights
from deeplab_lit.weights.state_dicts import compare_state

__all__ = [
    "BUILDERS", "FORMATS", "Checkpoint", "UnsafeCheckpointError", "WeightsInfo", "build_published",
    "classifier_keys", "describe_model", "load_weights",
    "model_version", "module_version", "read_checkpoint", "resolve_options",
]  # fmt: skip

_HEAD_PREFIXES = ("head.", "decoder.", "aux_classifier.")


@dataclass(frozen=True)
class WeightsInfo:
    """What :func:`load_weights` loaded: the checkpoint's description without its tensors.

    Attributes:
        source, format, description, version, options, num_classes, normalization: As :class:`Checkpoint`.
        reinitialised: Model keys left at their fresh initialisation (``reinit_classifier=True``).
    """

    source: str
    format: str
    description: str
    version: str | None
    options: dict[str, Any]
    num_classes: int | None
    normalization: Normalization | None
    reinitialised: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- checks
def _segmenter(model: nn.Module) -> Segmenter:
    if isinstance(model, MultiScaleSegmenter):
        return model.segmenter
    if isinstance(model, Segmenter):
        return model
    raise TypeError(f"load_weights expects a Segmenter or MultiScaleSegmenter, got {type(model).__name__}")


def model_version(segmenter: Segmenter) -> str:
    """Return the DeepLab version of a built ``Segmenter``: ``"v1"``, ``"v2"``, ``"v3"`` or ``"v3+"``."""
    if segmenter.decoder is not None:
        return "v3+"
    if isinstance(segmenter.head, DeepLabV3Head):
        return "v3"
    return "v2" if isinstance(segmenter.head, ASPPSum) else "v1"


def describe_model(model: nn.Module) -> dict[str, Any]:
    """Return the architecture options readable from a built model (for messages)."""
    seg = _segmenter(model)
    body = seg.backbone
    info: dict[str, Any] = {"version": model_version(seg), "backbone": getattr(body, "name", None)}
    if hasattr(body, "style"):
        info["style"] = body.style
    info["output_stride"] = getattr(body, "output_stride", None)
    aspp = seg.head[0] if isinstance(seg.head, DeepLabV3Head) else seg.head
    if isinstance(aspp, ASPP | ASPPSum):  # its 3x3 convolutions are the atrous branches' (fc6 in LargeFOV)
        atrous = [m for m in aspp.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        info["atrous_rates"] = tuple(conv.dilation[0] for conv in atrous)
    layout = separable_options(seg.state_dict()) if seg.decoder is not None else None
    info.update(layout or {})
    info["msc_scales"] = model.scales if isinstance(model, MultiScaleSegmenter) else None
    info["aux_head"] = seg.aux_classifier is not None
    return info


def classifier_keys(segmenter: Segmenter) -> list[str]:
    """State-dict keys of the layers that output class scores (what ``reinit_classifier`` leaves fresh)."""
    prefixes: list[str] = []
    head = segmenter.head
    if isinstance(head, nn.Conv2d):
        prefixes.append("head.")
    elif isinstance(head, LargeFOVHead):
        prefixes.append("head.fc8.")
    elif isinstance(head, ASPPSum):
        prefixes += [
            f"head.convs.{i}." + ("" if isinstance(c, nn.Conv2d) else "fc8.")
            for i, c in enumerate(head.convs)
        ]
    elif isinstance(head, DeepLabV3Head):
        prefixes.append(f"head.{len(head) - 1}.")
    if segmenter.decoder is not None:
        prefixes.append("decoder.classifier.")
    if isinstance(segmenter.aux_classifier, FCNHead):
        prefixes.append(f"aux_classifier.{len(segmenter.aux_classifier) - 1}.")
    return [k for k in segmenter.state_dict() if k.startswith(tuple(prefixes))]


def _structure(module: nn.Module) -> dict[str, tuple[tuple[str, Any], ...]]:
    """Strides, dilations, paddings, groups and pooling modes of every conv and pool, by module name."""
    found: dict[str, tuple[tuple[str, Any], ...]] = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            found[name] = (
                ("kernel", m.kernel_size), ("stride", m.stride), ("padding", m.padding),
                ("dilation", m.dilation), ("groups", m.groups),
            )  # fmt: skip
        elif isinstance(m, nn.MaxPool2d | nn.AvgPool2d):
            found[name] = (("kernel", m.kernel_size), ("stride", m.stride), ("padding", m.padding),
                           ("ceil_mode", m.ceil_mode))  # fmt: skip
    return found


def _reference(checkpoint: Checkpoint, num_classes: int) -> nn.Module:
    """Build the model the checkpoint's options describe, on the meta device (no memory, no init)."""
    assert checkpoint.version is not None
    builder = BUILDERS[checkpoint.version]
    with torch.device("meta"):
        return builder(**{**builder_kwargs(builder, checkpoint.options), "num_classes": num_classes})


def _options_text(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={options[k]!r}" for k in OPTIONS if k in options)


def _check_structure(model: nn.Module, checkpoint: Checkpoint, same_version: bool, check_msc: bool) -> None:
    """Raise ValueError if the model is not built the way the checkpoint's options say.

    Across versions (``reinit_classifier``: the checkpoint only initialises the model) only the ResNet
    style is compared, which decides what the backbone's weights mean; output stride and multi-grid may
    differ, as they do between ImageNet weights and the dilated networks DeepLab initialises from them.
    MSC is compared only when the predictions should be reproduced (not when the classifier is
    reinitialised: MSC changes no weight).
    """
    if checkpoint.version is None or not checkpoint.options:
        return
    if not same_version:
        _check_style(model, checkpoint)
        return
    num_classes = checkpoint.num_classes or 1
    reference = _reference(checkpoint, num_classes)
    ours, theirs = _structure(_segmenter(model)), _structure(_segmenter(reference))
    names = [n for n in theirs if n in ours]
    differences = []
    for name in names:
        for (what, expected), (_, found) in zip(theirs[name], ours[name]):
            if expected != found:
                differences.append(f"{name} {what} {found} (needs {expected})")
    if check_msc and "msc_scales" in checkpoint.options:
        expected_scales = checkpoint.options["msc_scales"]
        found_scales = model.scales if isinstance(model, MultiScaleSegmenter) else None
        if (expected_scales and set(expected_scales)) != (found_scales and set(found_scales)):
            differences.append(f"MSC scales {found_scales} (needs {expected_scales})")
    if differences:
        raise ValueError(
            f"Weights {checkpoint.source!r} ({checkpoint.description}) need a model built with "
            f"{_options_text(checkpoint.options)}; the model has {_options_text(describe_model(model))}. "
            f"First differences: {'; '.join(differences[:3])}"
        )


def _check_style(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Raise ValueError if the checkpoint's ResNet style (Caffe or torchvision) is not the model's."""
    needed, found = checkpoint.options.get("style"), getattr(_segmenter(model).backbone, "style", None)
    if needed is not None and found is not None and needed != found:
        raise ValueError(
            f"Weights {checkpoint.source!r} ({checkpoint.description}) come from a style={needed!r} ResNet "
            f"but the model's backbone has style={found!r}; build it with style={needed!r}"
        )


def _key_error(
    model: nn.Module, checkpoint: Checkpoint, missing: list[str], unexpected: list[str]
) -> ValueError:
    found = describe_model(model)
    version = f"DeepLab {checkpoint.version}" if checkpoint.version else "a model"
    return ValueError(
        f"Weights {checkpoint.source!r} ({checkpoint.description}) do not fit the model: "
        f"{len(missing)} of its weights are missing from the file (first: {missing[:4]}) and "
        f"{len(unexpected)} of the file's are not in the model (first: {unexpected[:4]}). The file holds "
        f"{version} ({_options_text(checkpoint.options)}); the model is DeepLab {found['version']} "
        f"({_options_text(found)}). Build the model to match, or pass reinit_classifier=True to load "
        "everything except the classifier layers."
    )


# ------------------------------------------------------------------------------------------- loading
def load_weights(
    model: nn.Module,
    source: str | os.PathLike[str] | Checkpoint,
    *,
    num_classes: int | None = None,
    reinit_classifier: bool = False,
) -> WeightsInfo:
    """Load a published or own checkpoint into a model built by :mod:`deeplab_lit.models.deeplab`.

    Args:
        model: A ``Segmenter`` or ``MultiScaleSegmenter``; changed in place.
        source: A registered weights name, a path or a URL (see :func:`read_checkpoint`), or a
            :class:`Checkpoint` already read.
        num_classes: The model's class count (checked against its classifier when given).
        reinit_classifier: Load everything but the layers that output class scores, which keep their
            fresh initialisation; for fine-tuning on another label set, or from another DeepLab version
            whose head is only classifiers (e.g. kazuto1011's v1 COCO ResNet-101 into a v2 model; across
            versions only the backbone's ResNet style must match, output stride and multi-grid may differ).

    Returns:
        What was loaded, including the input normalisation the weights need (:class:`WeightsInfo`).

    Raises:
        ValueError: the model's version, backbone, options, class count or key set do not match the
            checkpoint (the message names the file, what it needs and what the model has); a bad file.
        FileNotFoundError, RuntimeError: see :func:`read_checkpoint`.
    """
    checkpoint = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    target = _segmenter(model)
    same_version = checkpoint.version in (None, model_version(target))
    if not same_version and not reinit_classifier:
        raise ValueError(
            f"Weights {checkpoint.source!r} ({checkpoint.description}) hold DeepLab {checkpoint.version} "
            f"({_options_text(checkpoint.options)}) but the model is DeepLab {model_version(target)}; "
            f"build DeepLab {checkpoint.version} with those options, or pass reinit_classifier=True to load "
            "the shared layers (the backbone) into a model whose head differs only by its classifier layers"
        )
    expected = target.state_dict()
    classifier = set(classifier_keys(target))
    if num_classes is not None and classifier:
        head_classes = {expected[k].shape[0] for k in classifier if k.endswith("weight")}
        if head_classes != {num_classes}:
            raise ValueError(f"num_classes={num_classes} but the model's classifier outputs {head_classes}")
    head = _HEAD_PREFIXES if reinit_classifier else ()
    report = compare_state(
        expected,
        checkpoint.state,
        skip=classifier if reinit_classifier else (),
        ignore=lambda key: key.startswith(head),  # nothing when head is ()
    )
    state, missing, unexpected, wrong = report.state, report.missing, report.unexpected, report.wrong_shapes
    wanted = [k for k in expected if not (reinit_classifier and k in classifier)]
    if missing or unexpected:
        raise _key_error(model, checkpoint, missing, unexpected)
    _check_structure(model, checkpoint, same_version, check_msc=not reinit_classifier)
    if wrong and set(wrong) <= classifier:
        model_classes = expected[wrong[0]].shape[0]
        raise ValueError(
            f"Weights {checkpoint.source!r} ({checkpoint.description}) have {state[wrong[0]].shape[0]} "
            f"classes but the model has {model_classes}; pass reinit_classifier=True (YAML: "
            "model.init_args.reinit_classifier: true) to load everything except the classifier layers"
        )
    if wrong:
        shapes = report.shapes(expected, "{key}: {file} in the file, {model} in the model")
        raise ValueError(
            f"Weights {checkpoint.source!r} ({checkpoint.description}) have wrong shapes: {shapes[:3]}"
        )
    loaded = {k: state[k] for k in wanted}
    reinitialised = tuple(k for k in expected if k not in loaded)
    target.load_state_dict({**expected, **loaded}, strict=True)
    return WeightsInfo(
        checkpoint.source, checkpoint.format, checkpoint.description, checkpoint.version,
        dict(checkpoint.options), checkpoint.num_classes, checkpoint.normalization, reinitialised,
    )  # fmt: skip


def build_published(name: str, *, pretrained: bool = True) -> nn.Module:
    """Build the network a registered entry describes and, with ``pretrained``, load its weights.

    The plain ``Segmenter`` (``MultiScaleSegmenter`` for MSC entries) of :mod:`deeplab_lit.models.deeplab`,
    in eval mode when pretrained; what ``torch.hub.load`` returns (``hubconf.py``). Its input must be
    normalised with ``get_weights(name).normalization``.

    Raises:
        UnknownWeightsError: ``name`` is not registered (the message lists the names).
        RuntimeError, FileNotFoundError, ValueError: the file cannot be had or is not the one registered
            (see :func:`~deeplab_lit.weights.registry.weights_file`).
    """
    entry = get_weights(name)
    version = class_version(entry.module_class)
    if version is None:
        raise ValueError(f"Weights {name!r}: module_class {entry.module_class!r} is no DeepLab version")
    model = build_network(BUILDERS[version], {**entry_options(entry), "num_classes": entry.num_classes})
    if pretrained:
        load_weights(model, name, num_classes=entry.num_classes)
        model.eval()
    return model
