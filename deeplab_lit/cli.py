"""Command line: ``python -m deeplab_lit {fit,validate,test,predict} --config experiments/X.yaml``.

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

``python -m deeplab_lit export --config X.yaml [--ckpt_path Y] --output model.onnx [--exporter torchscript]``
builds the config's model, loads ``--ckpt_path`` (this project's, torchvision's or kazuto1011's checkpoint;
without it, the config's ``model.init_args.weights``) and writes ONNX with dynamic batch, height and width
(:func:`deeplab_lit.export.export_onnx`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.layer_sync import LayerSync

from deeplab_lit.callbacks.prediction_writer import PredictionWriter
from deeplab_lit.callbacks.resume import BestAndLastCheckpoint
from deeplab_lit.data.datamodules import SegmentationDataModule
from deeplab_lit.export import EXPORTERS, export_onnx
from deeplab_lit.loggers import ConfigToLoggers
from deeplab_lit.models.weights import load_weights
from deeplab_lit.modules.base import SegmentationModule


def _is_layer_sync(plugin: Any) -> bool:
    """Whether a config entry of ``trainer.plugins`` names a LayerSync plugin (a BatchNorm conversion)."""
    class_path = plugin.get("class_path") if isinstance(plugin, Namespace) else None
    if not class_path:
        return isinstance(plugin, LayerSync)
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):  # jsonargparse reports a bad class_path itself
        return False
    return isinstance(cls, type) and issubclass(cls, LayerSync)


class DeepLabCLI(LightningCLI):
    """LightningCLI with the project's links and checkpoint defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data -> model arguments and add the always-on checkpoint callback."""
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.add_lightning_class_args(PredictionWriter, "prediction")
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

    def before_instantiate_classes(self) -> None:
        """Default ``checkpoint.dirpath`` and loggers' unset ``save_dir`` to ``trainer.default_root_dir``.

        With ``trainer.sync_batchnorm: true`` and no LayerSync plugin given, install
        :class:`~deeplab_lit.callbacks.SyncBatchNorm` (Lightning's default conversion drops the activation
        of timm's fused BatchNorm + ReLU layers, used by the Xception-65 backbone).
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.get("sync_batchnorm"):
            plugins = config.trainer.plugins
            listed = plugins if isinstance(plugins, list) else ([] if plugins is None else [plugins])
            if not any(_is_layer_sync(plugin) for plugin in listed):
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

    def before_predict(self) -> None:
        """Keep no logits in memory by default: the PredictionWriter writes every mask to disk."""
        if self.config_init["predict"].get("return_predictions") is None:
            self.config_init["predict"]["return_predictions"] = False


class ExportCLI(DeepLabCLI):
    """``python -m deeplab_lit export``: the config's model, optionally a checkpoint, written as ONNX."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add ``--ckpt_path``, ``--output``, ``--exporter`` and ``--opset`` to the training options."""
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Checkpoint to export")
        parser.add_argument("--output", type=str, default="model.onnx", help="ONNX file to write")
        parser.add_argument("--exporter", type=str, default="dynamo", help=f"One of {EXPORTERS}")
        parser.add_argument("--opset", type=int | None, default=None, help="ONNX opset (None: default)")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (the words after ``export``) alone, never mixed with ``sys.argv``."""
        self.config = parser.parse_args(args)

    def export(self) -> Path:
        """Load ``--ckpt_path`` into the model and write ``--output``; the path written."""
        module, config = self.model, self.config
        normalization = module.normalization
        if config.ckpt_path:
            info = load_weights(module.model, config.ckpt_path, num_classes=module.hparams.num_classes)
            normalization = info.normalization or normalization
        normalization = normalization or getattr(self.datamodule, "normalization", None)
        metadata = {
            "num_classes": str(module.hparams.num_classes),
            "class_names": json.dumps(module.class_names),
            "normalization": json.dumps(normalization.to_dict() if normalization else None),
            "source": str(config.ckpt_path or module.hparams.get("weights")),
        }
        path = export_onnx(module.model, config.output, exporter=config.exporter, opset=config.opset,
                           metadata=metadata)  # fmt: skip
        print(f"Wrote {path}: input 'image' (N, 3, H, W) normalised as {normalization}, output 'logits'")
        return path


def main(args: list[str] | None = None, run: bool = True) -> DeepLabCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); returns it so tests can inspect trainer and model."""
    words = sys.argv[1:] if args is None else list(args)
    if words[:1] == ["export"]:
        cli = ExportCLI(
            SegmentationModule,
            SegmentationDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=words[1:],
            run=False,
            save_config_callback=None,
        )
        if run:
            cli.export()
        return cli
    return DeepLabCLI(
        SegmentationModule,
        SegmentationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_callback=ConfigToLoggers,
        save_config_kwargs={"overwrite": True},
    )
