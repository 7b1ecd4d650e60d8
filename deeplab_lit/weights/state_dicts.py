"""One checked comparison of a state dict read from a file against the module it is loaded into.

Both ImageNet initialisation (:mod:`deeplab_lit.weights.imagenet`) and ``weights:``
(:mod:`deeplab_lit.weights.load`) use it, so that both fill the same gaps and find the same problems;
each caller words its own message, since only it knows what the file and the module are.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class KeyReport:
    """How a file's state dict fits a module's.

    Attributes:
        state: The file's state with the module's missing ``num_batches_tracked`` buffers filled in.
        missing: Keys the module needs (less ``skip``) that the file lacks, in the module's order.
        unexpected: Keys of the file the module does not have (less those ``ignore`` accepts).
        wrong_shapes: Keys in both whose shapes differ, in the module's order.
    """

    state: dict[str, Tensor]
    missing: list[str]
    unexpected: list[str]
    wrong_shapes: list[str]

    def shapes(self, expected: Mapping[str, Tensor], template: str = "{key}: {file} vs {model}") -> list[str]:
        """Describe each wrong shape for a message, by ``template`` (fields: key, file and model shapes)."""
        return [
            template.format(key=k, file=tuple(self.state[k].shape), model=tuple(expected[k].shape))
            for k in self.wrong_shapes
        ]


def compare_state(
    expected: Mapping[str, Tensor],
    state: Mapping[str, Tensor],
    *,
    skip: Collection[str] = (),
    ignore: Callable[[str], bool] = lambda key: False,
) -> KeyReport:
    """Compare a file's (already key-mapped) state dict with a module's ``state_dict()``.

    BatchNorm's ``num_batches_tracked`` buffers the file lacks are taken from the module, since files
    saved before BatchNorm counted batches do not hold them and they change no output.

    Args:
        expected: The module's state dict.
        state: The file's state dict, in the module's key format.
        skip: Module keys that need not be in the file (e.g. classifier layers to reinitialise).
        ignore: Accepts file keys that may be absent from the module without counting as unexpected.

    Returns:
        The filled state and the missing, unexpected and wrong-shape keys (see :class:`KeyReport`).
    """
    filled = dict(state)
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in filled:
            filled[key] = value
    wanted = [k for k in expected if k not in skip]
    return KeyReport(
        state=filled,
        missing=[k for k in wanted if k not in filled],
        unexpected=[k for k in filled if k not in expected and not ignore(k)],
        wrong_shapes=[k for k in wanted if k in filled and filled[k].shape != expected[k].shape],
    )
