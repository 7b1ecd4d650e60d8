"""The parser and instantiator every subcommand uses: a bad option is reported as the user's error.

A class that refuses its options while being built raises :class:`~deeplab_lit.errors.InvalidOptions`
naming the group and class (:class:`BuildingInstantiator`), unwrapped from jsonargparse's union dump
(:func:`user_errors_unwrapped`); an unknown option is reported with the closest valid names
(:class:`DeepLabArgumentParser`). jsonargparse and argparse give an unknown option no exception type or
attribute of its own, so its name is read from their message text, in :func:`unknown_options` alone.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser

from deeplab_lit.classes import class_defaults
from deeplab_lit.errors import UserError, building, find_in_chain, root_cause


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


#: How jsonargparse's "not accepted" messages quote the unknown option: "Option 'x' is not accepted",
#: "Group 'model' does not accept option 'x'".
_UNKNOWN_OPTION = re.compile(r"[Oo]ption '([^']+)'")
#: How argparse (and jsonargparse after it) starts the message for words no option takes.
_UNRECOGNIZED = "unrecognized arguments:"


def unknown_options(message: str, ex: Exception | None) -> tuple[str, list[str], bool]:
    """Read a parser error: the message to show, the option names it calls unknown, whether they lack a group.

    The one place that reads another library's message text, because neither library gives the failure a
    type or an attribute naming the option: jsonargparse raises its ``NSKeyError`` (a ``KeyError``) with the
    name only in the message; argparse passes ``error()`` the text "unrecognized arguments: --a --b". Checked
    on jsonargparse 4.53.0 and Python 3.11's argparse (tests/integration/test_user_errors.py). If the text
    changes, no names are found and the error is reported without the closest valid ones.

    Returns:
        ``(message, names, init_arg)``: jsonargparse's root message replaces its union dump; ``names``
        without dashes (e.g. ``trainer.max_epoch``); ``init_arg`` is true for a name jsonargparse gives
        without its group (a model's or data module's ``init_args`` option, e.g. ``output_strid``).
    """
    root = root_cause(ex) if ex is not None else None
    if isinstance(root, KeyError) and root.args:  # jsonargparse's NSKeyError: an unknown option
        message = str(root.args[0])
        unknown = _UNKNOWN_OPTION.search(message)
        name = unknown.group(1) if unknown else ""
        return message, [name] if name else [], "." not in name
    if message.startswith(_UNRECOGNIZED):
        given = message.split(":", 1)[1].split()
        return message, [w.split("=")[0][2:] for w in given if w.startswith("--")], False
    return message, [], False


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
        message, names, init_arg = unknown_options(message, ex)
        close = [c for name in names for c in closest_options(name, self, init_arg=init_arg)]
        if close:
            message += f" (closest valid: {', '.join(close)})"
        super().error(message, ex)
