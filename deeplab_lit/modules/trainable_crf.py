"""The ``crf_rnn`` option of every DeepLab module: a trainable dense CRF after the network.

``crf_rnn`` is a plain mapping (so that it reads the same in Python, in YAML and in a checkpoint's
hyper-parameters). Its keys are the layer's own (:class:`~deeplab_lit.crf.trainable.CRFasRNN`:
``preset``, ``iterations``, ``eval_iterations``, ``learn_bandwidths``) and two training options:

* ``network_loss_weight`` (default 0, as Zheng et al. train on the CRF's output alone): weight of a second
  cross-entropy on the network's own logits, which keeps them good on their own (the offline CRF callback
  refines those);
* ``lr_mult`` (default 1): the CRF parameters' learning rate is ``lr * lr_mult``, in their own parameter
  group, without weight decay (decay would pull the compatibility and the kernel weights towards zero,
  that is towards no CRF at all).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from deeplab_lit.crf.trainable import CRFasRNN

#: Keys of ``crf_rnn`` read by the training loop rather than by the layer.
TRAINING_KEYS = ("network_loss_weight", "lr_mult")
#: Output name of the network's own logits in ``forward_train``'s dict when it has a loss weight.
NETWORK_OUTPUT = "network"


@dataclass(frozen=True)
class TrainableCRFOptions:
    """What the training loop needs to know about the trainable CRF (see the module docstring)."""

    network_loss_weight: float = 0.0
    lr_mult: float = 1.0


def build_trainable_crf(
    options: Mapping[str, Any] | None, num_classes: int
) -> tuple[CRFasRNN | None, TrainableCRFOptions]:
    """Build the layer and the training options from a module's ``crf_rnn`` mapping (None: no layer).

    Raises:
        TypeError: ``options`` is not a mapping.
        ValueError: An unknown key (the message lists the valid ones) or an impossible value.
    """
    if options is None:
        return None, TrainableCRFOptions()
    if not isinstance(options, Mapping):
        raise TypeError(
            f"crf_rnn must be a mapping such as {{'iterations': 5}} (or null for none), got {options!r}"
        )
    layer_keys = [name for name in inspect.signature(CRFasRNN).parameters if name != "num_classes"]
    unknown = sorted(set(options) - set(layer_keys) - set(TRAINING_KEYS))
    if unknown:
        valid = layer_keys + list(TRAINING_KEYS)
        raise ValueError(f"unknown crf_rnn option(s) {unknown}; expected some of {valid}")
    training = TrainableCRFOptions(**{key: options[key] for key in TRAINING_KEYS if key in options})
    for key in TRAINING_KEYS:
        value = getattr(training, key)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise ValueError(f"crf_rnn {key} must be a number >= 0, got {value!r}")
    layer = CRFasRNN(num_classes, **{key: value for key, value in options.items() if key in layer_keys})
    return layer, training
