"""Check, before any work is done, that the places a run will write to can be written.

A read-only checkpoint folder used to surface at the first save, after the training it was meant to keep;
an unwritable export path after the whole export. :func:`check_writable` is called by the command line for
every path a subcommand writes (checkpoint folder, logger folders, predict output, export file).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def check_writable(path: str | os.PathLike[str], what: str, option: str, is_file: bool = False) -> None:
    """Raise PermissionError (naming ``what`` and ``option``) if files cannot be written at ``path``.

    For a folder, a file is created and removed in it (creating the folder and its parents if needed, as
    the run itself would). For a file, its folder is checked the same way, and an existing file must be
    writable. Remote URLs (``s3://``...) are left to their own libraries.

    Args:
        path: The folder (or, with ``is_file``, the file) the run will write.
        what: What is written there, for the message ("checkpoints", "the ONNX file").
        option: The option that sets it, for the message (``--checkpoint.dirpath``).
        is_file: ``path`` is a file rather than a folder.
    """
    text = os.fspath(path)
    if "://" in text:
        return
    target = Path(text).expanduser()
    folder = target.parent if is_file else target
    remedy = f"choose another with {option}, or fix the permissions"
    if is_file and target.is_dir():
        raise IsADirectoryError(f"Cannot write {what} to {target}: it is a folder; {remedy}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        blocking = _nearest_existing(folder)
        raise PermissionError(
            f"Cannot write {what} to {folder} ({err.strerror or err}; nearest existing folder: {blocking}); "
            f"{remedy}. Checked before the run starts, so nothing was lost."
        ) from err
    if is_file and target.exists() and not os.access(target, os.W_OK):
        raise PermissionError(f"Cannot overwrite {what} {target}: the file is read-only; {remedy}")
