"""Command line: ``deeplab-lit {fit,validate,test,predict} --config experiments/X.yaml``.

LightningCLI in subclass mode: ``model.class_path`` picks the DeepLab version, ``data.class_path`` the
data set, and every ``__init__`` argument is a config key (``--print_config`` shows them all). The
data set's class count and class names are linked into the model, so a config states them once.
A checkpoint callback keeping the best ``val/mIoU`` and the newest state (``last.ckpt``, refreshed at
every validation: :class:`~deeplab_lit.callbacks.resume.BestAndLastCheckpoint`) is always present
(``checkpoint.*`` options); checkpoints land in ``<trainer.default_root_dir>/checkpoints/`` (one fixed
folder per experiment, so ``--ckpt_path last`` finds the previous run's ``last.ckpt``; loggers give every
run a new version folder). The resolved config goes to ``config.yaml`` and to every logger.

``predict`` writes a palette PNG and an overlay per image through the always-present
:class:`~deeplab_lit.callbacks.PredictionWriter` (``prediction.*`` options, e.g.
``--prediction.output_dir out/``); logits are not also kept in memory unless ``--return_predictions true``.

``deeplab-lit export --config X.yaml [--ckpt_path Y] --output model.onnx [--exporter torchscript]``
builds the config's model, loads ``--ckpt_path`` (this project's, torchvision's or kazuto1011's checkpoint;
without it, the config's ``model.init_args.weights``) and writes ONNX with dynamic batch, height and width
(:func:`deeplab_lit.export.export_onnx`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _InstantiatorFn
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.utilities import rank_zero_info

from deeplab_lit import DESCRIPTION, PROG
from deeplab_lit.callbacks.guards import NonFiniteLossGuard
from deeplab_lit.callbacks.interrupt import InterruptCheckpoint
from deeplab_lit.callbacks.prediction_writer import PredictionWriter
from deeplab_lit.callbacks.resume import BestAndLastCheckpoint
from deeplab_lit.callbacks.summary import RunSummary
from deeplab_lit.classes import class_defaults, import_class
from deeplab_lit.data.datamodules import SegmentationDataModule
from deeplab_lit.errors import UserError, building, find_in_chain, root_cause
from deeplab_lit.export import EXPORTERS, export_onnx
from deeplab_lit.loggers import ConfigToLoggers
from deeplab_lit.models.weights import load_weights
from deeplab_lit.modules.base import SegmentationModule
from deeplab_lit.modules.restore import (
    NotATrainingCheckpoint,
    TrainingCheckpoint,
    check_trusted,
    check_trusted_options,
    plain,
    read_training_checkpoint,
    reconcile_model,
)
from deeplab_lit.normalization import Normalization
from deeplab_lit.paths import check_writable


def _names(entry: Any, base: type) -> bool:
    """Whether a config entry (of ``trainer.plugins``, ``trainer.callbacks``) is or names a ``base``."""
    class_path = entry.get("class_path") if isinstance(entry, Namespace) else None
    if not class_path:
        return isinstance(entry, base)
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):  # jsonargparse reports a bad class_path itself
        return False
    return isinstance(cls, type) and issubclass(cls, base)


def _listed(value: Any) -> list[Any]:
    """A config's ``trainer.plugins``/``trainer.callbacks`` value as a list (one entry, or None: [])."""
    return value if isinstance(value, list) else ([] if value is None else [value])


def add_safeguards(trainer: Namespace) -> None:
    """Add what every run of the CLI has, where the config lacks it (never a second one).

    :class:`~deeplab_lit.callbacks.NonFiniteLossGuard` (a NaN/inf loss stops the run before a checkpoint
    holds it) and :class:`~deeplab_lit.callbacks.AtomicCheckpointIO` (atomic writes, and the safe reader
    for every checkpoint Lightning reads, ``--ckpt_path hpc`` and SLURM's auto-resume included), unless
    the config names one of that class or, for the plugin, another ``CheckpointIO``.
    """
    callbacks = _listed(trainer.callbacks)
    if not any(_names(entry, NonFiniteLossGuard) for entry in callbacks):
        guard = Namespace(class_path="deeplab_lit.callbacks.NonFiniteLossGuard", init_args=Namespace())
        trainer.callbacks = [*callbacks, guard]
    plugins = _listed(trainer.plugins)
    if not any(_names(entry, CheckpointIO) for entry in plugins):
        atomic = Namespace(class_path="deeplab_lit.callbacks.AtomicCheckpointIO", init_args=Namespace())
        trainer.plugins = [*plugins, atomic]


# --------------------------------------------------------------------------------- errors of the user's
class BuildingInstantiator:
    """Build a model or datamodule so that a bad option is the user's error, naming the group and class.

    A ``ValueError``/``TypeError`` raised while the class is built from the user's options becomes
    :class:`~deeplab_lit.errors.InvalidOptions` (``concerns``: e.g. ``model (deeplab_lit.DeepLabV3Plus)``).
    """

    def __init__(self, key: str, inner: Callable[..., Any] | None = None) -> None:
        self.key = key
        self.inner = inner

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict[str, Any],
                 **kwargs: Any) -> Any:  # fmt: skip
        """Called by jsonargparse (the parameter name ``applied_instantiation_links`` is its protocol)."""
        with building(f"{self.key} ({class_type.__module__}.{class_type.__qualname__})"):
            if self.inner is None:
                return class_type(*args, **kwargs)
            return self.inner(class_type, *args, applied_instantiation_links=applied_instantiation_links,
                              **kwargs)  # fmt: skip


@contextmanager
def user_errors_unwrapped() -> Iterator[None]:
    """Re-raise a :class:`~deeplab_lit.errors.UserError` from inside jsonargparse's union error as itself.

    jsonargparse wraps what a class raises while it is built into "Does not validate against any of the
    Union subtypes ... Given value: <every option>"; the user's error is the one that matters.
    """
    try:
        yield
    except ValueError as err:
        found = find_in_chain(err, UserError)
        if found is None or found is err:
            raise
        raise found from found.__cause__


#: The word jsonargparse's "not accepted" errors quote the unknown option with.
_UNKNOWN_OPTION = re.compile(r"[Oo]ption '([^']+)'")


def _option_names(parser: argparse.ArgumentParser) -> set[str]:
    """Every option name of ``parser`` and its subcommands, without dashes (e.g. ``trainer.max_epochs``).

    Reads argparse's ``_actions`` (private by convention, unchanged since Python 3.2: it has no public list).
    """
    names: set[str] = set()
    for action in parser._actions:
        names.update(option.lstrip("-") for option in action.option_strings if option.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                names |= _option_names(subparser)
    return names


def _init_arg_names(base: type) -> set[str]:
    """The ``__init__`` argument names of ``base`` and of every subclass imported so far."""
    names: set[str] = set()
    todo = [base]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        names |= set(class_defaults(cls))
    return names


def closest_options(name: str, parser: argparse.ArgumentParser, init_arg: bool = False) -> list[str]:
    """The valid option names closest to a mistyped ``name`` (difflib), best first; may be empty.

    ``name`` is compared with the parser's options, or with ``init_arg`` (jsonargparse names a model's or
    data module's ``init_args`` option without its group) the ``__init__`` arguments of the project's
    modules and datamodules.
    """
    if init_arg:
        candidates = _init_arg_names(LightningModule) | _init_arg_names(LightningDataModule)
    else:
        candidates = _option_names(parser)
    return difflib.get_close_matches(name, sorted(candidates), n=3)


class DeepLabArgumentParser(LightningArgumentParser):
    """The CLI's parser: an unknown option is reported as jsonargparse's root message and the closest names.

    jsonargparse reports ``--model.init_args.output_strid 12`` as its union dump around "Option
    'output_strid' is not accepted"; here the usage line, that message and "closest: output_stride".
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Print usage and the error (jsonargparse's behaviour), the root message of an unknown option."""
        root = root_cause(ex) if ex is not None else None
        if isinstance(root, KeyError) and root.args:  # jsonargparse's NSKeyError: an unknown option
            message = str(root.args[0])
            unknown = _UNKNOWN_OPTION.search(message)
            name = unknown.group(1) if unknown else ""
            close = closest_options(name, self, init_arg="." not in name) if name else []
            if close:
                message += f" (closest valid: {', '.join(close)})"
        elif message.startswith("unrecognized arguments:"):
            given = message.split(":", 1)[1].split()
            names = [w.split("=")[0][2:] for w in given if w.startswith("--")]
            close = [c for name in names for c in closest_options(name, self)]
            if close:
                message += f" (closest valid: {', '.join(close)})"
        super().error(message, ex)


class ClassCountMismatch(UserError, ValueError):
    """The class count of the data differs from the one the user gave or the checkpoint holds."""


class DeepLabCLI(LightningCLI):
    """LightningCLI with the project's links and checkpoint defaults."""

    def _add_instantiators(self) -> None:
        """Build model and data through :class:`BuildingInstantiator` around Lightning's own instantiators.

        Overrides a private LightningCLI method and uses its private ``_InstantiatorFn`` (which saves the
        class path in the hyper-parameters): there is no public way to wrap an instantiator. Checked on
        lightning 2.6; pyproject.toml bounds lightning below 2.7.
        """
        for key, base in (("model", self._model_class), ("data", self._datamodule_class)):
            inner = _InstantiatorFn(cli=self, key=key)
            self.parser.add_instantiator(BuildingInstantiator(key, inner), base, subclasses=True)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data -> model arguments and add the always-on checkpoint callback."""
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction")
        parser.add_lightning_class_args(InterruptCheckpoint, "interrupt")  # signals -> last.ckpt
        parser.add_lightning_class_args(RunSummary, "summary")  # best mIoU, files, next commands at the end
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/mIoU",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "epoch{epoch:03d}-mIoU{val/mIoU:.4f}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.init_args.class_names", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args``; with a checkpoint and no config, take model and data classes from the checkpoint.

        ``predict --ckpt_path best.ckpt --data.init_args.predict_path photos/`` then needs no config: the
        model and the datamodule it was trained with (class and options, data root not read) come from
        the file, and the options on the command line are applied over them. Then ``--ckpt_path``'s
        hyper-parameters are reconciled with the user's (:meth:`reconcile_checkpoint`).
        """
        self.config = parser.parse_args(with_checkpoint_classes(list(args)))
        subcommand = self.config.get("subcommand")
        model = (self.config[subcommand] if subcommand else self.config).get("model")
        # the user's class count (config or command line), before --ckpt_path's fills it in
        self._user_num_classes = model.init_args.get("num_classes") if model is not None else None
        self.reconcile_checkpoint(parser)

    def reconcile_checkpoint(self, parser: LightningArgumentParser) -> None:
        """Take the architecture from ``--ckpt_path`` and the rest from the user (:mod:`.modules.restore`).

        A checkpoint's class or architecture that contradicts the user's is an error naming both.
        """
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        path = _checkpoint_file(config) if config is not None else None
        if config is None or path is None:
            return
        saved = read_training_checkpoint(path)
        model = config.get("model")
        given_class = model.get("class_path") if model is not None else None
        given = plain(model.get("init_args")) if model is not None else {}
        class_path, init_args, taken = reconcile_model(saved, given_class, given or {})
        if taken:
            rank_zero_info(f"Options taken from the checkpoint {path}: {taken}")
        self._checkpoint = saved
        update = {"model": {"class_path": class_path, "init_args": init_args}}
        self.config = parser.parse_object({subcommand: update}, self.config)

    def _parse_ckpt_path(self) -> None:
        """Do nothing: :meth:`reconcile_checkpoint` has combined the checkpoint's options with the user's.

        Overrides a private LightningCLI method (lightning >= 2.5 calls it from ``LightningCLI.__init__``
        after parsing; 2.4 has none) because it merges the checkpoint's hyper-parameters over the user's:
        an evaluation option given on the command line did nothing, and another model class silently
        evaluated the checkpoint's. Checked on lightning 2.6.0 and 2.6.6 (the floor and the newest), hence
        the upper bound in pyproject.toml: a release that renames it would merge again
        (tests/modules/test_restore.py fails).
        """

    def before_instantiate_classes(self) -> None:
        """Default ``checkpoint.dirpath`` and loggers' unset ``save_dir`` to ``trainer.default_root_dir``.

        With ``trainer.sync_batchnorm: true`` and no LayerSync plugin given, install
        :class:`~deeplab_lit.callbacks.SyncBatchNorm` (Lightning's default conversion drops the activation
        of timm's fused BatchNorm + ReLU layers, used by the Xception-65 backbone). Remember the class
        count the user gave, to check it against the data's once both exist.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        add_safeguards(config.trainer)
        if config.trainer.get("sync_batchnorm"):
            plugins = config.trainer.plugins
            listed = plugins if isinstance(plugins, list) else ([] if plugins is None else [plugins])
            if not any(_names(plugin, LayerSync) for plugin in listed):
                listed.append(
                    Namespace(class_path="deeplab_lit.callbacks.SyncBatchNorm", init_args=Namespace())
                )
                config.trainer.plugins = listed
        root = config.trainer.default_root_dir or os.getcwd()
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(root, "checkpoints")
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and "save_dir" in init_args and init_args.save_dir is None:
                init_args.save_dir = root
        self._given_num_classes = self._user_num_classes

    def instantiate_classes(self) -> None:
        """Instantiate, then check the class count: data, command line and checkpoint must agree.

        Each message names where its two counts came from: the user's option, the checkpoint, the data.
        """
        with user_errors_unwrapped():
            super().instantiate_classes()
        data_classes = getattr(self.datamodule, "num_classes", None)
        if data_classes is None:
            return
        default = class_defaults(type(self.model)).get("num_classes")
        given = self._given_num_classes
        if given is not None and given != default and given != data_classes:
            raise ClassCountMismatch(
                f"model.init_args.num_classes={given} was given but the data module "
                f"{type(self.datamodule).__name__} has {data_classes} classes "
                f"({self.datamodule.class_names}); the class count comes from the data: drop the option, "
                "or use data with that many classes (the option was set in a config or on the command line)"
            )
        if given is not None and given == default != data_classes:  # left at its default: said, not silent
            data = type(self.datamodule).__name__
            rank_zero_info(
                f"num_classes: {data_classes}, the classes of the data module {data}, replaces the model's "
                f"default {default} (the class count comes from the data)"
            )
        saved = getattr(self, "_checkpoint", None)
        saved_classes = saved.hparams.get("num_classes") if saved is not None else None
        if saved is not None and saved_classes is not None and saved_classes != data_classes:
            raise ClassCountMismatch(
                f"Checkpoint {saved.path} has {saved_classes} classes but the data module "
                f"{type(self.datamodule).__name__} has {data_classes}. --ckpt_path restores a run as it was; "
                f"to fine-tune on these {data_classes} classes, start from its weights instead: "
                f"--model.init_args.weights {saved.path} --model.init_args.reinit_classifier true"
            )

    def before_fit(self) -> None:
        """Check that the checkpoint folder and the loggers' folders can be written, before training."""
        config = self.config[self.subcommand]
        check_writable(config.checkpoint.dirpath, "checkpoints", "--checkpoint.dirpath")
        for logger in self.trainer.loggers:
            save_dir = getattr(logger, "save_dir", None)
            if save_dir:
                check_writable(save_dir, f"the {type(logger).__name__} files", "the logger's save_dir")

    def before_predict(self) -> None:
        """Check the output folder; keep no logits in memory by default (the writer writes every mask)."""
        output = self.config[self.subcommand].prediction.output_dir
        check_writable(output, "predicted masks", "--prediction.output_dir")
        if self.config_init["predict"].get("return_predictions") is None:
            self.config_init["predict"]["return_predictions"] = False


#: ``--ckpt_path`` values Lightning resolves itself rather than naming a file.
CKPT_PATH_WORDS = ("best", "hpc", "registry", "last")


def _checkpoint_file(config: Namespace) -> Path | None:
    """Return the file ``ckpt_path`` names (``last``: the newest ``last*.ckpt`` of the run), else None."""
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        root = config.trainer.get("default_root_dir") or os.getcwd()
        folder = config.get("checkpoint", Namespace()).get("dirpath") or os.path.join(root, "checkpoints")
        found = sorted(Path(folder).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
        return found[-1] if found else None  # the newest, as Lightning resolves "last"
    if ckpt_path in CKPT_PATH_WORDS:
        return None
    return Path(ckpt_path)


def _split_words(words: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Split ``words`` into ``(--option, value)`` pairs (value None for a bare flag) and positionals."""
    options: list[tuple[str, str | None]] = []
    positionals: list[str] = []
    index = 0
    while index < len(words):
        word = words[index]
        if word.startswith("--") and "=" in word:
            name, value = word.split("=", 1)
            options.append((name, value))
        elif word.startswith("-"):
            has_value = index + 1 < len(words) and not words[index + 1].startswith("--")
            options.append((word, words[index + 1] if has_value else None))
            index += has_value
        else:
            positionals.append(word)
        index += 1
    return options, positionals


def _option_value(words: list[str], name: str) -> str | None:
    """Return the value of ``--name X`` or ``--name=X`` in ``words`` (the last one), None if absent."""
    return dict(_split_words(words)[0]).get(f"--{name}")


def _gives(words: list[str], group: str) -> bool:
    return any(w == f"--{group}" or w.startswith((f"--{group}=", f"--{group}.class_path")) for w in words)


def with_checkpoint_classes(words: list[str]) -> list[str]:
    """Insert the checkpoint's model and data classes when a subcommand has ``--ckpt_path`` and no config.

    Only when neither ``--config`` nor the group itself (``--model``/``--data``) is given; the user's
    words follow the inserted ones, so they still override. Without a config the checkpoint is read here,
    so that a missing, unreadable or foreign file is reported as such (not as "model is required"); a
    class it names outside ``deeplab_lit`` is refused (:func:`~deeplab_lit.modules.restore.check_trusted`).
    """
    subcommand = next((i for i, w in enumerate(words) if not w.startswith("-")), None)
    if subcommand is None:
        return words
    rest = words[subcommand + 1 :]
    ckpt_path = _option_value(rest, "ckpt_path")
    if not ckpt_path or ckpt_path in CKPT_PATH_WORDS or _option_value(rest, "config") or "-c" in rest:
        return words
    saved = read_training_checkpoint(ckpt_path)
    inserted = []
    if not _gives(rest, "model"):
        if saved.model_class is None:
            reconcile_model(saved, None, {})  # raises: the checkpoint does not say which class; name it
        check_trusted(saved, saved.model_class, "model", f"--model {saved.model_class}")
        inserted.append(f"--model={saved.model_class}")
    if not _gives(rest, "data") and saved.data_class:
        check_trusted(saved, saved.data_class, "datamodule", f"--data {saved.data_class} (or a --config)")
        check_trusted_options(saved, saved.data_hparams, "data")
        data = {"class_path": saved.data_class, "init_args": plain(saved.data_hparams)}
        inserted.append(f"--data={json.dumps(data)}")
    return [*words[: subcommand + 1], *inserted, *rest]


# ------------------------------------------------------------------------------------ predict by name
PREDICT_DESCRIPTION = (
    "Segment images: a palette PNG and an overlay per image (--prediction.output_dir). With published "
    "weights and no config: predict --weights NAME photos/ --output masks/ (--list-weights names them; "
    "any option below still applies, e.g. --model.init_args.inference.flip true). From a run: "
    "predict --ckpt_path best.ckpt --data.init_args.predict_path photos/."
)


def with_named_weights(words: list[str]) -> list[str] | None:
    """Rewrite ``predict --weights NAME PATH [--output DIR]`` into the LightningCLI's own options.

    The model class, its architecture, class names and normalisation come from the registry entry
    (:mod:`deeplab_lit.models.registry`); the images from ``PATH`` (a file, folder or glob); the masks go
    to ``--output`` (default ``predictions``), with the run's ``config.yaml``; no logger. Other options
    are passed on after these, so they override. ``--list-weights`` prints the registered names and
    returns None. Words without ``--weights`` are returned unchanged.
    """
    from deeplab_lit.models import registry

    options, positionals = _split_words(words[1:])
    names = [name for name, _ in options]
    if "--list-weights" in names:
        print(registry.describe_weights())
        return None
    if "--weights" not in names:
        return words
    given = dict(options)
    name = given["--weights"]
    if not name:
        raise SystemExit(f"predict --weights needs a name, one of: {', '.join(registry.list_weights())}")
    if len(positionals) != 1:
        raise SystemExit(
            f"predict --weights {name} needs exactly one image file, folder or glob after the options "
            f"(e.g. photos/), got {positionals or 'none'}"
        )
    if "--ckpt_path" in given or "--config" in given or "-c" in given:
        raise SystemExit("predict --weights takes the model from the registry: drop --ckpt_path/--config")
    try:
        entry = registry.get_weights(name)
    except registry.UnknownWeightsError as err:
        raise SystemExit(str(err)) from None
    if entry.data_class is None:
        raise SystemExit(
            f"{name} predicts {entry.num_classes} classes that no data module names ({entry.data}): it is "
            f"published to start training from; fine-tune it with model.init_args.weights: {name}"
        )
    model = {"class_path": entry.module_class, "init_args": entry.module_options()}
    # root: the data set's folder, which the data modules require and predict never reads
    normalization = entry.normalization.to_dict()
    data_options = {"root": ".", "predict_path": positionals[0], "normalization": normalization}
    data = {"class_path": entry.data_class, "init_args": data_options}
    rest = [word for option, value in options if option not in ("--weights", "--output")
            for word in ((option,) if value is None else (f"{option}={value}",))]  # fmt: skip
    output = given.get("--output") or "predictions"
    return [
        "predict",
        f"--model={json.dumps(model)}",
        f"--data={json.dumps(data)}",
        "--trainer.logger=false",
        f"--trainer.default_root_dir={output}",  # the run's config.yaml goes beside the masks
        f"--prediction.output_dir={output}",
        *rest,
    ]


# ------------------------------------------------------------------------------------------------ export
def _training_checkpoint_or_none(path: str) -> TrainingCheckpoint | None:
    """Return the training checkpoint at ``path``, or None when it is a plain/published weights file."""
    try:
        return read_training_checkpoint(path)
    except NotATrainingCheckpoint:
        return None


def _export_parser() -> ArgumentParser:
    """Build ``export``'s own parser: the model (from a checkpoint or a config) and the export options.

    Training configs are accepted with ``--config`` (their ``model`` section is used; ``data``,
    ``trainer`` and the rest are read and ignored), so no data set and no trainer are built.
    """
    parser = DeepLabArgumentParser(
        prog=f"{PROG} export",
        description="Write a DeepLab network as ONNX (dynamic batch, height, width), checked in onnxruntime.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A training config (its model section)")
    parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint of a deeplab_lit run")
    parser.add_argument("--output", type=str, default="model.onnx", help="ONNX file to write")
    parser.add_argument("--exporter", type=str, default="dynamo", help=f"One of {EXPORTERS}")
    parser.add_argument("--opset", type=int | None, default=None, help="ONNX opset (None: default)")
    parser.add_subclass_arguments(SegmentationModule, "model", required=False, fail_untyped=False)
    parser.add_instantiator(BuildingInstantiator("model"), SegmentationModule, subclasses=True)
    for ignored in ("data", "trainer", "checkpoint", "prediction", "seed_everything"):
        parser.add_argument(f"--{ignored}", type=Any, default=None, help=argparse.SUPPRESS)
    return parser


def _configured_normalization(data: Any) -> Normalization | None:
    """Return the normalisation a config's data section sets (or its class's default), building nothing."""
    if not isinstance(data, dict | Namespace) or not data.get("class_path"):
        return None
    value = plain(data.get("init_args") or {}).get("normalization")
    if value is None:
        value = class_defaults(import_class(data["class_path"])).get("normalization")
    return value if isinstance(value, Normalization) else Normalization(**value) if value else None


def export(words: list[str]) -> Path:
    """``deeplab-lit export``: build the network, load ``--ckpt_path``, write ``--output``."""
    parser = _export_parser()
    config = parser.parse_args(words)
    check_writable(config.output, "the ONNX file", "--output", is_file=True)
    if config.exporter not in EXPORTERS:
        parser.error(f"--exporter must be one of {EXPORTERS}, got {config.exporter!r}")
    model = config.get("model")
    saved = _training_checkpoint_or_none(config.ckpt_path) if config.ckpt_path else None
    if saved is not None:
        given_class = model.class_path if model is not None else None
        given = plain(model.init_args) if model is not None else {}
        class_path, init_args, _ = reconcile_model(saved, given_class, given)
        config = parser.parse_object({"model": {"class_path": class_path, "init_args": init_args}}, config)
    elif model is None:
        parser.error(
            "export needs a model: --ckpt_path of a deeplab_lit run, or a --config (or --model) whose model "
            "the file named by --ckpt_path fits (published and plain state dicts)"
        )
    with user_errors_unwrapped():
        module = parser.instantiate_classes(config).model
    normalization = module.normalization
    if config.ckpt_path:
        with building("--ckpt_path"):  # a file that does not fit the model: the user's choice of file
            info = load_weights(module.model, config.ckpt_path, num_classes=module.hparams.num_classes)
        normalization = info.normalization or normalization
    normalization = normalization or _configured_normalization(config.get("data"))
    metadata = {
        "num_classes": str(module.hparams.num_classes),
        "class_names": json.dumps(module.class_names),
        "normalization": json.dumps(normalization.to_dict() if normalization else None),
        "source": str(config.ckpt_path or module.hparams.get("weights")),
    }
    path = export_onnx(module.model, config.output, exporter=config.exporter, opset=config.opset,
                       metadata=metadata)  # fmt: skip
    print(f"Wrote {path}: input 'image' (N, 3, H, W) normalised as {normalization}, output 'logits'")
    if module.crf_rnn is not None:
        print(
            "Note: the file holds the network alone, without its trained CRF (crf_rnn): ONNX has no sparse "
            "lattice filtering. Its logits are the network's (val/mIoU, not val/mIoU_crf_rnn); the CRF's "
            "parameters stay in the checkpoint (deeplab_lit.crf.CRFasRNN applies them)."
        )
    return path


def main(args: list[str] | None = None, run: bool = True) -> DeepLabCLI | Path | None:
    """Run the CLI (``args=None`` reads ``sys.argv``); returns it so tests can inspect trainer and model.

    ``export`` returns the ONNX file's path (``run=False``: None). ``predict --weights NAME photos/`` is
    rewritten into the LightningCLI's own options (:func:`with_named_weights`).

    The optimiser is the module's own (the papers' SGD with momentum, a higher learning rate for the head
    and the per-iteration poly schedule; ``model.init_args.lr`` etc.): LightningCLI's ``--optimizer`` and
    ``--lr_scheduler`` would replace it without the head's learning-rate group, so they are not offered.
    """
    words = sys.argv[1:] if args is None else list(args)
    if words[:1] == ["export"]:
        return export(words[1:]) if run else None
    if words[:1] == ["predict"]:
        rewritten = with_named_weights(words)
        if rewritten is None:  # --list-weights
            return None
        words = rewritten
    return DeepLabCLI(
        SegmentationModule,
        SegmentationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_class=DeepLabArgumentParser,
        args=words,
        run=run,
        save_config_callback=ConfigToLoggers,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs={
            "prog": PROG,
            "description": DESCRIPTION,
            "predict": {"description": PREDICT_DESCRIPTION},
        },
    )
