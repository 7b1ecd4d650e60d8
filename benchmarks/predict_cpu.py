"""The CPU predict path against torchvision's eager DeepLabV3 ResNet-50: speed and labels, side by side.

    python benchmarks/predict_cpu.py                     # 1 thread, 375x500, 5 rounds
    python benchmarks/predict_cpu.py --threads 2 --size 513x513 --rounds 7

One process, the same weights in every contender (torchvision's network, random but with real BatchNorm
statistics), threads pinned, rounds interleaved so that load hits every contender alike. Contenders:
torchvision eager; ours with BatchNorm folded (the predict path before channels-last); ours as
``Trainer.predict`` runs it (``on_predict_start`` + ``predict_step``) under each ``predict_engine``
(``--engines``), and the folded network under each ``predict_precision`` besides fp32 (``--precisions``;
one the CPU cannot run is named, with the reason, and skipped). Each row: median images/s, its range, the
speed-up over torchvision, the share of labels equal to torchvision's (for int8 and bf16 on random weights
this is no accuracy figure: ``benchmarks/predict_precision.py`` measures mIoU on trained ones), and the
warm-up (engine set-up, calibration, first image). The CPU's instruction set is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: the benchmarks package

from benchmarks.harness import Runner, interleaved_rates, log
from benchmarks.report import cpu_name
from deeplab_lit import DeepLabV3
from deeplab_lit.engines import predict_network
from deeplab_lit.inference import segment
from deeplab_lit.models.fusion import fuse_conv_bn
from deeplab_lit.precision import check_precision, check_precision_on, cpu_flags


class Call(Runner):
    """One forward of a callable on a fixed batch, without autograd."""

    def __init__(self, forward: Callable[[], Tensor]) -> None:
        self.batch, self.device, self.forward = 1, "cpu", forward

    def step(self) -> None:
        """Run the forward once."""
        with torch.inference_mode():
            self.forward()


def shown_flags() -> str:
    """The vector-instruction flags of the CPU that matter here (AVX2, AVX-512 and its VNNI/BF16, AMX)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return " ".join(flag for flag in wanted if flag in cpu_flags()) or "none of AVX2/AVX-512/AMX"


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


def our_module(reference: nn.Module, engine: str = "eager") -> DeepLabV3:
    """Our DeepLabV3 in torchvision's layout (output stride 8, rates 12/24/36) with its weights."""
    module = DeepLabV3(num_classes=21, backbone="resnet50", output_stride=8, atrous_rates=(12, 24, 36),
                       multi_grid=None, pretrained_backbone=False, predict_engine=engine)  # fmt: skip
    state = {key.replace("classifier.", "head."): value for key, value in reference.state_dict().items()}
    module.model.load_state_dict(state)
    return module.eval()


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch (and ONNX Runtime) threads")
    parser.add_argument("--size", default="375x500", help="HxW of the one image (default: VOC's 375x500)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--engines", default="eager,onnxruntime,compile", help="predict engines to run")
    parser.add_argument(
        "--precisions", default="int8,bf16", help="predict precisions besides fp32 (eager engine)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = (int(v) for v in args.size.split("x"))
    load = os.getloadavg()
    print(
        f"CPU {cpu_name()}: torch capability {torch.backends.cpu.get_cpu_capability()}, flags {shown_flags()}"
    )
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), 1 image {height}x{width}, {args.rounds} rounds"
    )
    print(f"load average at start {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")

    reference = torchvision_network()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, height, width, generator=generator)
    calibration = [torch.randn(1, 3, height, width, generator=generator) for _ in range(4)]
    folded = fuse_conv_bn(our_module(reference).model)
    forwards: dict[str, Callable[[], Tensor]] = {
        "torchvision eager": lambda: reference(images)["out"],
        "ours, BatchNorm folded": lambda: segment(folded, images),
    }
    warmup: dict[str, float] = {}
    modules = []
    for engine in args.engines.split(","):
        module = our_module(reference, engine)
        start = time.perf_counter()  # what a predict run pays before its first image: export, compile
        module.on_predict_start()
        with torch.inference_mode():
            module.predict_step({"image": images}, 0)
        warmup[f"ours, predict_engine={engine}"] = time.perf_counter() - start
        forwards[f"ours, predict_engine={engine}"] = partial(
            lambda m: m.predict_step({"image": images}, 0)["logits"], module
        )
        modules.append(module)
    for precision in filter(None, args.precisions.split(",")):
        name = f"ours, predict_precision={precision}"
        try:
            check_precision(precision, "eager")
            check_precision_on(precision, torch.device("cpu"))
        except (ValueError, ImportError) as refused:
            print(f"{name}: not run, refused here: {refused}")
            continue
        start = time.perf_counter()  # int8: calibration (4 random images) and the lowering at this size
        network, nhwc = predict_network(
            our_module(reference).model, "eager", torch.device("cpu"), precision, lambda: calibration
        )
        given = images.contiguous(memory_format=torch.channels_last) if nhwc else images
        with torch.inference_mode():
            segment(network, given)
        warmup[name] = time.perf_counter() - start
        forwards[name] = partial(segment, network, given)
    with torch.inference_mode():
        expected = forwards["torchvision eager"]().argmax(1)
        equal = {name: float((f().argmax(1) == expected).float().mean()) for name, f in forwards.items()}
    rates = interleaved_rates({name: Call(f) for name, f in forwards.items()}, 1, 1, args.rounds, "predict")
    for module in modules:
        module.on_predict_end()
    base = statistics.median(rates["torchvision eager"])
    results = {}
    print("\n| contender | images/s (median, range) | speed-up over torchvision | labels equal | warm-up |")
    print("|---|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        results[name] = {"images_per_s": median, "speed_up": median / base, "labels_equal": equal[name]}
        first = f"{warmup[name]:.1f} s" if name in warmup else "-"
        print(f"| {name} | {median:.3f} ({min(values):.3f}-{max(values):.3f}) | {median / base:.2f}x | "
              f"{100 * equal[name]:.3f} % | {first} |")  # fmt: skip
    load = os.getloadavg()
    log(f"load average at end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    return results


if __name__ == "__main__":
    main()
