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
from pathlib import Path

import torch
from torch import Tensor, nn

from deeplab_lit.export import export_onnx
from deeplab_lit.inference import Model
from deeplab_lit.models.fusion import fuse_conv_bn

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


def predict_network(model: nn.Module, engine: str, device: torch.device) -> tuple[Model, bool]:
    """The callable ``predict`` runs for ``model`` under ``engine``, and whether its input goes NHWC.

    The network is folded first (:func:`~deeplab_lit.models.fusion.fuse_conv_bn`, a copy); ``model``
    itself is left as it was.
    """
    check_engine(engine)
    if engine == "onnxruntime" and device.type != "cpu":  # refused before the network is copied
        raise ValueError(f"predict_engine='onnxruntime' runs on the CPU; this predict runs on {device}")
    folded = fuse_conv_bn(model).eval()
    if engine == "onnxruntime":
        return OnnxRuntimeNetwork(folded), False
    channels_last = device.type == "cpu"
    if channels_last:
        folded.to(memory_format=torch.channels_last)
    if engine == "compile":
        return torch.compile(folded, options={"freezing": True}), channels_last
    return folded, channels_last
