"""Speed suite: our DeepLab against torchvision and segmentation_models_pytorch, side by side in one process.

    python benchmarks/speed.py --device cpu                  # CPU settings (see README for the time it takes)
    python benchmarks/speed.py --device cuda                 # GPU settings: 8x3x513x513 training, AMP
    python benchmarks/speed.py --device cpu --quick          # tiny sizes: checks that it runs; no figures
    python benchmarks/speed.py --sections train infer        # a subset of: train, infer, data, versions

Sections:

- train: images/s of forward + backward + SGD step (momentum 0.9) and peak memory, for our DeepLabV3
  (ResNet-50, output stride 8, rates 12/24/36, aux head) against torchvision's ``deeplabv3_resnet50``, and
  our DeepLabV3+ (ResNet-50, output stride 16) against smp's ``DeepLabV3Plus``. The same loss for all
  (cross-entropy ignoring 255, + 0.5 x the aux head's where there is one). smp needs sizes divisible by
  16, so its pair runs at 320/512 instead of 321/513.
- infer: images/s of whole-image inference at VOC size (500x375; the smp pair at 512x384) and, on a GPU,
  Cityscapes size (2048x1024).
- data: images/s out of VOCDataModule's training loader (default workers, DeepLab augmentation) on a
  generated VOC-layout data set of 500x375 JPEGs, against the training step's rate.
- versions: every DeepLab version's training and inference rate, parameters and FLOPs.
- backbones: every head (v1, v2, v3, v3+) on ResNet-50, ConvNeXt-T, EfficientNet-B0, RegNetY-1.6GF and
  MobileNetV3-L at output stride 16, as the versions section, plus how each backbone learns under the v3+
  head at the quickstart's recipe (``--learn-steps``); written to a block of its own in ``--out``.

Recipes. "ours" is what our module does: channels-last weights, fused SGD, and on a GPU mixed precision;
for inference BatchNorm folded into the convolutions and ``torch.inference_mode``. "plain" is the other
library as a user runs it out of the box (fp32, default SGD, ``torch.no_grad``); on a GPU "+AMP" adds
mixed precision, and "+same tricks" gives it every trick ours has. Rows "ours, no X" switch one trick
off, to show what each is worth.

Method. All contenders of a table are built first, warmed up, then timed in alternating rounds (A B C,
C B A, ...) so that the machine's drift cancels; the median over rounds is reported, with the range.
CUDA timings synchronise before and after. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
during one step above what was allocated before it (activations, gradients, workspace); on the CPU, in
a fresh process per contender, the growth of the peak resident set size (VmHWM, reset after building
the model and batch) over the RSS at that point, during two steps. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` (2 per multiply-add, convolutions and matrix products).

Results are printed and written between markers into ``--out`` (BENCHMARKS.md), other content kept.
A target that is missed gets a ``torch.profiler`` table of the steps involved.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from benchmarks.recipes import COMPILE_MODES
from benchmarks.report import Target, environment, targets_markdown, write_report
from benchmarks.sections.backbones import backbones_section
from benchmarks.sections.data import data_section
from benchmarks.sections.infer import infer_section
from benchmarks.sections.train import train_section
from benchmarks.sections.versions import versions_section
from benchmarks.settings import SECTIONS, Settings, default_settings


def build_parser() -> argparse.ArgumentParser:
    """The command line: device, sections, output file, and every size and count (None: the default)."""
    parser = argparse.ArgumentParser(
        prog="benchmarks/speed.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and counts: a smoke test, not figures"
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--train-batch", type=int)
    parser.add_argument(
        "--train-size", type=int, help="square training crop (the smp pair: nearest multiple of 16)"
    )
    parser.add_argument(
        "--infer-size", type=int, nargs=2, action="append", metavar=("H", "W"), dest="infer_sizes"
    )
    parser.add_argument("--infer-batch", type=int)
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--train-iters", type=int, help="steps per timed run")
    parser.add_argument("--infer-iters", type=int, help="forward passes per timed run")
    parser.add_argument("--data-images", type=int)
    parser.add_argument("--data-batches", type=int, help="batches per timed round of the loader")
    parser.add_argument("--versions-batch", type=int)
    parser.add_argument("--versions-size", type=int)
    parser.add_argument("--flops-size", type=int)
    parser.add_argument(
        "--learn-steps", type=int, help="backbones section: steps of the learning comparison (0: skip it)"
    )
    parser.add_argument(
        "--amp-dtype",
        choices=("float16", "bfloat16"),
        default="float16",
        help="GPU mixed precision (float16: Lightning's 16-mixed, as experiments/*.yaml)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    parser.add_argument(
        "--ablations",
        action=argparse.BooleanOptionalAction,
        help="rows 'ours, no X' in the DeepLabV3 tables (default: on for cuda, off for the slow cpu steps)",
    )
    parser.add_argument("--profile", action="store_true", help="profile every pair, not only missed targets")
    parser.add_argument(
        "--compile", choices=COMPILE_MODES, help="add a row 'ours + compile: MODE' (the module's option)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> Settings:
    """The settings of a run: the device's (or ``--quick``'s) defaults, overridden by the options given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    values = default_settings(args.device, args.quick)
    ablations = args.device == "cuda" or args.quick if args.ablations is None else args.ablations
    for key in list(values):
        given = getattr(args, key, None)
        if given is not None:
            values[key] = [tuple(hw) for hw in given] if key == "infer_sizes" else given
    return Settings(
        device=args.device, quick=args.quick, amp_dtype=args.amp_dtype, memory=not args.no_memory,
        ablations=ablations, threads=args.threads, profile=args.profile, compile=args.compile,
        sections=tuple(args.sections), out=args.out, **values,
    )  # fmt: skip


def run_sections(s: Settings, targets: list[Target]) -> list[str]:
    """Run the chosen sections in order (train first: the data section compares with its step rates)."""
    body: list[str] = []
    step_rates: dict[str, float] = {}
    if "train" in s.sections:
        lines, step_rates = train_section(s, targets)
        body += lines
    if "infer" in s.sections:
        body += infer_section(s, targets)
    if "data" in s.sections:
        body += data_section(s, step_rates, targets)
    if "versions" in s.sections:
        body += versions_section(s)
    return body


def _quick_notice(s: Settings) -> list[str]:
    if not s.quick:
        return []
    return ["**--quick: tiny sizes and counts, a smoke test of the script; these are not figures.**", ""]


def main(argv: list[str] | None = None) -> None:
    """Run the suite: print every table and the targets, and write the report into ``--out``."""
    s = parse_args(argv)
    torch.set_num_threads(s.threads)
    if s.cuda:
        torch.backends.cudnn.benchmark = True  # fixed input sizes; the same for every contender
    load_start = os.getloadavg()
    if "backbones" in s.sections:  # a block of its own: running it alone keeps the main tables
        notice = _quick_notice(s)
        body = backbones_section(s)
        write_report(s.out, ["## Backbones", "", *notice, *environment(s, load_start), *body], "backbones")
        print(f"written to {s.out}")
        if set(s.sections) == {"backbones"}:
            return
        load_start = os.getloadavg()
    lines = ["## Speed", ""]
    lines += _quick_notice(s)
    targets: list[Target] = []
    body = run_sections(s, targets)
    lines += environment(s, load_start) + targets_markdown(targets) + body
    print("\n".join(targets_markdown(targets)))
    for target in targets:
        if target.ratio is not None:
            print(f"ratio {target.what}: {target.ratio:.2f}x (goal {target.goal:.1f}x)")
    write_report(s.out, lines)
    print(f"written to {s.out}")
