"""Tolerances measured against a tensor's own scale, so that tests do not depend on the machine.

Two computations of the same function (channels-last against channels-first, a folded network against
the unfolded one, compiled against eager) sum in different orders on different CPUs, and float32 rounding
then differs by a few units in the last place *of the largest terms*. An element near zero can therefore
differ by much more than its own size (an elementwise ``rtol`` fails on it), and an absolute ``atol`` means
nothing until the values' scale is known: it depends on the model, its initialisation and its depth.
Judging every element against ``rel * max|expected|`` follows the rounding, whatever the scale.
"""

from __future__ import annotations

import torch


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """Assert that every element of ``actual`` is within ``rel * max|expected|`` of ``expected``.

    Args:
        actual: The tensor computed the new way (same shape and dtype as ``expected``).
        expected: The reference; its largest magnitude sets the scale (all zeros: exact equality).
        rel: The allowed difference as a fraction of that scale; each caller states why its value is
            well above the rounding noise measured there and well below the change a real fault makes.
        what: A name for the tensor (a parameter's name), put in front of the failure message.
    """
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    prefix = f"{what}: " if what else ""
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0.0,
        atol=rel * scale,
        msg=lambda message: f"{prefix}{message}\n(allowed: {rel:g} x max|expected| = {rel:g} x {scale:.3e})",
    )
