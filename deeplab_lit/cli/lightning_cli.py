"""The LightningCLI of fit, validate, test and predict: links, defaults, safeguards, ``--ckpt_path``.

Subclass mode: ``model.class_path`` picks the DeepLab version, ``data.class_path`` the data set, and every
``__init__`` argument is a config key (``--print_config`` shows them); the data's class count and names
are linked into the model. Every run has a checkpoint callback keeping the best ``val/mIoU`` and
``last.ckpt`` (``checkpoint.*``, in ``<trainer.default_root_dir>/checkpoints/``: one folder per
experiment, so ``--ckpt_path last`` finds the previous run's), the prediction writer (``prediction.*``;
no logits kept in memory unless ``--return_predictions true``), the signal checkpoint, the end-of-fit
summary and the safeguards of :func:`add_safeguards`. The resolved config goes to every logger. A
``--ckpt_path`` checkpoint's options meet the user's in :mod:`deeplab_lit.cli.restore`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
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
from deeplab_lit.cli.parser import BuildingInstantiator, DeepLabArgumentParser, user_errors_unwrapped
from deeplab_lit.cli.restore import CKPT_PATH_WORDS, plain, read_training_checkpoint, reconcile_model
from deeplab_lit.cli.words import with_checkpoint_classes
from deeplab_lit.data.datamodules import SegmentationDataModule
from deeplab_lit.errors import UserError
from deeplab_lit.loggers import ConfigToLoggers
from deeplab_lit.modules.base import SegmentationModule
from deeplab_lit.paths import check_writable


def _names(entry: Any, base: type) -> bool:
    """Whether a config entry (of ``trainer.plugins``, ``trainer.callbacks``) is or names a ``base``."""
    class_path = entry.get("class_path") if isinstance(entry, Namespace) else None
    if not class_path:
        return isinstance(entry, base)
    try:
        cls = import_class(class_path)
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
        """Take the architecture from ``--ckpt_path`` and the rest from the user (:func:`reconcile_model`).

        A checkpoint's class or architecture that contradicts the user's is an error naming both
        (the rule: :mod:`deeplab_lit.cli.restore`).
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
        (tests/cli/test_restore.py fails).
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
            listed = _listed(config.trainer.plugins)
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


PREDICT_DESCRIPTION = (
    "Segment images: a palette PNG and an overlay per image (--prediction.output_dir). With published "
    "weights and no config: predict --weights NAME photos/ --output masks/ (--list-weights names them; "
    "any option below still applies, e.g. --model.init_args.inference.flip true). From a run: "
    "predict --ckpt_path best.ckpt --data.init_args.predict_path photos/."
)


def build_cli(words: list[str], run: bool = True) -> DeepLabCLI:
    """Parse ``words`` (a subcommand and its options), build model, data and trainer, and run (``run``).

    The optimiser is the module's own (the papers' SGD with momentum, a higher learning rate for the head
    and the per-iteration poly schedule; ``model.init_args.lr`` etc.): LightningCLI's ``--optimizer`` and
    ``--lr_scheduler`` would replace it without the head's learning-rate group, so they are not offered.
    """
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
