"""Lower-precision predict on trained weights: mIoU change, labels and speed of bf16 and int8 against fp32.

    python benchmarks/predict_precision.py --ckpt_path run/checkpoints/last.ckpt    # e.g. the quickstart's
    python benchmarks/predict_precision.py --ckpt_path best.ckpt --calibration 32 --threads 2

The checkpoint's model and data module (its validation split, whole images, one at a time) run the
folded network as ``predict`` does (:func:`deeplab_lit.engines.predict_network`) in fp32 and under each
``--precisions``. int8 calibrates on ``--calibration`` training images, evenly spread over the training
split, with the evaluation transform (what ``calibration_path`` should hold). A precision the CPU cannot
run is named and skipped; ``--emulated`` measures bf16 all the same on a CPU without bf16 instructions
(its accuracy; its speed there is no guide). Each row: mIoU, its change in points, labels equal to
fp32's, seconds for the validation set (best of ``--rounds``) and the set-up (calibration, lowering).
The CPU's instruction set is printed with the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path: the benchmarks package

from benchmarks.predict_cpu import shown_flags
from benchmarks.report import cpu_name
from deeplab_lit.classes import import_class
from deeplab_lit.cli.restore import read_training_checkpoint
from deeplab_lit.engines import predict_network
from deeplab_lit.metrics import SegmentationMetrics
from deeplab_lit.precision import Bf16Network


def load(ckpt_path: str) -> tuple[torch.nn.Module, int, list[dict[str, Tensor]], list[Tensor]]:
    """The checkpoint's network, class count, validation items and its data module's training split."""
    saved = read_training_checkpoint(ckpt_path)  # the classes it records, with the CLI's messages
    if saved.model_class is None or saved.data_class is None:
        raise SystemExit(f"{ckpt_path}: written through the Python API; its classes are not recorded")
    module = import_class(saved.model_class).load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    data_class = import_class(saved.data_class)
    datamodule = data_class.load_from_checkpoint(ckpt_path, num_workers=0)
    datamodule.setup("validate")
    val = [datamodule.val_dataset[i] for i in range(len(datamodule.val_dataset))]
    train = datamodule.build_split("train", datamodule.eval_transform())
    return module.model, module.hparams["num_classes"], val, train


def evaluate(network: Callable[[Tensor], Tensor], val: list[dict[str, Tensor]], classes: int) -> tuple:
    """mIoU, the labels and the seconds of one pass over the validation items."""
    metric, labels, seconds = SegmentationMetrics(classes, 255), [], 0.0
    with torch.inference_mode():
        for item in val:
            start = time.perf_counter()
            preds = network(item["image"][None]).argmax(1)
            seconds += time.perf_counter() - start
            metric.update(preds, item["mask"][None])
            labels.append(preds.flatten())
    return float(metric.compute()["mIoU"]), torch.cat(labels), seconds


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of this project (model + data)")
    parser.add_argument("--precisions", default="bf16,int8", help="precisions to compare with fp32")
    parser.add_argument("--calibration", type=int, default=16, help="training images int8 calibrates on")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the validation set (best)")
    parser.add_argument("--emulated", action="store_true", help="measure precisions this CPU lacks too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU {cpu_name()}: torch capability {torch.backends.cpu.get_cpu_capability()}, "
          f"flags {shown_flags()}; torch {torch.__version__}, {args.threads} thread(s)")  # fmt: skip
    model, classes, val, train = load(args.ckpt_path)
    step = max(1, len(train) // args.calibration)
    calibration = [train[i]["image"][None] for i in range(0, step * args.calibration, step)[: len(train)]]
    print(f"{len(val)} validation images; int8 calibrated on {len(calibration)} training images")
    cpu = torch.device("cpu")
    results: dict[str, dict[str, float]] = {}
    reference = None
    print("\n| precision | mIoU | change (points) | labels equal to fp32 | s per val set | set-up s |")
    print("|---|---|---|---|---|---|")
    for name in ["fp32", *filter(None, args.precisions.split(","))]:
        note, start = "", time.perf_counter()
        try:
            with torch.no_grad():
                network, nhwc = predict_network(model, "eager", cpu, name, lambda: calibration)
        except ValueError as refused:
            if not (args.emulated and name == "bf16"):
                print(f"| {name} | not run: {refused} | | | | |")
                continue
            network, nhwc = predict_network(model, "eager", cpu)  # what predict_network wraps for bf16
            network, note = Bf16Network(network, cpu.type), " (emulated: its speed is no guide)"
        setup = time.perf_counter() - start

        def run(images: Tensor, network: Callable[[Tensor], Tensor] = network, nhwc: bool = nhwc) -> Tensor:
            return network(images.contiguous(memory_format=torch.channels_last) if nhwc else images)

        passes = [evaluate(run, val, classes) for _ in range(args.rounds)]
        miou, labels = passes[0][0], passes[0][1]
        seconds = min(p[2] for p in passes)
        reference = reference or (miou, labels)
        equal = float((labels == reference[1]).float().mean())
        change = 100 * (miou - reference[0])
        results[name] = {"mIoU": miou, "change_points": change, "labels_equal": equal, "seconds": seconds}
        print(f"| {name}{note} | {miou:.4f} | {change:+.2f} | {100 * equal:.2f} % | {seconds:.2f} | "
              f"{setup:.1f} |")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
