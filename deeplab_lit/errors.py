"""Errors of the user's making: the types the command line reports in one message, without a traceback.

The rule (``deeplab-lit`` applies it in :func:`deeplab_lit.command.main`; ``DEEPLAB_LIT_DEBUG=1`` shows the
full traceback of every error instead):

- :class:`UserError` and its subclasses: :class:`InvalidOptions` (a ``ValueError``/``TypeError`` a model or
  data class raised while being built from the user's options) and the checkpoint errors of
  :mod:`deeplab_lit.cli.restore`;
- :data:`PATH_ERRORS`: a file or folder the user named is missing, a folder, or not writable;
- the project's own validation errors (preflight, unsafe checkpoint, unknown weights name, disk full),
  listed in :func:`deeplab_lit.command.user_error_types`.

Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

#: A path the user named is missing, a folder where a file was expected (or the reverse), or not writable.
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


class UserError(Exception):
    """Mixin for an error in what the user gave (an option, a file, a checkpoint); reported without traceback.

    Attributes:
        concerns: What the error is about (e.g. ``model (deeplab_lit.DeepLabV3Plus)`` or ``--ckpt_path``),
            shown before the message; empty when the message says it.
    """

    concerns: str = ""


class InvalidOptions(UserError, ValueError):
    """Options refused by what they configure (a model or data class, a checkpoint); the cause says why."""

    def __init__(self, concerns: str, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.concerns = concerns


@contextmanager
def building(concerns: str) -> Iterator[None]:
    """Turn a ``ValueError``/``TypeError`` raised inside into :class:`InvalidOptions` about ``concerns``.

    Used where a class is built from the user's options, so that a bad value is reported as the user's,
    while errors of other types (bugs) pass unchanged.
    """
    try:
        yield
    except UserError:
        raise
    except (ValueError, TypeError) as err:
        raise InvalidOptions(concerns, err) from err


def root_cause(err: BaseException) -> BaseException:
    """Return the innermost exception of ``err``'s ``__cause__``/``__context__`` chain."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    return err


def find_in_chain(err: BaseException, kind: type[BaseException]) -> BaseException | None:
    """Return the first exception of type ``kind`` in ``err``'s cause/context chain (``err`` included)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
