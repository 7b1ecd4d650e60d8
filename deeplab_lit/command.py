"""The ``deeplab-lit`` console command (and ``python -m deeplab_lit``): a light front door.

``deeplab-lit``, ``deeplab-lit --help`` and ``deeplab-lit --version`` are answered here without importing
Lightning (seconds on a small machine); every subcommand goes to :func:`deeplab_lit.cli.main`, which builds
the LightningCLI (``fit``/``validate``/``test``/``predict``) or the ``export`` parser.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "deeplab-lit"
DESCRIPTION = (
    "DeepLab v1, v2, v3 and v3+ for semantic segmentation, in PyTorch Lightning: train, evaluate (with the "
    "dense CRF), segment photos and export, from YAML configs or published weights."
)
SUBCOMMANDS = {
    "fit": "train a model (e.g. --config experiments/quickstart.yaml; --ckpt_path last resumes)",
    "validate": "evaluate on the validation split (mIoU; before/after the CRF with DenseCRFCallback)",
    "test": "evaluate on the test split",
    "predict": "segment images: --weights NAME photos/ --output masks/, or --ckpt_path X "
    "--data.init_args.predict_path photos/",
    "export": "write ONNX from a checkpoint or published weights (--ckpt_path X --output model.onnx)",
}
EXAMPLES = """examples:
  deeplab-lit fit --config experiments/quickstart.yaml
  deeplab-lit predict --weights deeplabv3_resnet101.coco_voc photos/ --output masks/
  deeplab-lit predict --list-weights
  deeplab-lit validate --ckpt_path lightning_logs/quickstart/checkpoints/last.ckpt
  deeplab-lit fit --help          (every option of a subcommand; --print_config shows a config)
"""


def version() -> str:
    """Return the installed package's version."""
    from deeplab_lit import __version__

    return __version__


def front_parser() -> argparse.ArgumentParser:
    """The top-level parser: program name, description, subcommands (each with its own ``--help``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    subparsers = parser.add_subparsers(title="subcommands", dest="subcommand", metavar="SUBCOMMAND")
    for name, summary in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=summary, add_help=False)
    return parser


def main(args: Sequence[str] | None = None) -> int:
    """Run ``deeplab-lit``: help and version here, subcommands in :func:`deeplab_lit.cli.main`.

    Returns the exit status 0 (errors exit through ``SystemExit`` or an exception): the console script
    passes the return value to ``sys.exit``, where anything else would print it and exit with status 1.
    """
    words = list(sys.argv[1:] if args is None else args)
    if not words or words[0] in ("-h", "--help", "--version"):
        parser = front_parser()
        if not words:
            parser.print_help()
            return 0
        parser.parse_args(words)  # prints and exits
    from deeplab_lit.cli import main as run_cli

    run_cli(words)
    return 0
