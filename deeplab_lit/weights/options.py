"""Where the options a checkpoint implies meet the options given: one function, one error per mismatch.

:func:`resolve_options` is called by the LightningModules before they build their network (``weights:``)
and by the command line for ``--ckpt_path``: the DeepLab version first, then each architecture option
(:data:`~deeplab_lit.weights.formats.OPTIONS`), then the class count. An option left at its
default takes the checkpoint's value; one set otherwise is an error naming both values.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deeplab_lit.models.backbone_base import resolve_multi_grid
from deeplab_lit.models.backbones import backbone_family, layer4_blocks
from deeplab_lit.weights.formats import Checkpoint
from deeplab_lit.weights.registry import VERSION_CLASSES, class_version

__all__ = ["module_version", "resolve_options"]

#: Options that identify a backbone's weights rather than how the network uses them: kept across versions.
_BACKBONE_OPTIONS = ("backbone", "style")


def module_version(model: str | type | None) -> str | None:
    """Return the DeepLab version a module class, class path or version string stands for.

    ``DeepLabV2``, ``"deeplab_lit.DeepLabV2"`` and ``"v2"`` all give ``"v2"``; a subclass gives its DeepLab
    base class's version; anything else gives None.
    """
    if model is None:
        return None
    if isinstance(model, type):
        return next((v for cls in model.__mro__ if (v := class_version(cls.__name__))), None)
    return model if model in VERSION_CLASSES else class_version(model)


def _plain(name: str, value: Any, backbone: str | None) -> Any:
    """Return ``value`` in a form equal for equivalent options (lists as tuples, multi-grid as built)."""
    blocks = layer4_blocks(backbone) if backbone is not None else None
    if name == "multi_grid" and value is not None and blocks is not None:
        try:
            return resolve_multi_grid(str(backbone), value, blocks)
        except ValueError:
            pass
    return tuple(value) if isinstance(value, list | tuple) else value


def resolve_options(
    checkpoint: Checkpoint,
    given: Mapping[str, Any],
    defaults: Mapping[str, Any],
    *,
    version: str | type | None = None,
) -> dict[str, Any]:
    """Reconcile what a checkpoint implies with the options given: the one place where they meet.

    Used by the LightningModules before they build their network (``weights:``) and by the command line
    for ``--ckpt_path``. In order:

    1. Version: if ``version`` (the module being built) differs from the checkpoint's, raise one error
       naming both versions and the file, and the class that fits it; suggest ``reinit_classifier: true``
       where that works (a DeepLab v1/v2 ResNet, whose head is only classifiers, starting from another
       version's backbone). With ``reinit_classifier`` set across versions only the options that identify
       the backbone's weights (``backbone``, ``style``) are reconciled.
    2. Architecture options (:data:`~deeplab_lit.weights.formats.OPTIONS`, and ``num_classes`` if
       ``checkpoint.options`` holds it): one left at its default (``defaults``) takes the checkpoint's
       value; one set to another value is a conflict. Options the module does not have (not in ``given``)
       are left to :func:`~deeplab_lit.weights.load.load_weights`' check.
    3. Class count: a ``given["num_classes"]`` other than the checkpoint's is a conflict unless
       ``given["reinit_classifier"]`` is true.

    Args:
        checkpoint: What the file implies (``options``, ``version``, ``num_classes``; tensors not needed).
        given: The module's options as they stand (every ``__init__`` argument, defaults included);
            ``reinit_classifier`` is read from here.
        defaults: The ``__init__`` defaults, to tell "left alone" from "set".
        version: The module being built: ``"v2"``, a class such as ``DeepLabV2``, or a class path; None
            skips the version check.

    Returns:
        The options to change, ``{name: checkpoint value}`` (tuples as lists, as hyper-parameters hold them).

    Raises:
        ValueError: another version, or options set to values the checkpoint does not allow (each
            conflicting option is named with both values; a class-count conflict names both counts and the
            ``weights:`` + ``reinit_classifier: true`` route).
    """
    reinit = bool(given.get("reinit_classifier"))
    target = module_version(version)
    across = False  # another version's checkpoint, allowed by reinit_classifier (else _check_version raises)
    if target is not None and checkpoint.version not in (None, target):
        _check_version(checkpoint, given, defaults, target, reinit)
        across = True
    backbone = checkpoint.options.get("backbone") or given.get("backbone")
    changes, conflicts = {}, []
    for name, value in _with_separable_form(checkpoint.options).items():
        if name == "num_classes" or (across and name not in _BACKBONE_OPTIONS):
            continue
        if name not in given or _plain(name, given[name], backbone) == _plain(name, value, backbone):
            continue
        if name in defaults and _plain(name, given[name], None) == _plain(name, defaults[name], None):
            changes[name] = list(value) if isinstance(value, tuple) else value
        else:
            conflicts.append(f"{name}={given[name]!r} (the checkpoint needs {value!r})")
    classes = None if reinit else _resolve_num_classes(checkpoint, given, defaults, changes)
    if conflicts or classes:
        raise ValueError(_conflict_message(checkpoint, conflicts, classes))
    return changes


def _with_separable_form(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` with ``separable_form`` only where it matters (``separable=True``), and known there.

    Checkpoints written before ``separable_form`` existed record ``separable`` alone, and their one form
    was ``"deeplab"``; the checkpoint reader also reads the form from the keys where it has them.
    """
    options = dict(options)
    if not options.get("separable"):
        options.pop("separable_form", None)
    else:
        options.setdefault("separable_form", "deeplab")
    return options


def _resolve_num_classes(
    checkpoint: Checkpoint, given: Mapping[str, Any], defaults: Mapping[str, Any], changes: dict[str, Any]
) -> str | None:
    """Adopt the checkpoint's class count where ``options`` holds it and it was left alone; else compare."""
    theirs = checkpoint.options.get("num_classes", checkpoint.num_classes)
    ours = given.get("num_classes")
    if theirs is None or ours is None or ours == theirs:
        return None
    if "num_classes" in checkpoint.options and ours == defaults.get("num_classes"):
        changes["num_classes"] = theirs
        return None
    return f"num_classes={ours!r} (the checkpoint has {theirs} classes)"


def _conflict_message(checkpoint: Checkpoint, conflicts: list[str], classes: str | None) -> str:
    text = (
        f"Weights {checkpoint.source!r} ({checkpoint.description}) conflict with the options given: "
        f"{'; '.join([*conflicts, *([classes] if classes else [])])}."
    )
    if conflicts:
        text += (
            " Leave these options unset (they are taken from the checkpoint) or set them to what it needs."
        )
    if classes:
        text += (
            f" To train for another class count from these weights, start from them with "
            f"model.init_args.weights: {checkpoint.source} and model.init_args.reinit_classifier: true, "
            "which loads everything except the classifier layers."
        )
    return text


def _check_version(
    checkpoint: Checkpoint, given: Mapping[str, Any], defaults: Mapping[str, Any], target: str, reinit: bool
) -> None:
    """Raise unless ``reinit_classifier`` lets a DeepLab ``target`` start from the checkpoint's backbone."""
    backbone = given.get("backbone")
    if backbone is None or backbone == defaults.get("backbone"):
        backbone = checkpoint.options.get("backbone", backbone)
    family = backbone_family(str(backbone))
    largefov = family is not None and family.largefov_head
    head_is_classifiers = target in ("v1", "v2") and not largefov  # see load.classifier_keys
    if reinit and head_is_classifiers:
        return
    fits = VERSION_CLASSES[str(checkpoint.version)]
    text = (
        f"Weights {checkpoint.source!r} ({checkpoint.description}) hold DeepLab {checkpoint.version} but the "
        f"model is DeepLab {target} ({VERSION_CLASSES[target]}). To use them as they are, build a {fits} "
        f"(model.class_path: deeplab_lit.{fits})"
    )
    if head_is_classifiers:
        text += (
            f"; to start this DeepLab {target} from their backbone instead (its head then trains from "
            "scratch), add reinit_classifier: true (model.init_args.reinit_classifier)"
        )
    elif reinit:
        text += (
            f". reinit_classifier cannot bridge the two: a DeepLab {target} head with backbone {backbone} "
            "has layers besides its classifiers, which the file does not hold"
        )
    raise ValueError(text + ".")
