"""ImageNet initialisation of backbones, through torchvision's weights API (and timm's for Xception-65).

:func:`build_network` builds a DeepLab network and, as ``pretrained_backbone`` says, initialises it
(:func:`init_from_imagenet`: its backbone and, for VGG-16, the fc6/fc7 of every LargeFOV head from VGG's
fc layers, DeepLab v1 Sec. 3.1, reading the weights once): the only path by which ImageNet weights reach
a network, for the modules and the published models alike. What ``pretrained_backbone`` may name (True,
a weights name or a local file, for timm encoders too): :func:`load_imagenet_weights`.

Downloads are cached where torch caches weights (``torch.hub.get_dir()``; timm's under the Hugging Face
cache). Offline with nothing cached, a RuntimeError says so and how to pass a local file instead (for
timm's weights the only way: the Hugging Face cache is not a folder to copy a file into).
"""

from __future__ import annotations

import http.client
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from deeplab_lit.models.backbones import BACKBONES, ImageNetSource, backbone_family
from deeplab_lit.models.deeplab import MultiScaleSegmenter, Segmenter, builder_kwargs
from deeplab_lit.models.heads import LargeFOVHead
from deeplab_lit.models.timm_backbones import TimmBackbone, is_timm_name
from deeplab_lit.weights.download import offline_message
from deeplab_lit.weights.formats import read_weights_file, refusal
from deeplab_lit.weights.state_dicts import compare_state

_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def _download_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the download failed' (network, HTTP, missing cache entry)."""
    errors: list[type[BaseException]] = [OSError, http.client.HTTPException]
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover - httpx comes with huggingface_hub
        pass
    return tuple(errors)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a state dict from a ``torch.save`` or ``.safetensors`` file.

    A checkpoint dict holding the weights under ``"state_dict"`` or ``"model"`` is unwrapped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be read, holds no ``{name: tensor}`` mapping, or holds other Python
            objects (never unpickled, see :func:`~deeplab_lit.weights.formats.read_weights_file`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file {str(path)!r} does not exist")
    state = read_weights_file(path)  # never unpickles arbitrary objects
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"Weights file {str(path)!r} does not hold a state dict of tensors")
    return dict(state)


def _imagenet_source(name: str) -> ImageNetSource:
    family = backbone_family(name)
    if family is None:
        raise ValueError(f"No ImageNet weights for backbone {name!r}; expected one of {BACKBONES}")
    return family.imagenet


def _looks_like_path(source: str) -> bool:
    return os.sep in source or "/" in source or source.lower().endswith(_FILE_SUFFIXES)


def _offline_message(name: str, what: str, err: BaseException, file_name: str) -> str:
    """The shared offline message (:func:`~deeplab_lit.weights.download.offline_message`) for a backbone."""
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    instead = (
        f"pass the local file instead of True, e.g. pretrained_backbone='/path/to/{file_name}' "
        f"(source='/path/to/{file_name}' for load_imagenet_weights)"
    )
    what = f"the ImageNet weights for backbone {name!r} ({what})"
    return offline_message(what, err, cache, file_name, "that cache folder", instead)


def _timm_offline_message(name: str, origin: str, full_name: str, err: BaseException) -> str:
    """What to do when timm's weights ``full_name`` cannot be downloaded: fetch the file, pass its path.

    A file copied into a cache folder is not found: timm's weights come through the Hugging Face cache,
    whose files sit in revision folders it manages (``models--timm--<name>/snapshots/<commit>/``). A
    local path is what works (timm's ``pretrained_cfg_overlay={"file": ...}``).
    """
    import timm
    from huggingface_hub import hf_hub_url

    cfg = timm.models.get_pretrained_cfg(full_name)
    repo, url = (cfg.hf_hub_id, cfg.url) if cfg else (None, None)
    file_name = (cfg.hf_hub_filename if cfg else None) or "model.safetensors"
    where = f"timm's {full_name}"
    if repo:
        where = (
            f"{hf_hub_url(repo, file_name)}, or "  # the mirror of HF_ENDPOINT where one is set
            f"`hf download {repo} {file_name} --local-dir <folder>`"
        )
    elif isinstance(url, str) and url:  # timm types it str | (str, str)
        where, file_name = url, os.path.basename(url)
    return (
        f"Could not download the ImageNet weights for backbone {name!r} ({origin}): {err}. This machine may "
        f"be offline. Download the file on a machine with internet access ({where}), bring it here and pass "
        f"its path instead of True: pretrained_backbone='/path/to/{file_name}' (source='/path/to/"
        f"{file_name}' for load_imagenet_weights). Copying it into a cache folder does "
        "not work: timm's weights come via the Hugging Face cache, which keeps files in folders it manages."
    )


def _torchvision_state_dict(name: str, weights_name: str) -> dict[str, Tensor]:
    enum = torchvision.models.get_model_weights(name)
    if weights_name not in enum.__members__:
        raise ValueError(
            f"Unknown ImageNet weights {weights_name!r} for backbone {name!r}; expected one of "
            f"{tuple(enum.__members__)}, True, False, or the path of a local state-dict file"
        )
    weights = enum[weights_name]
    try:  # torch's cache is not re-checked on load: a file put there is read as safely as any other
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as err:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        raise refusal(cached, repr(str(cached)), err) from None
    except _download_errors() as err:
        file_name = os.path.basename(weights.url)
        raise RuntimeError(_offline_message(name, f"{weights} from {weights.url}", err, file_name)) from err


def _timm_state_dict(name: str, tag: str) -> dict[str, Tensor]:
    import timm

    known = timm.list_pretrained(f"{name}.*")
    if f"{name}.{tag}" not in known:
        tags = tuple(k.split(".", 1)[1] for k in known)
        raise ValueError(
            f"Unknown ImageNet weights {tag!r} for backbone {name!r}; expected one of {tags}, True, False, "
            "or the path of a local state-dict file"
        )
    try:
        return timm.create_model(f"{name}.{tag}", pretrained=True).state_dict()
    except _download_errors() as err:
        message = _timm_offline_message(name, f"timm {name}.{tag}", f"{name}.{tag}", err)
        raise RuntimeError(message) from err


def _timm_encoder_state_dict(
    backbone: nn.Module, name: str, source: bool | str | os.PathLike[str]
) -> tuple[dict[str, Tensor], str]:
    """ImageNet weights of a ``"timm:<model>"`` backbone, in its own key format, through timm's mechanism.

    timm builds the same ``features_only`` encoder with ``pretrained=True`` (the default weights, a tag of
    ``timm.list_pretrained("<model>.*")``, or a local file through ``pretrained_cfg_overlay={"file": ...}``,
    timm's documented way to load one): timm then adapts the checkpoint (its ``checkpoint_filter_fn``) and
    renames it for the feature wrapper, which a key map here would have to repeat for every family. A local
    file already in the backbone's format (``backbone.state_dict()``) is returned as it is.
    """
    import timm

    if not isinstance(backbone, TimmBackbone):
        raise TypeError(f"Backbone {name!r} must be a TimmBackbone, got {type(backbone).__name__}")
    model_name, overlay = backbone.model_name, {}
    if isinstance(source, os.PathLike) or (isinstance(source, str) and Path(source).is_file()):
        path = os.fspath(source)
        state, origin = read_state_dict(path), f"weights file {path!r}"
        if set(state) == set(backbone.state_dict()):
            return state, origin
        overlay, full_name = {"file": path}, model_name
    elif isinstance(source, str) and _looks_like_path(source):
        raise FileNotFoundError(f"ImageNet weights file {source!r} for backbone {name!r} does not exist")
    else:
        known = timm.list_pretrained(f"{model_name}.*")
        tags = tuple(k.split(".", 1)[1] for k in known)
        if not known:
            raise ValueError(
                f"timm has no pretrained weights for {model_name!r} (backbone {name!r}); pass "
                "pretrained_backbone=False or the path of a local weights file"
            )
        if source is not True and source not in tags:
            raise ValueError(
                f"Unknown ImageNet weights {source!r} for backbone {name!r}; expected one of {tags}, True, "
                "False, or the path of a local state-dict file"
            )
        default = timm.models.get_pretrained_cfg(model_name)  # what timm loads for pretrained=True
        tag = source if isinstance(source, str) else str(default.tag if default else tags[0])
        full_name = f"{model_name}.{tag}"
        origin = f"timm weights {full_name}"
    try:
        model = timm.create_model(
            full_name, pretrained=True, pretrained_cfg_overlay=overlay, **backbone.timm_kwargs
        )
    except _download_errors() as err:
        raise RuntimeError(_timm_offline_message(name, origin, full_name, err)) from err
    except (RuntimeError, KeyError) as err:  # load_state_dict, or timm's filter_fn: weights of another model
        why = f"{type(err).__name__}: {str(err)[:500]}"
        raise ValueError(f"{origin} does not match timm's {model_name} ({why})") from None
    return {f"body.{key}": value for key, value in model.state_dict().items()}, origin


def imagenet_state_dict(name: str, source: bool | str | os.PathLike[str]) -> tuple[dict[str, Tensor], str]:
    """Fetch an ImageNet classification state dict (classifier included) for backbone ``name``.

    Args:
        name: Backbone name (``"resnet50"``, ``"vgg16"``, ... ``"xception65"``).
        source: True (default weights), a weights name, or a local file path (see
            :func:`load_imagenet_weights`).

    Returns:
        The state dict in the library's key format (torchvision or timm) and a description of its origin.

    Raises:
        ValueError: unknown backbone or weights name; unreadable file.
        FileNotFoundError: ``source`` looks like a path but no such file exists.
        RuntimeError: the download failed (offline and not cached).
    """
    source_of = _imagenet_source(name)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and Path(source).is_file()):
        return read_state_dict(source), f"weights file {os.fspath(source)!r}"
    if isinstance(source, str) and _looks_like_path(source):
        raise FileNotFoundError(f"ImageNet weights file {source!r} for backbone {name!r} does not exist")
    if source is True:
        source = source_of.default
    if not isinstance(source, str):
        raise TypeError(f"pretrained must be a bool, a weights name or a file path, got {source!r}")
    if source_of.library == "timm":
        return _timm_state_dict(name, source), f"timm weights {name}.{source}"
    return _torchvision_state_dict(name, source), f"torchvision weights {name} {source}"


def load_imagenet_weights(
    backbone: nn.Module, name: str, source: bool | str | os.PathLike[str]
) -> dict[str, Tensor]:
    """Load ImageNet weights into a backbone built by :func:`~deeplab_lit.models.backbones.build_backbone`.

    The classifier keys of the ImageNet checkpoint (``fc.*``, ``classifier.*``, ...) are dropped and the
    rest must match the backbone's state dict exactly (``strict=True``).

    ``source`` chooses the weights:

    - ``True``: the default ImageNet weights (its backbone family's ``imagenet.default``). For torchvision
      backbones this is ``IMAGENET1K_V1``, the classic weights torchvision's own DeepLabV3/FCN models were
      trained from; pass ``"IMAGENET1K_V2"`` for the newer recipe where torchvision has one (ResNet-50/101,
      MobileNetV2/V3). For vgg16, ``"IMAGENET1K_FEATURES"`` are the original Caffe VGG weights (expect
      0-255 inputs with the mean subtracted, and hold no usable fc layers). For xception65 the default is
      timm's ``ra3_in1k``; ``"tf_in1k"`` is the TensorFlow port. timm's Xception weights expect inputs
      scaled with mean = std = 0.5.
    - for a timm encoder (``"timm:<model>"``, :mod:`~deeplab_lit.models.timm_backbones`): True is timm's
      default weights of that model (``timm.models.get_pretrained_cfg("<model>").tag``), a string a tag of
      ``timm.list_pretrained("<model>.*")`` (``"fb_in22k"``) or a local file in timm's format (timm's
      ``model.safetensors``) or the backbone's; timm loads them (:func:`_timm_encoder_state_dict`).
    - a string: a weights name of that backbone (as above) or the path of a local state-dict file
      (``.pth``/``.pt`` via ``torch.load``, or ``.safetensors``) in torchvision's/timm's key format
      (classifier keys may be present; they are dropped) or in the backbone's own format
      (``backbone.state_dict()``).

    Args:
        backbone: The backbone to initialise in place.
        name: Its name (``backbone.name``).
        source: False (do nothing), True, a weights name, or a local file path.

    Returns:
        The ImageNet state dict as read, classifier included (VGG-16's fc layers initialise LargeFOV
        heads, see :func:`init_from_imagenet`); empty when ``source`` is False.

    Raises:
        ValueError: the weights do not fit the backbone (first missing/unexpected keys are named), or
            an unknown weights name / unreadable file.
        FileNotFoundError: a local path that does not exist.
        RuntimeError: the download failed (offline and nothing cached); the message says how to proceed.
    """
    if source is False or source is None:
        return {}
    if is_timm_name(name):
        read, origin = _timm_encoder_state_dict(backbone, name, source)
        keys = ImageNetSource("timm", "", ())  # already in the backbone's own keys
    else:
        read, origin = imagenet_state_dict(name, source)
        keys = _imagenet_source(name)
    state, expected = dict(read), backbone.state_dict()
    if set(state) != set(expected):  # torchvision/timm format: drop the classifier, add the body prefix
        state = {keys.prefix + k: v for k, v in state.items() if not k.startswith(keys.dropped)}
    report = compare_state(expected, state)
    if report.missing or report.unexpected:
        missing, unexpected = report.missing, report.unexpected
        raise ValueError(
            f"{origin} does not match the {name} backbone: {len(missing)} missing keys "
            f"(first: {missing[:5]}), {len(unexpected)} unexpected keys (first: {unexpected[:5]})"
        )
    if report.wrong_shapes:
        wrong = report.shapes(expected)
        raise ValueError(f"{origin} does not match the {name} backbone: wrong shapes (first: {wrong[:5]})")
    backbone.load_state_dict(report.state, strict=True)
    return read


# ------------------------------------------------------------------------------- VGG-16 fc6/fc7 -> LargeFOV
def _fc6_taps(rate: int) -> list[int]:
    """Return the indices of the 7x7 fc6 kernel that a 3x3 kernel at ``rate`` samples (DeepLab v1 Sec. 3.1).

    VGG's fc6 sees pool5 at stride 32; DeepLab's pool5 is at stride 8, so the original taps are 4 pixels
    apart and the 3x3 taps at offsets ``-rate, 0, rate`` fall on original taps ``3 -/+ rate / 4`` (nearest,
    clamped to the kernel): 0, 3, 6 for LargeFOV's rate 12, which spans the same 25 pixels as 7x7 at 4.
    """
    offset = round(rate / 4)
    return [max(0, 3 - offset), 3, min(6, 3 + offset)]


@torch.no_grad()
def init_largefov_from_vgg(model: nn.Module, vgg_state: Mapping[str, Tensor]) -> int:
    """Initialise fc6/fc7 of every LargeFOV head in ``model`` from VGG-16's ImageNet fc layers, subsampled.

    As DeepLab-LargeFOV (v1 Sec. 3.1, 4.1): fc6 (4096 x 512x7x7) keeps every 4th filter (4096 -> 1024) and
    the 3x3 kernel taps of :func:`_fc6_taps`; fc7 (4096 x 4096) keeps every 4th row and column. Applies to
    v1's head and to each branch of the v2 VGG-16 ASPP (each at its own rate).

    Args:
        model: A model holding :class:`~deeplab_lit.models.heads.LargeFOVHead` modules (changed in place).
        vgg_state: torchvision ``vgg16`` state dict: ``classifier.0.*`` (fc6) and ``classifier.3.*`` (fc7).

    Returns:
        The number of heads initialised (0 when the state dict has no finite fc weights, e.g. torchvision's
        ``IMAGENET1K_FEATURES``, whose fc layers are not usable: fc6/fc7 then keep their random init).
    """
    keys = ("classifier.0.weight", "classifier.0.bias", "classifier.3.weight", "classifier.3.bias")
    if not all(k in vgg_state for k in keys) or not all(torch.isfinite(vgg_state[k]).all() for k in keys):
        return 0
    fc6_w, fc6_b, fc7_w, fc7_b = (vgg_state[k].float() for k in keys)
    count = 0
    for head in (m for m in model.modules() if isinstance(m, LargeFOVHead)):
        fc6, fc7 = head.fc6, head.fc7
        assert fc6.bias is not None and fc7.bias is not None  # LargeFOVHead builds them with biases
        if fc6.in_channels * 49 != fc6_w.shape[1] or fc6_w.shape[0] % fc6.out_channels:
            raise ValueError(
                f"fc6 of shape {tuple(fc6.weight.shape)} cannot be taken from VGG fc6 {tuple(fc6_w.shape)}"
            )
        step = fc6_w.shape[0] // fc6.out_channels
        taps = _fc6_taps(fc6.dilation[0])
        kernel = fc6_w.view(fc6_w.shape[0], fc6.in_channels, 7, 7)[::step][:, :, taps][:, :, :, taps]
        fc6.weight.copy_(kernel)
        fc6.bias.copy_(fc6_b[::step])
        fc7.weight.copy_(fc7_w[::step, ::step].reshape(fc7.weight.shape))
        fc7.bias.copy_(fc7_b[::step])
        count += 1
    return count


def init_from_imagenet(model: Segmenter | MultiScaleSegmenter, source: bool | str | os.PathLike[str]) -> None:
    """Initialise a built DeepLab network from ImageNet weights, as named by ``pretrained_backbone``.

    The backbone (``model.backbone``) gets the ImageNet weights (:func:`load_imagenet_weights`); with a
    VGG-16 backbone, every LargeFOV head (v1's head, each branch of v2's VGG-16 ASPP) also gets fc6/fc7
    from VGG's fc layers (:func:`init_largefov_from_vgg`), from the same read of the file. The builders
    call it through :func:`build_network`, once every option has been checked.

    Args:
        model: A ``Segmenter`` or ``MultiScaleSegmenter``; changed in place.
        source: False (do nothing), True, a weights name, or a local file path.

    Raises:
        See :func:`load_imagenet_weights`.
    """
    backbone = model.backbone
    state = load_imagenet_weights(backbone, backbone.name, source)
    family = backbone_family(backbone.name)
    if family is not None and family.largefov_head:
        init_largefov_from_vgg(model, state)


def build_network(builder: Callable[..., nn.Module], options: Mapping[str, Any]) -> nn.Module:
    """Build ``builder``'s network from stored ``options``, its backbone from ImageNet if they say so.

    The one path by which ``pretrained_backbone`` reaches a network (a module's ``build_model``, the
    published-model builder): the builders in :mod:`deeplab_lit.models` build randomly initialised
    networks and read no file. ``options`` may hold more than ``builder`` takes (see
    :func:`~deeplab_lit.models.deeplab.builder_kwargs`).
    """
    model = builder(**builder_kwargs(builder, options))
    source = options.get("pretrained_backbone", False)
    if source is not False and source is not None:
        if not isinstance(model, Segmenter | MultiScaleSegmenter):
            raise TypeError(
                f"pretrained_backbone needs a Segmenter or MultiScaleSegmenter, got {type(model)}"
            )
        init_from_imagenet(model, source)
    return model
