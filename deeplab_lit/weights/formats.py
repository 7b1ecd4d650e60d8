"""Checkpoint formats: read a file or URL, recognise its format from the keys, convert to our keys.

Formats (a ``module.`` prefix, left by ``DataParallel``, is dropped first):

- ``deeplab_lit``: this project's Lightning checkpoint (``{"state_dict": {"model.<key>": ...},
  "hyper_parameters": ..., "normalization": ...}``) or a plain ``Segmenter``/``MultiScaleSegmenter``
  state dict (``torch.save(model.state_dict())``).
- ``torchvision``: ``torchvision.models.segmentation.deeplabv3_resnet50/101`` and
  ``deeplabv3_mobilenet_v3_large`` (COCO with VOC labels).
- ``kazuto1011``: kazuto1011/deeplab-pytorch's DeepLab v2 ResNet-101 MSC (VOC ``train_aug``) and its
  COCO-initialised DeepLab v1 ResNet-101 (Caffe-style ResNet, BGR 0-255 input, mean subtraction).

Each format also implies options its tensors do not hold (``Checkpoint.options``); loading and checking
them is :mod:`deeplab_lit.weights.load`' job. The key maps are with the converters (``_from_<format>``).
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deeplab_lit.inference import InferenceConfig
from deeplab_lit.models.backbones import RESNET_STAGES
from deeplab_lit.models.deeplab import BUILDERS
from deeplab_lit.models.heads import separable_options
from deeplab_lit.normalization import CAFFE_BGR, IMAGENET, Normalization
from deeplab_lit.weights.download import cache_path, checksum_problem, download, expected_sha256, is_url
from deeplab_lit.weights.registry import WeightsEntry, class_version, close_names, find_weights, weights_file

FORMATS: tuple[str, ...] = ("deeplab_lit", "torchvision", "kazuto1011")
#: Architecture options a checkpoint can imply: the builders' parameters but the class count, in order.
OPTIONS: tuple[str, ...] = tuple(
    dict.fromkeys(name for build in BUILDERS.values() for name in inspect.signature(build).parameters)
)[1:]  # every builder's first parameter is num_classes
#: The config objects this project's checkpoints hold in their hyper-parameters: safe to unpickle.
_SAFE_CLASSES = (InferenceConfig, Normalization)
#: (blocks in layer1..4, has conv3) -> name, from the built-in ResNets' records.
_RESNET_DEPTHS: dict[tuple[int | bool, ...], str] = {
    (*layout.blocks, layout.bottleneck): name for name, layout in RESNET_STAGES.items()
}
#: torchvision's MobileNetV3-Large ``features``: 17 layers, the last a 1x1 conv from 160 to 960 channels.
_MOBILENET_V3_LARGE = (17, (960, 160, 1, 1))
#: State-dict prefix of a module's trained CRF (``SegmentationModule.crf_rnn``), kept apart from the network.
_CRF_RNN = "crf_rnn."
#: State-dict prefix of a module's loss (``SegmentationModule.criterion``: e.g. its class weights): training
#: state, not part of what the weights compute, so dropped when a checkpoint is read as weights.
_CRITERION = "criterion."
_KAZUTO_BLOCK = re.compile(r"^layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(.+)$")
_KAZUTO_PARTS = {
    ("reduce", "conv"): "conv1", ("reduce", "bn"): "bn1", ("conv3x3", "conv"): "conv2",
    ("conv3x3", "bn"): "bn2", ("increase", "conv"): "conv3", ("increase", "bn"): "bn3",
    ("shortcut", "conv"): "downsample.0", ("shortcut", "bn"): "downsample.1",
}  # fmt: skip


@dataclass
class Checkpoint:
    """A checkpoint read from disk (or a URL) and converted to ``Segmenter`` keys.

    Attributes:
        source: The path or URL it was read from.
        format: One of :data:`FORMATS`.
        description: Human-readable origin, e.g. ``"torchvision deeplabv3_resnet50"``.
        state: Tensors under ``Segmenter`` keys (no ``model.``/``segmenter.``/``base.`` prefix).
        version: DeepLab version it holds (``"v1"``, ``"v2"``, ``"v3"``, ``"v3+"``), None if unknown.
        options: Architecture options it implies (builder keyword arguments, see :data:`OPTIONS`).
        num_classes: Its class count, None if it holds no classifier.
        normalization: Input normalisation its weights expect, None if unknown.
        crf_rnn: A trained CRF after the network (this project's ``crf_rnn`` option): ``{"options": the
            module's crf_rnn mapping, "state": the layer's parameters}``; None if it has none.
    """

    source: str
    format: str
    description: str
    state: dict[str, Tensor]
    version: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    normalization: Normalization | None = None
    crf_rnn: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------- reading
class UnsafeCheckpointError(ValueError):
    """A file that only full unpickling could read: refused, because unpickling can run arbitrary code."""


def _convert_hint(path: Path) -> str:
    convert = (
        f"import torch; obj = torch.load({str(path)!r}, weights_only=False); "
        "obj = obj.state_dict() if hasattr(obj, 'state_dict') else obj.get('state_dict', obj); "
        "torch.save(obj, 'converted.pth')"
    )
    return (
        "If you trust the file, convert it once, on a machine where it is trusted, to a file of tensors "
        f'only: python -c "{convert}" and pass converted.pth instead (architecture options the file '
        "recorded are then taken from the model's arguments)."
    )


def refusal(path: Path, shown: str, err: pickle.UnpicklingError) -> ValueError:
    """Return the error for a file ``torch.load(weights_only=True)`` refused: objects, or an odd pickle."""
    text = str(err)  # torch's wording: an advice paragraph, the reason, a pointer to its documentation
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    skip = ("Weights only load failed", "Check the documentation")
    reason = next((p for p in paragraphs if not p.startswith(skip)), "refused by torch's safe loader")
    if named := re.search(r"GLOBAL ([\w.]+)", text):
        return UnsafeCheckpointError(
            f"Weights file {shown} holds Python objects other than tensors and plain containers (e.g. "
            f"{named.group(1)}). Reading them means unpickling, which can run arbitrary code, so the file is "
            f"not loaded. {_convert_hint(path)}"
        )
    return ValueError(
        f"Weights file {shown} could not be read without full unpickling ({reason}). It is truncated or "
        "corrupt, not a PyTorch checkpoint, or a pickle that only full unpickling reads, which can run "
        f"arbitrary code and is therefore never attempted. {_convert_hint(path)}"
    )


def read_weights_file(path: Path, shown: str | None = None) -> Any:
    """Read a ``torch.save`` file with ``torch.load(weights_only=True)``, or a ``.safetensors`` file.

    Nothing is ever fully unpickled: tensors, plain containers and the config objects this project's
    checkpoints hold (:class:`~deeplab_lit.inference.InferenceConfig`, :class:`Normalization`) are read;
    anything else is refused.

    Args:
        path: The local file.
        shown: How messages name it (default: the path).

    Raises:
        UnsafeCheckpointError: the file holds other Python objects (the message says how to convert it).
        ValueError: the file is truncated, corrupt or not a checkpoint.
    """
    shown = shown or repr(str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        # Only the classes not declared yet: leaving the context undeclares them, whoever declared them.
        declared = torch.serialization.get_safe_globals()
        with torch.serialization.safe_globals([c for c in _SAFE_CLASSES if c not in declared]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what torch.load(weights_only=True) refuses
        raise refusal(path, shown, err) from None
    except Exception as err:  # torch/zip/pickle/safetensors raise many types for a bad file
        raise _unreadable(shown, err) from err


def _unreadable(shown: str, err: BaseException) -> ValueError:
    return ValueError(
        f"Weights file {shown} could not be read: {err}. The file is truncated, corrupt or not a "
        "PyTorch checkpoint; download it again."
    )


def _read_url(url: str, sha256: str | None) -> tuple[Any, str]:
    """Read a URL's cached copy; one that cannot be read (an old partial download?) is fetched again once."""
    was_cached = cache_path(url).is_file()
    path = download(url, sha256=sha256)
    shown = f"{url!r} (cached as {str(path)!r})"
    try:
        return read_weights_file(path, shown), shown
    except UnsafeCheckpointError:
        raise
    except ValueError:
        if not was_cached or expected_sha256(url, sha256):  # fresh, or the right bytes: no use fetching
            raise
    warnings.warn(f"The cached copy {path} of {url} could not be read; downloading it again", stacklevel=3)
    return read_weights_file(download(url, sha256=sha256, refresh=True), shown), shown


def _unwrap(raw: Any, shown: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split a loaded object into (state dict, the rest of a Lightning-style checkpoint)."""
    extra: dict[str, Any] = {}
    if isinstance(raw, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(raw.get(key), Mapping):
                extra = {k: v for k, v in raw.items() if k != key}
                raw = raw[key]
                break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(
            f"Weights file {shown} does not hold a state dict ({{name: tensor}}); got {type(raw)}"
        )
    state = {str(k): v for k, v in raw.items()}
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, extra


def read_checkpoint(source: str | os.PathLike[str], *, sha256: str | None = None) -> Checkpoint:
    """Read a checkpoint of a supported format and convert its keys (see the module docstring).

    Files are read without unpickling arbitrary objects (see :func:`read_weights_file`).

    Args:
        source: A registered weights name (:mod:`deeplab_lit.weights.registry`: its file, downloaded once and
            checked against the entry, which completes the options, class count and normalisation), a
            local file (``.pth``/``.pt``/``.ckpt`` via ``torch.load``, or ``.safetensors``) or an
            ``http(s)://``/``file://``/``ftp://`` URL, downloaded once into torch's cache (see
            :mod:`deeplab_lit.weights.download`).
        sha256: The file's SHA-256 (or a prefix), checked if given; for URLs, a ``-<hex>`` prefix in the
            file name (torchvision's convention) is checked too. A registered name uses its entry's.

    Raises:
        FileNotFoundError: a local path that does not exist.
        UnsafeCheckpointError: a file that holds arbitrary Python objects (a ValueError).
        ValueError: an unreadable/corrupt file, a checksum mismatch, or keys of no supported format.
        RuntimeError: the download failed (offline and not cached).
    """
    text = os.fspath(source)
    entry = find_weights(text)
    if entry is not None:
        return _read_named(entry)
    shown = repr(text)
    if is_url(text):
        raw, shown = _read_url(text, sha256)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            close = close_names(text)
            hint = f" (nor a registered weights name; close: {', '.join(close)})" if close else ""
            raise FileNotFoundError(f"Weights file {text!r} does not exist{hint}")
        problem = checksum_problem(path, expected_sha256(text, sha256) if sha256 else None)
        if problem is not None:
            raise ValueError(f"Weights file {shown} fails its checksum: {problem}")
        raw = read_weights_file(path, shown)
    state, extra = _unwrap(raw, shown)
    for convert in (_from_torchvision, _from_kazuto, _from_deeplab_lit):
        checkpoint = convert(state, extra, text)
        if checkpoint is not None:
            return checkpoint
    hint = ""
    if "fc.weight" in state or "classifier.6.weight" in state:
        hint = " It looks like an ImageNet classification checkpoint: pass it as pretrained_backbone instead."
    raise ValueError(
        f"Weights file {shown} is of no supported format (this project's checkpoints, torchvision's "
        f"deeplabv3_resnet50/101 and deeplabv3_mobilenet_v3_large, "
        f"kazuto1011/deeplab-pytorch's DeepLab v1/v2 ResNet); its first keys are "
        f"{list(state)[:5]}.{hint}"
    )


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def entry_options(entry: WeightsEntry) -> dict[str, Any]:
    """The entry's architecture options, checked to be ones the builders know (:data:`OPTIONS`).

    Raises:
        ValueError: an option no builder takes (a typo would otherwise be ignored silently).
    """
    unknown = sorted(set(entry.options) - set(OPTIONS))
    if unknown:
        raise ValueError(
            f"Weights {entry.name!r} name unknown architecture options {unknown}; known: {', '.join(OPTIONS)}"
        )
    return dict(entry.options)


def _read_named(entry: WeightsEntry) -> Checkpoint:
    """Read a registered entry's file and check that it holds what the entry says; the entry completes it.

    The entry's architecture options, class count and normalisation are added to what the file's format
    implies (a plain state dict implies little); where both say something they must agree, else the file is
    not the one registered. The checkpoint's ``source`` is the name, which messages and ``weights:`` show.
    """
    options = entry_options(entry)
    checkpoint = read_checkpoint(weights_file(entry))
    version = class_version(entry.module_class)
    found = dict(checkpoint.options, version=checkpoint.version, num_classes=checkpoint.num_classes,
                 normalization=checkpoint.normalization)  # fmt: skip
    claimed = dict(options, version=version, num_classes=entry.num_classes,
                   normalization=entry.normalization)  # fmt: skip
    conflicts = [
        f"{key}={found[key]!r} (the entry says {value!r})"
        for key, value in claimed.items()
        if found.get(key) is not None and _as_tuple(found[key]) != _as_tuple(value)
    ]
    if conflicts:
        fix = (
            f"Delete it: the next load downloads {entry.url} again."
            if entry.url and is_url(entry.url)
            else f"Replace it with the published file. {entry.instructions}".strip()
        )
        raise ValueError(
            f"Weights {entry.name!r}: the file {checkpoint.source!r} ({checkpoint.description}) is not what "
            f"the entry describes: {'; '.join(conflicts)}. {fix}"
        )
    options.update(checkpoint.options)
    description = f"{checkpoint.description}, registered as {entry.name}"
    return replace(
        checkpoint, source=entry.name, description=description, version=version, options=options,
        num_classes=entry.num_classes, normalization=entry.normalization,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- formats
def _resnet_name(state: Mapping[str, Tensor], prefix: str = "backbone.") -> str | None:
    """ResNet depth from the block counts of a torchvision-layout state dict, None if not one we know."""
    counts = []
    for layer in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}layer{layer}\.(\d+)\.", k))}
        counts.append(len(blocks))
    return _RESNET_DEPTHS.get((*counts, f"{prefix}layer1.0.conv3.weight" in state))


def _torchvision_mobilenet(state: Mapping[str, Tensor], source: str) -> bool:
    """Whether the backbone keys are MobileNet ``features`` indices (``backbone.<i>.``); only V3-Large's pass.

    Raises:
        ValueError: indexed features of another network (MobileNetV3-Small, a narrower width).
    """
    indices = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.(\d+)\.", k))}
    if not indices:
        return False
    count, last = _MOBILENET_V3_LARGE
    found = state.get(f"backbone.{count - 1}.0.weight")
    if indices != set(range(count)) or found is None or tuple(found.shape) != last:
        raise ValueError(
            f"Weights file {source!r} is a torchvision DeepLabV3 whose backbone is not MobileNetV3-Large "
            f"({len(indices)} feature layers, last conv "
            f"{None if found is None else tuple(found.shape)}; MobileNetV3-Large has {count}, last conv "
            f"{last}); only deeplabv3_resnet50/101 and deeplabv3_mobilenet_v3_large are supported"
        )
    return True


def _from_torchvision(state: dict[str, Tensor], extra: dict[str, Any], source: str) -> Checkpoint | None:
    """Convert a torchvision DeepLabV3 state dict, None if ``state`` is not one.

    torchvision (``torchvision/models/segmentation/deeplabv3.py``: ``DeepLabV3(backbone, classifier,
    aux_classifier)``, ResNet with ``replace_stride_with_dilation=[False, True, True]``, ASPP rates
    12/24/36), checkpoint -> ``Segmenter``::

        backbone.<resnet key>            backbone.<resnet key>      (conv1, bn1, layer1..layer4)
        classifier.0.convs.* / .project  head.0.convs.* / .project  (ASPP)
        classifier.{1,2,4}               head.{1,2,4}               (3x3 conv, BN, 1x1 classifier)
        aux_classifier.{0,1,4}           aux_classifier.{0,1,4}     (FCN head on layer3)

    torchvision's MobileNetV3-Large (``_deeplabv3_mobilenetv3``: the ``features`` of
    ``mobilenet_v3_large(dilated=True)``, output stride 16, ASPP rates 12/24/36, FCN aux head on
    ``features.4``) keeps the head keys above; its backbone keys are the feature indices::

        backbone.<i>.*                   backbone.features.<i>.*    (i = 0..16)
    """
    if not any(k.startswith("classifier.") for k in state) or not any(
        k.startswith("backbone.") for k in state
    ):
        return None
    if "classifier.0.convs.0.0.weight" not in state:
        raise ValueError(
            f"Weights file {source!r} is a torchvision segmentation checkpoint but not DeepLabV3 (its "
            "classifier has no ASPP; FCN or LR-ASPP?); only deeplabv3_resnet50/101 and "
            "deeplabv3_mobilenet_v3_large are supported"
        )
    aux = any(k.startswith("aux_classifier.") for k in state)
    rename = {"classifier.": "head."}
    options: dict[str, Any]
    backbone: str | None
    if _torchvision_mobilenet(state, source):  # torchvision's _deeplabv3_mobilenetv3: the dilated features
        backbone, rename["backbone."] = "mobilenet_v3_large", "backbone.features."
        options = {"backbone": backbone, "output_stride": 16, "atrous_rates": (12, 24, 36),
                   "multi_grid": None, "aux_head": aux}  # fmt: skip
    else:
        backbone = _resnet_name(state)
        options = {"backbone": backbone, "style": "torchvision", "output_stride": 8,
                   "atrous_rates": (12, 24, 36), "multi_grid": None, "aux_head": aux}  # fmt: skip
    converted = {}
    for key, value in state.items():
        prefix = next((p for p in rename if key.startswith(p)), "")
        converted[rename[prefix] + key[len(prefix) :] if prefix else key] = value
    return Checkpoint(
        source, "torchvision", f"torchvision deeplabv3_{backbone}", converted, "v3", options,
        int(state["classifier.4.weight"].shape[0]), IMAGENET,
    )  # fmt: skip


def _kazuto_key(key: str) -> str | None:
    if key.startswith("layer1.conv1.conv."):
        return "backbone.conv1." + key[len("layer1.conv1.conv.") :]
    if key.startswith("layer1.conv1.bn."):
        return "backbone.bn1." + key[len("layer1.conv1.bn.") :]
    if match := _KAZUTO_BLOCK.match(key):
        layer, block, part, kind, rest = match.groups()
        return f"backbone.layer{int(layer) - 1}.{int(block) - 1}.{_KAZUTO_PARTS[part, kind]}.{rest}"
    if match := re.match(r"^aspp\.c(\d+)\.(.+)$", key):
        return f"head.convs.{match.group(1)}.{match.group(2)}"
    if key.startswith("fc."):
        return "head." + key[len("fc.") :]
    return None


def _from_kazuto(state: dict[str, Tensor], extra: dict[str, Any], source: str) -> Checkpoint | None:
    """Convert a kazuto1011/deeplab-pytorch state dict, None if ``state`` is not one.

    The v2 layout is that of the project's ``libs/models`` (``resnet.py``, ``deeplabv2.py``, ``msc.py``);
    the v1 file (``deeplabv1.py``) is assumed to hold the same body with a 1x1 ``fc`` classifier
    (``DeepLabV1``), or no classifier. ``_ConvBnReLU`` = ``conv`` + ``bn``; layer1 is the stem, layer2..5
    are ResNet stages 1..4. Checkpoint -> ``Segmenter`` (an ``MultiScaleSegmenter`` adds ``segmenter.``)::

        base.                            (MSC wrapper)  -> MSC scales (1.0, 0.75, 0.5)
        layer1.conv1.conv / .bn          backbone.conv1 / backbone.bn1
        layer{L}.block{B}.reduce.*       backbone.layer{L-1}.{B-1}.conv1 / bn1      (1x1, carries the stride)
        layer{L}.block{B}.conv3x3.*      backbone.layer{L-1}.{B-1}.conv2 / bn2      (3x3, dilated)
        layer{L}.block{B}.increase.*     backbone.layer{L-1}.{B-1}.conv3 / bn3
        layer{L}.block{B}.shortcut.*     backbone.layer{L-1}.{B-1}.downsample.0 / .1
        aspp.c{i}                        head.convs.{i}      (v2: 3x3 atrous conv with bias, rates 6/12/18/24)
        fc                               head                (v1: 1x1 classifier)
    """
    msc = all(k.startswith("base.") for k in state)
    if msc:
        state = {k[len("base.") :]: v for k, v in state.items()}
    if "layer1.conv1.conv.weight" not in state:
        return None
    converted: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        new = _kazuto_key(key)
        if new is None:
            unknown.append(key)
        else:
            converted[new] = value
    if unknown:
        raise ValueError(
            f"Weights file {source!r} looks like kazuto1011/deeplab-pytorch's but has unknown keys "
            f"{unknown[:5]}"
        )
    backbone = _resnet_name(converted)
    options: dict[str, Any] = {"backbone": backbone, "style": "caffe", "output_stride": 8}
    branches = sorted({int(k.split(".")[2]) for k in converted if k.startswith("head.convs.")})
    version: str | None
    if branches:
        version, classifier = "v2", "head.convs.0.weight"
        if len(branches) == 4:  # the released ASPP-L; other rates cannot be read from the tensors
            options["atrous_rates"] = (6, 12, 18, 24)
        if msc:  # kazuto1011's MSC wrapper; without it MSC is unknown (e.g. an initialisation file)
            options["msc_scales"] = (1.0, 0.75, 0.5)
    else:
        version, classifier = ("v1", "head.weight") if "head.weight" in converted else (None, "")
    num_classes = int(converted[classifier].shape[0]) if classifier else None
    description = f"kazuto1011/deeplab-pytorch DeepLab {version or ''} {backbone}{' MSC' if msc else ''}"
    return Checkpoint(source, "kazuto1011", " ".join(description.split()), converted, version, options,
                      num_classes, CAFFE_BGR)  # fmt: skip


def _version_from_keys(state: Mapping[str, Tensor]) -> str | None:
    """Return the DeepLab version a ``Segmenter`` state dict's head keys show (for files without hparams)."""
    if any(k.startswith("decoder.") for k in state):
        return "v3+"
    for version, keys in (("v3", ("head.0.convs.0.0.weight",)),
                          ("v2", ("head.convs.0.weight", "head.convs.0.fc6.weight")),
                          ("v1", ("head.weight", "head.fc6.weight"))):  # fmt: skip
        if any(k in state for k in keys):
            return version
    return None


def _as_normalization(value: Any) -> Normalization | None:
    if isinstance(value, Normalization):
        return value
    if isinstance(value, Mapping) and {"mean", "std"} <= set(value):
        return Normalization(tuple(value["mean"]), tuple(value["std"]), bool(value.get("bgr", False)))
    return None


def _from_deeplab_lit(state: dict[str, Tensor], extra: dict[str, Any], source: str) -> Checkpoint | None:
    """Read this project's checkpoint or state dict, None if ``state`` is not one.

    ``model.`` (the LightningModule's attribute) is dropped; ``segmenter.`` marks MSC.
    """
    crf_state = {k[len(_CRF_RNN) :]: v for k, v in state.items() if k.startswith(_CRF_RNN)}
    state = {k: v for k, v in state.items() if not k.startswith((_CRF_RNN, _CRITERION))}
    if all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    msc = all(k.startswith("segmenter.") for k in state)
    if msc:
        state = {k[len("segmenter.") :]: v for k, v in state.items()}
    if not any(k.startswith("backbone.") for k in state) or not any(k.startswith("head.") for k in state):
        return None
    hparams = dict(extra.get("hyper_parameters") or {})
    version = class_version(hparams.get("_class_path")) or _version_from_keys(state)
    options = {k: hparams[k] for k in OPTIONS if k in hparams}
    for key in ("atrous_rates", "multi_grid", "msc_scales"):
        if options.get(key) is not None:
            options[key] = tuple(options[key])
    layout = separable_options(state) if version == "v3+" and options else None
    if layout is not None:  # the keys tell: files written before separable_form lack the option
        options.pop("separable_form", None)
        options.update(layout)
    normalization = _as_normalization(extra.get("normalization"))
    if normalization is None:  # checkpoints written by LightningCLI record the data module's
        normalization = _as_normalization(
            (extra.get("datamodule_hyper_parameters") or {}).get("normalization")
        )
    num_classes = hparams.get("num_classes")
    name = f" {hparams['_class_path'].rsplit('.', 1)[-1]}" if hparams.get("_class_path") else ""
    name = name or (f" DeepLab {version}" if version else "")
    description = f"deeplab_lit{name} checkpoint" + (" (MSC)" if msc else "")
    crf_rnn = {"options": hparams.get("crf_rnn") or {}, "state": crf_state} if crf_state else None
    return Checkpoint(
        source, "deeplab_lit", description, state, version, options, num_classes, normalization, crf_rnn
    )
