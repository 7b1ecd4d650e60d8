"""The CPU predict path against torchvision's eager DeepLabV3 ResNet-50: speed and labels, side by side.

    python benchmarks/predict_cpu.py                     # 1 thread, 375x500, 5 rounds
    python benchmarks/predict_cpu.py --threads 2 --size 513x513 --rounds 7

One process, the same weights in every contender (torchvision's network, random but with real BatchNorm
statistics), threads pinned, rounds interleaved so that load hits every contender alike. Contenders:
torchvision eager; ours with BatchNorm folded (the predict path before channels-last); ours as
``Trainer.predict`` runs it (``on_predict_start`` + ``predict_step``); ONNX Runtime on our export where
the ``export`` extra is installed. Each row: median images/s, its range, the speed-up over torchvision
and the share of labels equal to torchvision's. The CPU's instruction set is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: the benchmarks package

from benchmarks.harness import Runner, interleaved_rates, log
from benchmarks.report import cpu_name
from deeplab_lit import DeepLabV3
from deeplab_lit.inference import segment
from deeplab_lit.models.fusion import fuse_conv_bn


class Call(Runner):
    """One forward of a callable on a fixed batch, without autograd."""

    def __init__(self, forward: Callable[[], Tensor]) -> None:
        self.batch, self.device, self.forward = 1, "cpu", forward

    def step(self) -> None:
        """Run the forward once."""
        with torch.inference_mode():
            self.forward()


def cpu_flags() -> str:
    """The vector-instruction flags /proc/cpuinfo lists (AVX2, AVX-512 and its VNNI/BF16, AMX)."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(flag for flag in wanted if f" {flag}" in flags) or "none of AVX2/AVX-512/AMX"


def torchvision_network(seed: int = 0) -> nn.Module:
    """torchvision's DeepLabV3 ResNet-50 (21 classes, no aux head) with random but real BN statistics."""
    torch.manual_seed(seed)
    net = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=False
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
    return net.eval()


def our_module(reference: nn.Module) -> DeepLabV3:
    """Our DeepLabV3 in torchvision's layout (output stride 8, rates 12/24/36) with its weights."""
    module = DeepLabV3(num_classes=21, backbone="resnet50", output_stride=8, atrous_rates=(12, 24, 36),
                       multi_grid=None, pretrained_backbone=False)  # fmt: skip
    state = {key.replace("classifier.", "head."): value for key, value in reference.state_dict().items()}
    module.model.load_state_dict(state)
    return module.eval()


def onnx_forward(module: DeepLabV3, images: Tensor) -> Callable[[], Tensor] | None:
    """ONNX Runtime on our export (one thread per ``torch.get_num_threads()``), or None without the extra."""
    try:
        import onnxruntime
    except ImportError:
        return None
    from deeplab_lit.export import export_onnx

    path = Path(tempfile.mkdtemp()) / "deeplabv3.onnx"
    export_onnx(fuse_conv_bn(module.model), path, exporter="torchscript")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"image": images.numpy()}
    return lambda: torch.from_numpy(session.run(["logits"], feed)[0])


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch (and ONNX Runtime) threads")
    parser.add_argument("--size", default="375x500", help="HxW of the one image (default: VOC's 375x500)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-onnx", action="store_true", help="leave ONNX Runtime out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    load = os.getloadavg()
    print(
        f"CPU {cpu_name()}: torch capability {torch.backends.cpu.get_cpu_capability()}, flags {cpu_flags()}"
    )
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), 1 image {height}x{width}, {args.rounds} rounds"
    )
    print(f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")

    reference = torchvision_network()
    module = our_module(reference)
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    folded = fuse_conv_bn(module.model)
    module.on_predict_start()
    forwards: dict[str, Callable[[], Tensor]] = {
        "torchvision eager": lambda: reference(images)["out"],
        "ours, BatchNorm folded": lambda: segment(folded, images),
        "ours, predict path (folded + NHWC)": lambda: module.predict_step({"image": images}, 0)["logits"],
    }
    ort = None if args.no_onnx else onnx_forward(module, images)
    if ort is not None:
        forwards["ONNX Runtime on our export"] = ort
    with torch.inference_mode():
        expected = forwards["torchvision eager"]().argmax(1)
        equal = {
            name: float((forward().argmax(1) == expected).float().mean())
            for name, forward in forwards.items()
        }
    rates = interleaved_rates({name: Call(f) for name, f in forwards.items()}, 1, 1, args.rounds, "predict")
    module.on_predict_end()
    base = statistics.median(rates["torchvision eager"])
    results = {}
    print("\n| contender | images/s (median, range) | speed-up over torchvision eager | labels equal |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        results[name] = {"images_per_s": median, "speed_up": median / base, "labels_equal": equal[name]}
        print(f"| {name} | {median:.3f} ({min(values):.3f}-{max(values):.3f}) | {median / base:.2f}x | "
              f"{100 * equal[name]:.3f} % |")  # fmt: skip
    load = os.getloadavg()
    log(f"load average at end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    return results


if __name__ == "__main__":
    main()
