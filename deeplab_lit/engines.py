"""Predict engines: what runs the BatchNorm-folded network in ``predict``, chosen by ``predict_engine``.

- ``eager``: PyTorch as it is; on the CPU channels-last (NHWC) weights and input, where oneDNN's
  convolutions are fastest. No warm-up: the default.
- ``compile``: ``torch.compile`` of the whole folded network with Inductor's ``freezing`` (weights as
  constants, layouts chosen once); each new input size compiles again (tens of seconds on a CPU).
- ``onnxruntime``: the folded network exported once per run with dynamic height and width
  (:mod:`deeplab_lit.export`, checked against PyTorch) and run in ONNX Runtime (the ``export`` extra).

Each returns a callable from normalised images (N, 3, H, W) to logits, so test-time augmentation and
sliding windows (:func:`~deeplab_lit.inference.segment`) work unchanged around any of them. When each pays:
BENCHMARKS.md, "Predict on the CPU".
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from deeplab_lit.export import export_onnx
from deeplab_lit.inference import Model
from deeplab_lit.models.fusion import fuse_conv_bn
from deeplab_lit.precision import Bf16Network, Int8Network, check_precision, check_precision_on

ENGINES: tuple[str, ...] = ("eager", "compile", "onnxruntime")


def check_engine(engine: str) -> str:
    """Return ``engine`` if it is known and can run here; else raise one clear error before any work."""
    if engine not in ENGINES:
        raise ValueError(f"predict_engine must be one of {ENGINES}, got {engine!r}")
    if engine == "onnxruntime":
        missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise ImportError(
                f"predict_engine='onnxruntime' needs {' and '.join(missing)}: "
                "pip install 'deeplab-lit[export]'"
            )
    return engine


class OnnxRuntimeNetwork:
    """A network exported to ONNX and run in ONNX Runtime on the CPU, called like the network itself."""

    def __init__(self, network: nn.Module) -> None:
        import onnxruntime

        with tempfile.TemporaryDirectory() as folder:  # the session holds the model; the file can go
            path = export_onnx(network, Path(folder) / "network.onnx", exporter="torchscript")
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # as many threads as torch uses
            self.session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )

    def __call__(self, images: Tensor) -> Tensor:
        """Logits (N, C, H, W) of normalised images (N, 3, H, W), as a CPU tensor."""
        (logits,) = self.session.run(["logits"], {"image": images.detach().cpu().contiguous().numpy()})
        return torch.from_numpy(logits)


def predict_network(
    model: nn.Module,
    engine: str,
    device: torch.device,
    precision: str = "fp32",
    calibration: Callable[[], Iterable[Tensor]] | None = None,
) -> tuple[Model, bool]:
    """What ``predict`` runs for ``model`` under ``engine`` and ``precision``; whether its input goes NHWC.

    The network is folded first (:func:`~deeplab_lit.models.fusion.fuse_conv_bn`, a copy); ``model``
    itself is left as it was. ``calibration`` gives int8's calibration images (:mod:`deeplab_lit.precision`);
    it is called only for ``int8``, before the copy. Every refusal comes before any image is predicted.
    """
    check_engine(engine)
    check_precision(precision, engine)
    check_precision_on(precision, device)
    if engine == "onnxruntime" and device.type != "cpu":
        raise ValueError(f"predict_engine='onnxruntime' runs on the CPU; this predict runs on {device}")
    if precision == "int8" and calibration is None:
        raise ValueError("predict_precision='int8' needs calibration images; none were given")
    images = calibration() if precision == "int8" and calibration is not None else None
    folded = fuse_conv_bn(model).eval()
    if engine == "onnxruntime":
        return OnnxRuntimeNetwork(folded), False
    if images is not None:
        return Int8Network(folded, images), False  # the lowered graph picks its own layouts
    channels_last = device.type == "cpu"
    if channels_last:
        folded.to(memory_format=torch.channels_last)
    network: Model = torch.compile(folded, options={"freezing": True}) if engine == "compile" else folded
    if precision == "bf16":
        network = Bf16Network(network, device.type)
    return network, channels_last
