"""The command line's subcommands, behind the front door of :mod:`deeplab_lit.command`.

One module per job: :mod:`~deeplab_lit.cli.lightning_cli` (the LightningCLI of fit, validate, test and
predict), :mod:`~deeplab_lit.cli.parser` (a bad option reported as the user's error),
:mod:`~deeplab_lit.cli.words` (``predict --weights NAME`` and a config-less ``--ckpt_path`` rewritten into
LightningCLI's options), :mod:`~deeplab_lit.cli.restore` (where a ``--ckpt_path`` checkpoint and the
user's options meet) and :mod:`~deeplab_lit.cli.export` (``deeplab-lit export``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from deeplab_lit.cli.export import export as export_command
from deeplab_lit.cli.lightning_cli import DeepLabCLI, build_cli
from deeplab_lit.cli.words import with_named_weights

__all__ = ["DeepLabCLI", "main"]


def main(args: list[str] | None = None, run: bool = True) -> DeepLabCLI | Path | None:
    """Run the CLI (``args=None`` reads ``sys.argv``); returns it so tests can inspect trainer and model.

    ``export`` returns the ONNX file's path (``run=False``: None). ``predict --weights NAME photos/`` is
    rewritten into the LightningCLI's own options (:func:`~deeplab_lit.cli.words.with_named_weights`);
    ``predict --list-weights`` prints the names and returns None.
    """
    words = sys.argv[1:] if args is None else list(args)
    if words[:1] == ["export"]:
        return export_command(words[1:]) if run else None
    if words[:1] == ["predict"]:
        rewritten = with_named_weights(words)
        if rewritten is None:  # --list-weights
            return None
        words = rewritten
    return build_cli(words, run)
