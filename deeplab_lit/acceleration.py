"""Speed options shared by the training module and the benchmarks: one place, so both time the same thing.

- ``channels_last`` and ``compile`` (:func:`accelerate`): channels-last (NHWC) weights, then
  ``torch.compile`` in place of the network's parts (:func:`compile_in_place`; modes :data:`COMPILE_MODES`,
  the CUDA-graph ones beginning a new graph step at each call of the whole network).
- The optimiser step: torch's fused SGD kernel where every parameter's device has one, else its
  multi-tensor (``foreach``) kernel (:func:`fast_sgd_options`).

``benchmarks/speed.py`` measures each (``--ablations``, ``--compile MODE``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deeplab_lit.models.deeplab import Segmenter

__all__ = [
    "COMPILE_MODES", "CUDA_GRAPH_MODES", "accelerate", "compile_in_place", "compile_mode", "fast_sgd_options",
]  # fmt: skip


def fast_sgd_options(params: Sequence[Tensor], fused_allowed: bool = True) -> dict[str, bool]:
    """Return the SGD keyword arguments that select torch's fastest step implementation for ``params``.

    ``{"fused": True}`` (one kernel for all parameters) when torch's fused SGD runs on every parameter's
    device (CPU and CUDA do), else ``{}``: torch's own default, its multi-tensor (``foreach``) kernels
    where the devices have them (CUDA), else a loop over the parameters. Pass ``fused_allowed=False``
    under fp16 loss scaling (``16-mixed``): torch's fused SGD allocates its momentum buffers
    uninitialised (``empty_like``) on its first call even when the GradScaler skips that step for
    overflowing gradients - which it does for the first steps of nearly every run, its initial scale
    being 2**16 - and the next step then reads that garbage: the weights turn NaN a few steps in (seen
    on an H100 and reproduced on the CPU; torch 2.11 and 2.14).
    """
    if fused_allowed and all(_fused_sgd_runs_on(device) for device in {p.device.type for p in params}):
        return {"fused": True}
    return {}


@functools.cache
def _fused_sgd_runs_on(device_type: str) -> bool:
    """Whether torch's fused SGD steps a parameter on ``device_type``: tried once on a one-element one.

    torch has no public list of the devices with fused optimiser kernels (``torch.optim`` checks a
    private one at the first step), so the step itself is asked.
    """
    try:
        weight = torch.zeros(1, device=device_type, requires_grad=True)
        weight.grad = torch.zeros_like(weight)
        torch.optim.SGD([weight], lr=0.1, momentum=0.9, fused=True).step()
    except RuntimeError:  # "`fused=True` requires ... supported devices", or no kernel for the device
        return False
    return True


#: ``torch.compile`` modes the ``compile`` option accepts by name (``True`` means torch's default mode).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes that replay CUDA graphs, whose outputs the next replay overwrites.
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _begin_cudagraph_step(module: nn.Module, args: tuple[Any, ...]) -> None:
    """Forward pre-hook: a new call of the whole network starts a new CUDA-graph step.

    Without it, the outputs one compiled part (e.g. the backbone) gave in the previous call would count
    as still in use when the next call replays its graph, and torch stops with "accessing tensor output
    of CUDAGraphs that has been overwritten". Within one call (every part, every MSC scale) nothing is
    overwritten.
    """
    torch.compiler.cudagraph_mark_step_begin()


def compile_in_place(model: nn.Module, mode: str | None = None) -> None:
    """``torch.compile`` in place the parts (backbone, head, decoder, aux head) of each :class:`Segmenter`.

    ``nn.Module.compile`` compiles a module's ``__call__`` in place, so state-dict keys stay unchanged.
    The parts, rather than the whole network, are compiled because training calls ``forward_train``,
    which a compiled ``__call__`` would not cover. ``mode`` is ``torch.compile``'s (None: its default);
    with a CUDA-graph mode each call of ``model`` itself begins a new graph step.
    """
    for module in model.modules():
        if isinstance(module, Segmenter):
            for part in module.children():
                part.compile(mode=mode)
    if mode in CUDA_GRAPH_MODES:
        model.register_forward_pre_hook(_begin_cudagraph_step)


def compile_mode(option: bool | str) -> str | None:
    """Return the ``torch.compile`` mode of a ``compile`` option (None: torch's default); error if unknown."""
    if isinstance(option, str) and option not in COMPILE_MODES:
        raise ValueError(f"compile must be true, false or one of {COMPILE_MODES}, got {option!r}")
    return option if isinstance(option, str) and option != "default" else None


def accelerate(model: nn.Module, *, channels_last: bool = False, compile: bool | str = False) -> None:
    """Apply the module's ``channels_last`` and ``compile`` options to ``model`` in place, in that order.

    Channels-last first: compiling traces the layout the weights have. ``compile`` is ``True`` (torch's
    default mode) or a mode of :data:`COMPILE_MODES`.
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        compile_in_place(model, compile_mode(compile))
