"""ONNX export of any DeepLab network, with dynamic batch size, height and width.

The exported graph is the network's single forward pass: normalised images ``image`` (N, 3, H, W) float32
-> ``logits`` (N, C, H, W) at the input's size (MSC inputs included for v2 with ``msc_scales``). Test-time
augmentation and sliding windows are loops around it (:mod:`deeplab_lit.inference`) and stay outside.
The input normalisation and class names are written into the model's metadata (``metadata_props``) so a
deployment knows how to feed it.

Two exporters: ``"dynamo"`` (torch's default, ``torch.export`` based; needs ``onnxscript``, in the
``export`` extra) and ``"torchscript"`` (the older tracing exporter, deprecated by torch but faster to run
and without extra dependencies). Both give the same numbers; after export the file is run once in
onnxruntime and compared with PyTorch (``verify=True``).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

EXPORTERS: tuple[str, ...] = ("dynamo", "torchscript")


def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{why} needs the {module!r} package: pip install 'deeplab-lit[export]'")


def _export(model: nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int | None) -> None:
    if exporter == "dynamo":
        _require("onnxscript", "The dynamo ONNX exporter")
        dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
        torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=(dims,),
                          external_data=False, opset_version=opset, verbose=False,
                          input_names=["image"], output_names=["logits"])  # fmt: skip
        return
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():  # shape arithmetic in Python is traced symbolically: expected warnings
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        dynamic_axes = {"image": axes, "logits": axes}
        torch.onnx.export(model, (example,), str(path), dynamo=False, dynamic_axes=dynamic_axes,
                          opset_version=opset or 17, input_names=["image"],
                          output_names=["logits"])  # fmt: skip


def _write_metadata(path: Path, metadata: Mapping[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    onnx.save(proto, str(path))


#: How many times PyTorch's own float32 error (against float64) an export may differ from PyTorch by.
NOISE_FACTOR = 8.0


def float32_noise(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``model``'s float32 logits on ``images``, and their largest difference from a float64 run of it.

    The float64 run (of a copy) measures how exactly float32 can compute this network: two correct
    float32 implementations (PyTorch, ONNX Runtime with its BatchNorm folding and fused kernels) differ by
    about that much, which grows with the network's activations (real BatchNorm statistics, large means
    cancelled by their biases) and not only with the logits' size.
    """
    with torch.no_grad():
        expected = model(images)
        exact = copy.deepcopy(model).double()(images.double())
    return expected, float((expected.double() - exact).abs().max())


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    images: torch.Tensor,
    atol: float = 1e-4,
    rtol: float = 1e-5,
) -> float:
    """Run the ONNX file in onnxruntime on ``images`` and compare with ``model``; return the max difference.

    Raises:
        RuntimeError: the outputs have another shape, or differ by more than ``atol + rtol * max|logits|``
            plus :data:`NOISE_FACTOR` times PyTorch's own float32 error on them (:func:`float32_noise`), so
            that a correct export is never refused and a wrong one (errors of the logits' own size) is.
    """
    _require("onnxruntime", "Checking the exported model")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (found,) = session.run(["logits"], {"image": images.cpu().numpy()})
    expected, noise = float32_noise(model, images)
    expected = expected.cpu()
    if tuple(found.shape) != tuple(expected.shape):
        raise RuntimeError(
            f"ONNX model {path} gave logits of shape {found.shape}, PyTorch {tuple(expected.shape)}"
        )
    difference = float((torch.from_numpy(found) - expected).abs().max())
    tolerance = atol + rtol * float(expected.abs().max()) + NOISE_FACTOR * noise
    if difference > tolerance:
        raise RuntimeError(
            f"ONNX model {path} differs from PyTorch by {difference:.2e} (> {tolerance:.1e}: {atol:.0e} + "
            f"{rtol:.0e} x the largest logit + {NOISE_FACTOR:g} x PyTorch's own float32 error, {noise:.1e})"
        )
    return difference


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    example_size: tuple[int, int] = (97, 113),
    exporter: str = "dynamo",
    opset: int | None = None,
    metadata: Mapping[str, str] | None = None,
    verify: bool = True,
) -> Path:
    """Export a segmentation network to ONNX with dynamic batch, height and width.

    Args:
        model: Maps normalised images (N, 3, H, W) to logits (N, C, H, W): a ``Segmenter``,
            ``MultiScaleSegmenter`` or a DeepLab LightningModule. Exported in eval mode, on the CPU; it
            is handed back in the mode and on the device it came in.
        path: Output ``.onnx`` file (one file: weights included).
        example_size: ``(height, width)`` of the example input that is traced; any size works later.
        exporter: ``"dynamo"`` (needs ``onnxscript``) or ``"torchscript"``.
        opset: ONNX opset; None = the exporter's default (17 for torchscript).
        metadata: Strings stored in the file's ``metadata_props`` (e.g. normalisation, class names).
        verify: Run the file in onnxruntime on the example and compare with PyTorch (to 1e-4 plus 1e-5
            of the largest logit plus eight times PyTorch's own float32 error, :func:`verify_onnx`).

    Returns:
        The written path.

    Raises:
        ValueError: unknown exporter or a too small example size.
        ImportError: onnx/onnxruntime/onnxscript missing (``pip install 'deeplab-lit[export]'``).
        RuntimeError: the exported model does not reproduce PyTorch's logits (``verify``).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"Unknown ONNX exporter {exporter!r}; expected one of {EXPORTERS}")
    if min(example_size) < 16:
        raise ValueError(f"example_size must be at least 16x16 pixels, got {example_size}")
    _require("onnx", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    device = next(model.parameters(), torch.empty(0)).device
    model.eval()
    try:
        example = torch.randn(2, 3, *example_size)  # batch 2: torch.export would fix a batch of 1 to 1
        model.cpu()
        _export(model, example, path, exporter, opset)
        if metadata:
            _write_metadata(path, metadata)
        if verify:
            verify_onnx(model, path, example)
    finally:
        model.to(device)
        model.train(was_training)
    return path
