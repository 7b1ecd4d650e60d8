"""Command line: ``python -m deeplab_lit {fit,validate,test,predict} --config experiments/X.yaml``.

LightningCLI in subclass mode: ``model.class_path`` picks the DeepLab version, ``data.class_path`` the
data set, and every ``__init__`` argument is a config key (``--print_config`` shows them all). The
data set's class count and class names are linked into the model, so a config states them once.
A checkpoint callback keeping the best ``val/mIoU`` and the last epoch is always present
(``checkpoint.*`` options); checkpoints land in ``<log_dir>/checkpoints/``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from deeplab_lit.data.datamodules import SegmentationDataModule
from deeplab_lit.modules.base import SegmentationModule


class DeepLabCLI(LightningCLI):
    """LightningCLI with the project's links and checkpoint defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link data -> model arguments and add the always-on checkpoint callback."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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


def main(args: list[str] | None = None, run: bool = True) -> DeepLabCLI:
    """Run the CLI (``args=None`` reads ``sys.argv``); returns it so tests can inspect trainer and model."""
    return DeepLabCLI(
        SegmentationModule,
        SegmentationDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )
