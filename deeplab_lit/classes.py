"""Classes as configs and checkpoints name them: imported by class path, read by their ``__init__`` signature.

Shared by the LightningModules (which options a loaded file may fill in) and the command line (a
checkpoint's options against the user's, the closest option names); it imports nothing of the package.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any


def class_defaults(cls: type) -> dict[str, Any]:
    """Return the default of every ``__init__`` argument of ``cls`` and its bases (subclasses win)."""
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            parameters = inspect.signature(vars(klass)["__init__"]).parameters.values()
            defaults.update({p.name: p.default for p in parameters if p.default is not p.empty})
    return defaults


def import_class(class_path: str) -> type:
    """Import ``"package.module.Name"``; ImportError/AttributeError name the path."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)
