"""Lower-precision predict, chosen by ``predict_precision``: ``fp32`` (default), ``bf16`` or ``int8``.

- ``bf16``: autocast to bfloat16 around the network (eager or compiled); logits come back as float32.
  Offered where the hardware has bf16 arithmetic: a GPU that supports it, or a CPU with AVX-512 BF16 or
  AMX. Elsewhere torch emulates it, several times slower than fp32 (BENCHMARKS.md), so it is refused.
- ``int8``: torch's PT2E static quantization with the x86 (oneDNN) quantizer, calibrated on a few
  images, lowered to oneDNN's int8 kernels (:class:`Int8Network`; the ``int8`` extra, torchao). x86
  CPUs with AVX2 or better (VNNI and AMX have faster int8 instructions; not measured here).

Both change the labels a little: BENCHMARKS.md, "Predict on the CPU", gives the mIoU change on trained
weights and the speed. Every refusal is raised before any image is predicted.
"""

from __future__ import annotations

import contextlib
import importlib.util
import platform
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
#: CPU flags (/proc/cpuinfo) of hardware bf16 arithmetic: AVX-512 BF16, AMX's bf16 tiles.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
#: torch's CPU capabilities under which oneDNN has int8 convolutions (AVX2's vpmaddubsw and above).
INT8_CAPABILITIES = frozenset({"AVX2", "AVX512"})


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (Linux); empty where it cannot be read."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def check_precision(precision: str, engine: str) -> str:
    """Return ``precision`` if known, possible under ``engine`` and installed; else raise one clear error."""
    if precision not in PRECISIONS:
        raise ValueError(f"predict_precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "fp32" and engine == "onnxruntime":
        raise ValueError(
            f"predict_precision={precision!r} runs in PyTorch; predict_engine='onnxruntime' runs fp32 only"
        )
    if precision == "int8":
        if engine != "eager":
            raise ValueError(
                "predict_precision='int8' runs its own lowered int8 graph: use it with "
                f"predict_engine='eager' (got {engine!r})"
            )
        if importlib.util.find_spec("torchao") is None:
            raise ImportError("predict_precision='int8' needs torchao: pip install 'deeplab-lit[int8]'")
    return precision


def check_precision_on(precision: str, device: torch.device) -> None:
    """Raise if ``device`` lacks the instructions that make ``precision`` pay (see the module docstring)."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"predict_precision='bf16': {torch.cuda.get_device_name(device)} has no bf16")
    if precision == "bf16" and device.type == "cpu" and not BF16_FLAGS & cpu_flags():
        raise ValueError(
            "predict_precision='bf16' needs a CPU with AVX-512 BF16 or AMX (none of the flags "
            f"{sorted(BF16_FLAGS)} in /proc/cpuinfo); without them torch emulates bf16, several times "
            "slower than fp32. Use fp32, or int8 on this CPU"
        )
    if precision == "int8" and device.type != "cpu":
        raise ValueError(f"predict_precision='int8' runs on x86 CPUs; this predict runs on {device}")
    capability = torch.backends.cpu.get_cpu_capability()
    if precision == "int8" and capability not in INT8_CAPABILITIES:
        raise ValueError(
            "predict_precision='int8' needs an x86 CPU with AVX2 or AVX-512; this one is "
            f"{platform.machine()} with torch capability {capability}"
        )


class Bf16Network:
    """A network (or engine) run under bf16 autocast, its logits returned as float32."""

    def __init__(self, network: Callable[[Tensor], Tensor], device_type: str) -> None:
        self.network, self.device_type = network, device_type

    def __call__(self, images: Tensor) -> Tensor:
        """Logits (N, C, H, W), float32, of normalised images (N, 3, H, W)."""
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.network(images).float()


class Int8Network:
    """A folded network quantized to int8 (PT2E, x86 quantizer), called like the network itself.

    Quantization is static: the activations' ranges are observed on ``calibration`` images (normalised,
    (1, 3, H, W) each, any sizes) once, here. The quantized graph is then lowered to oneDNN's int8
    kernels for each image size it meets (torchao's lowering exports at one shape), and kept; a batch
    runs one image at a time (the graph is exported at batch 1).
    """

    def __init__(self, network: nn.Module, calibration: Iterable[Tensor]) -> None:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as quantizers

        images = iter(calibration)
        first = next(images, None)
        if first is None:
            raise ValueError("predict_precision='int8' needs at least one calibration image; got none")
        auto = torch.export.Dim.AUTO  # any height and width: calibration images differ in size
        # strict (TorchDynamo) export: it records which call of a module each node came from; the default
        # non-strict export of torch 2.14 merges the calls of one reused nn.ReLU, which the quantizer refuses.
        exported = torch.export.export(network, (first,), dynamic_shapes=({2: auto, 3: auto},), strict=True)
        quantizer = quantizers.X86InductorQuantizer()
        quantizer.set_global(quantizers.get_default_x86_inductor_quantization_config())
        observed = prepare_pt2e(exported.module(), quantizer)
        with torch.no_grad():
            for image in (first, *images):
                observed(image)
        self.quantized = convert_pt2e(observed)
        self.lowered: dict[tuple[int, ...], nn.Module] = {}

    def __call__(self, images: Tensor) -> Tensor:
        """Logits (N, C, H, W) of normalised images (N, 3, H, W); a new shape is lowered first."""
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

        if len(images) > 1:  # the graph was exported at batch 1 (calibration images): one image at a time
            return torch.cat([self(image[None]) for image in images])
        shape = tuple(images.shape)
        if shape not in self.lowered:
            with torch.no_grad():
                self.lowered[shape] = lower_pt2e_quantized_to_x86(self.quantized, (images,))
        return self.lowered[shape](images)
