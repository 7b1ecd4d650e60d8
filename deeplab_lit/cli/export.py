"""``deeplab-lit export``: a checkpoint's or a config's network, written as ONNX and checked in onnxruntime.

``deeplab-lit export --config X.yaml [--ckpt_path Y] --output model.onnx [--exporter torchscript]`` builds
the model (from a training checkpoint, or the config's ``model`` section, which a plain or published
weights file at ``--ckpt_path`` fills; without one, its ``model.init_args.weights``) and writes ONNX with
dynamic batch, height and width through :func:`deeplab_lit.export.export_onnx`. It has a parser of its
own: no data set and no trainer are built.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from deeplab_lit import PROG
from deeplab_lit.classes import class_defaults, import_class
from deeplab_lit.cli.parser import BuildingInstantiator, DeepLabArgumentParser, user_errors_unwrapped
from deeplab_lit.cli.restore import (
    NotATrainingCheckpoint,
    TrainingCheckpoint,
    plain,
    read_training_checkpoint,
    reconcile_model,
)
from deeplab_lit.errors import building
from deeplab_lit.export import EXPORTERS, export_onnx
from deeplab_lit.modules.base import SegmentationModule
from deeplab_lit.normalization import Normalization
from deeplab_lit.paths import check_writable
from deeplab_lit.weights.load import load_weights


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
