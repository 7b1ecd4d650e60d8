"""The ``deeplab-lit`` console command (and ``python -m deeplab_lit``): a light front door.

``deeplab-lit``, ``deeplab-lit --help`` and ``deeplab-lit --version`` are answered here without importing
Lightning; every subcommand goes to :func:`deeplab_lit.cli.main`, which builds the LightningCLI
(``fit``/``validate``/``test``/``predict``) or the ``export`` parser. ``deeplab_lit.cli`` is imported only
then (to defer Lightning), and never imports this module: the names both show come from :mod:`deeplab_lit`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from deeplab_lit import DESCRIPTION, PROG, __version__

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


def front_parser() -> argparse.ArgumentParser:
    """The top-level parser: program name, description, subcommands (each with its own ``--help``)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(title="subcommands", dest="subcommand", metavar="SUBCOMMAND")
    for name, summary in SUBCOMMANDS.items():
        subparsers.add_parser(name, help=summary, add_help=False)
    return parser


#: Set to 1 to see the full traceback of every error, the user's included.
DEBUG_VARIABLE = "DEEPLAB_LIT_DEBUG"


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's error (see :mod:`deeplab_lit.errors` for the rule).

    Imported here, when an error is being reported, because some modules that define them import Lightning.
    """
    from deeplab_lit.callbacks.resume import CheckpointWriteError
    from deeplab_lit.data.preflight import PreflightError
    from deeplab_lit.errors import PATH_ERRORS, UserError
    from deeplab_lit.weights.formats import UnsafeCheckpointError
    from deeplab_lit.weights.registry import UnknownWeightsError

    project = (PreflightError, UnsafeCheckpointError, UnknownWeightsError, CheckpointWriteError)
    return (UserError, *PATH_ERRORS, *project)


def user_message(err: BaseException) -> str | None:
    """The one-line report of a user's error (what it concerns, then its own message); None for a bug."""
    if not isinstance(err, user_error_types()):
        return None
    if isinstance(err, KeyError) and err.args:  # str() of a KeyError is its repr
        return str(err.args[0])
    concerns = getattr(err, "concerns", "")
    return f"{concerns}: {err}" if concerns else str(err)


def main(args: Sequence[str] | None = None) -> int:
    """Run ``deeplab-lit``: help and version here, subcommands in :func:`deeplab_lit.cli.main`.

    An error of the user's making (:func:`user_message`) is printed as one message on stderr, without a
    traceback, and gives exit status 2 (as a command-line error does); ``DEEPLAB_LIT_DEBUG=1`` raises it
    with its traceback instead. Other errors (bugs) keep their traceback.

    Returns the exit status: 0, or 2 after a user's error. The console script passes it to ``sys.exit``.
    """
    words = list(sys.argv[1:] if args is None else args)
    if not words or words[0] in ("-h", "--help", "--version"):
        parser = front_parser()
        if not words:
            parser.print_help()
            return 0
        parser.parse_args(words)  # prints and exits
    from deeplab_lit.cli import main as run_cli

    try:
        run_cli(words)
    except Exception as err:
        message = None if os.environ.get(DEBUG_VARIABLE) == "1" else user_message(err)
        if message is None:
            raise
        print(f"{PROG} {words[0]}: error: {message}", file=sys.stderr)
        print(f"({DEBUG_VARIABLE}=1 shows the full traceback)", file=sys.stderr)
        return 2
    return 0
