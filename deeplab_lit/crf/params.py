"""Parameters of the fully-connected CRF and the presets of the DeepLab papers."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class CRFParams:
    """Mean-field iterations and the two Gaussian edge potentials of the dense CRF.

    The pairwise potential (Krähenbühl and Koltun 2011, Eq. 3; DeepLab v2 Sec. 3.3) is a Potts model
    weighted by two kernels over the pixel positions ``p`` and RGB colours ``I``::

        bi_w * exp(-|p_i - p_j|^2 / (2 bi_xy_std^2) - |I_i - I_j|^2 / (2 bi_rgb_std^2))
          + pos_w * exp(-|p_i - p_j|^2 / (2 pos_xy_std^2))

    Attributes:
        iterations: Number of mean-field iterations.
        pos_w: Weight of the spatial (smoothness) kernel.
        pos_xy_std: Standard deviation of the spatial kernel, in pixels.
        bi_w: Weight of the bilateral (appearance) kernel.
        bi_xy_std: Spatial standard deviation of the bilateral kernel, in pixels.
        bi_rgb_std: Colour standard deviation of the bilateral kernel, in 0-255 intensity units.
    """

    iterations: int = 10
    pos_w: float = 3.0
    pos_xy_std: float = 1.0
    bi_w: float = 4.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"CRFParams.iterations must be a positive int, got {self.iterations!r}")
        for field in fields(self)[1:]:
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"CRFParams.{field.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"CRFParams.{field.name} must be finite, got {value!r}")
            if field.name.endswith("_std") and value <= 0:
                raise ValueError(
                    f"CRFParams.{field.name} is a standard deviation and must be > 0, got {value!r}"
                )
            if field.name.endswith("_w") and value < 0:
                raise ValueError(f"CRFParams.{field.name} is a kernel weight and must be >= 0, got {value!r}")
            object.__setattr__(self, field.name, float(value))

    @classmethod
    def from_preset(cls, name: str) -> CRFParams:
        """Return the parameters of a named preset (see :data:`PRESETS`).

        Raises:
            ValueError: If ``name`` is not a preset.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown CRF preset {name!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[name]


#: DeepLab's cross-validated CRF settings: v2 (the default, DeepLab v2 Sec. 4) and v1 LargeFOV.
PRESETS: dict[str, CRFParams] = {
    "deeplab_v2": CRFParams(10, 3, 1, 4, 67, 3),
    "deeplab_v1_largefov": CRFParams(10, 3, 3, 4, 121, 5),
}
