"""Where a training checkpoint (``--ckpt_path``) and the user's options meet, for every subcommand.

- The **architecture** comes from the checkpoint: the version class and :data:`ARCHITECTURE` (backbone,
  output stride, ASPP rates, multi-grid, class count, ...). A user's architecture option that contradicts
  it is an error naming both values, judged as for ``weights:`` (:func:`resolve_options`).
- **Everything else** (TTA, sliding window, CRF, BatchNorm folding, compile, the training recipe) is the
  user's where the user set it, else the checkpoint's; ``weights`` and ``pretrained_backbone`` are ignored.
- A class path the checkpoint records is followed only into ``deeplab_lit``: importing another module runs
  its code, and a checkpoint is data. The user names any other class, else :class:`UntrustedClassPath`.

Command-line glue (jsonargparse namespaces, ``--ckpt_path`` words): LightningCLI's own merge puts the
checkpoint's hyper-parameters over the user's, so :class:`~deeplab_lit.cli.lightning_cli.DeepLabCLI` calls
:func:`reconcile_model` instead.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace

from deeplab_lit.classes import class_defaults, import_class
from deeplab_lit.errors import UserError, building
from deeplab_lit.weights.formats import OPTIONS, Checkpoint, refusal
from deeplab_lit.weights.load import resolve_options

#: Options that decide the network's structure; a checkpoint's values win, a contradiction is an error.
ARCHITECTURE: tuple[str, ...] = ("num_classes", *OPTIONS)
#: Options that would load other weights before the checkpoint's replace them: ignored with a checkpoint.
SUPERSEDED: dict[str, Any] = {"weights": None, "pretrained_backbone": False}
#: Keys Lightning and LightningCLI add to the saved hyper-parameters that are no ``__init__`` arguments.
_BOOKKEEPING = ("_class_path", "_instantiator")
#: The package whose classes a checkpoint may name; any other module is imported only when the user names it.
TRUSTED_PACKAGE = "deeplab_lit"
#: ``--ckpt_path`` values Lightning resolves itself rather than naming a file.
CKPT_PATH_WORDS = ("best", "hpc", "registry", "last")


class CheckpointError(UserError, ValueError):
    """A ``--ckpt_path`` file that cannot be used: unreadable, of another kind, or naming a refused class."""

    concerns = "--ckpt_path"


class NotATrainingCheckpoint(CheckpointError):
    """A readable file that is no Lightning checkpoint of this project (a state dict: use ``weights:``)."""


class UntrustedClassPath(CheckpointError):
    """A class path recorded in a checkpoint that lies outside :data:`TRUSTED_PACKAGE` and no user named."""


@dataclass
class TrainingCheckpoint:
    """The parts of a Lightning checkpoint written by this project that the command line needs.

    Attributes:
        path: The file.
        model_class: ``class_path`` of the LightningModule that wrote it (e.g. ``deeplab_lit.DeepLabV3``);
            None for a checkpoint written through the Python API, which does not record it.
        hparams: Its ``__init__`` arguments as saved (bookkeeping keys removed).
        data_class: ``class_path`` of the datamodule it was trained with, None if not recorded.
        data_hparams: That datamodule's ``__init__`` arguments.
    """

    path: Path
    model_class: str | None
    hparams: dict[str, Any]
    data_class: str | None = None
    data_hparams: dict[str, Any] = field(default_factory=dict)


def class_paths(value: Any) -> list[str]:
    """Return every ``class_path`` string inside ``value`` (nested mappings and lists), outermost first."""
    found: list[str] = []
    if isinstance(value, Mapping):
        if isinstance(value.get("class_path"), str):
            found.append(value["class_path"])
        for item in value.values():
            found += class_paths(item)
    elif isinstance(value, list | tuple):
        for item in value:
            found += class_paths(item)
    return found


def check_trusted(saved: TrainingCheckpoint, class_path: str | None, what: str, remedy: str) -> None:
    """Refuse a class path the checkpoint records outside :data:`TRUSTED_PACKAGE`, before anything imports it.

    Args:
        saved: The checkpoint that records it.
        class_path: The recorded class path (None: nothing to check).
        what: What it is for, e.g. ``"model"`` or ``"option loss of the model"``.
        remedy: The option with which a user who trusts the class names it, e.g. ``"--model mymod.MyNet"``.

    Raises:
        UntrustedClassPath: ``class_path`` lies outside the package.
    """
    if class_path is None or class_path.split(".", 1)[0] == TRUSTED_PACKAGE:
        return
    raise UntrustedClassPath(
        f"Checkpoint {str(saved.path)!r} names the class {class_path!r} for its {what}; classes a checkpoint "
        f"names are only imported from {TRUSTED_PACKAGE}, as importing another module runs its code. If you "
        f"trust that module, name the class yourself: {remedy}"
    )


def check_trusted_options(saved: TrainingCheckpoint, options: Mapping[str, Any], group: str) -> None:
    """Refuse every untrusted ``class_path`` in the ``group`` (``model``/``data``) options taken from it."""
    for name, value in options.items():
        for path in class_paths(value):
            remedy = f"--{group}.init_args.{name} (on the command line or in a config)"
            check_trusted(saved, path, f"{group} option {name}", remedy)


def read_training_checkpoint(path: str | Path) -> TrainingCheckpoint:
    """Read the hyper-parameters of a Lightning checkpoint of this project (tensors memory-mapped, not read).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is unreadable (:class:`NotATrainingCheckpoint`: no Lightning checkpoint of
            a ``deeplab_lit`` module, e.g. a plain or published state dict: the message says to use
            ``weights:``).
        UnsafeCheckpointError: it needs unsafe unpickling.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} (--ckpt_path) does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise refusal(path, repr(str(path)), err) from err
    except Exception as err:  # torch/zip raise many types for a truncated or foreign file
        raise CheckpointError(
            f"Checkpoint {str(path)!r} could not be read: {err}. The file is truncated, corrupt or not a "
            "PyTorch checkpoint."
        ) from err
    hparams = raw.get("hyper_parameters") if isinstance(raw, Mapping) else None
    if not isinstance(raw, Mapping) or "pytorch-lightning_version" not in raw or not hparams:
        raise NotATrainingCheckpoint(
            f"{str(path)!r} is not a training checkpoint of this project (no Lightning state or "
            "hyper-parameters): --ckpt_path takes the .ckpt files a deeplab_lit run writes. To start from "
            "plain or published weights (a state dict, torchvision's or kazuto1011's files), pass them as "
            f"--model.init_args.weights {path} (and --model.init_args.reinit_classifier true for another "
            "class count)."
        )
    hparams = dict(hparams)
    data = dict(raw.get("datamodule_hyper_parameters") or {})
    model_class = hparams.pop("_class_path", None)  # LightningCLI records it; Python-API runs do not
    return TrainingCheckpoint(
        path,
        model_class if isinstance(model_class, str) else None,
        {k: v for k, v in hparams.items() if k not in _BOOKKEEPING},
        data.pop("_class_path", None),
        {k: v for k, v in data.items() if k not in _BOOKKEEPING},
    )


def plain(value: Any) -> Any:
    """Return ``value`` as plain Python (dicts, lists, scalars): parsed namespaces and dataclasses alike."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """Compare option values as plain Python: a parsed ``{scales: [1.0]}`` equals ``InferenceConfig()``."""
    return bool(plain(a) == plain(b))


def reconcile_model(
    saved: TrainingCheckpoint, given_class: str | None, given: Mapping[str, Any]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Combine a checkpoint's hyper-parameters with the user's model options by the module docstring's rule.

    Args:
        saved: The checkpoint, from :func:`read_training_checkpoint`.
        given_class: The model ``class_path`` the user gave (None: take the checkpoint's).
        given: The user's model ``init_args`` (config and command line merged; unset ones at their default).

    Returns:
        ``(class_path, init_args, taken)``: the class to build, every init argument to build it with, and
        the options that were taken from the checkpoint instead of a default (for an info line).

    Raises:
        ValueError: another version class, or an architecture option that contradicts the checkpoint.
        UntrustedClassPath: the checkpoint names a class outside this package that the user did not name.
    """
    class_path = saved.model_class or given_class
    if class_path is None:
        raise CheckpointError(
            f"Checkpoint {str(saved.path)!r} does not record which module wrote it (it was written through "
            "the Python API, not the command line): name it with --model (e.g. --model "
            "deeplab_lit.DeepLabV3) or a --config whose model section is the one it was trained with."
        )
    if class_path != given_class:  # the user's own class is imported as the user named it
        check_trusted(saved, class_path, "model", f"--model {class_path} (or model.class_path in a config)")
    saved_class = import_class(class_path)
    if given_class is not None and import_class(given_class) is not saved_class:
        given_name = given_class.rsplit(".", 1)[-1]
        raise CheckpointError(
            f"Checkpoint {str(saved.path)!r} holds a {saved_class.__name__} but the model given is "
            f"{given_name} (model.class_path in the config or --model). The checkpoint decides the version: "
            f"drop the model option or give {saved_class.__name__}. To start a {given_name} from its "
            f"weights, use --model.init_args.weights {saved.path} with "
            "--model.init_args.reinit_classifier true instead of --ckpt_path."
        )
    defaults = class_defaults(saved_class)
    given = {k: v for k, v in given.items() if k in defaults}
    architecture = {k: saved.hparams[k] for k in ARCHITECTURE if k in saved.hparams}
    checkpoint = _as_checkpoint(saved, saved_class, architecture)
    # reinit_classifier is a weights: option; a checkpoint restores its own classifier, so it never applies.
    with building("--ckpt_path"):  # an architecture option that contradicts the checkpoint: the user's
        taken = resolve_options(checkpoint, {**defaults, **given, "reinit_classifier": False}, defaults)
    init_args = {**defaults, **saved.hparams, **taken}  # taken: also what the file implies, unrecorded
    for name, value in given.items():
        if name not in architecture and not _same(value, defaults.get(name)):
            init_args[name] = value  # the user's evaluation / recipe option wins over the saved one
    init_args.update(SUPERSEDED)
    check_trusted_options(saved, {k: v for k, v in init_args.items() if v is saved.hparams.get(k)}, "model")
    return f"{saved_class.__module__}.{saved_class.__name__}", init_args, taken


def _as_checkpoint(saved: TrainingCheckpoint, saved_class: type, architecture: dict[str, Any]) -> Checkpoint:
    """Return the checkpoint as :func:`resolve_options` takes it: its architecture options, no tensors."""
    name = saved_class.__name__  # the recorded class, or for a Python-API checkpoint the one given
    return Checkpoint(str(saved.path), "deeplab_lit", f"deeplab_lit {name} checkpoint", {},
                      options=architecture, num_classes=saved.hparams.get("num_classes"))  # fmt: skip
