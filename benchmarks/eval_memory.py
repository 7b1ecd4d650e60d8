"""Peak memory and time of whole-image evaluation of big photos on the CPU, as Lightning runs it.

    python benchmarks/eval_memory.py                                  # v3+ and v3 ResNet-101, 1-24 MP
    python benchmarks/eval_memory.py --models v3plus --sizes 12 24 --modes whole auto --steps validate
    python benchmarks/eval_memory.py --agreement path/to/model.ckpt --sizes 12   # labels: whole vs windows

Each case runs in a fresh process: it builds ``DeepLabV3Plus`` or ``DeepLabV3`` (21 classes, random init,
nothing downloaded), then runs ``Trainer.validate`` (``validation_step``: inference, loss, arg-max,
metrics) or ``Trainer.predict`` (BatchNorm folded, ``predict_step``) on one random image of the size,
in eval mode under ``torch.inference_mode`` as Lightning does. Reported per case:

- ``peak``: the process's peak resident set (``VmHWM`` from ``/proc/self/status``, Linux: the
  child's own figure, where the parent's ``RUSAGE_CHILDREN`` would give the largest child so far);
- ``built``: the resident set after building the model and the Trainer, before the step;
- ``s``: wall-clock seconds of the ``validate``/``predict`` call (rough on a shared machine).

``--modes``: ``whole`` is whole-image inference (``max_pixels: null``), ``auto`` the default
``InferenceConfig`` (sliding windows above ``max_pixels``). A case whose resident set passes ``--cap-gb``
is stopped and shown as ``> cap``, so a machine with little memory survives the big whole-image cases.

``--agreement CKPT`` instead compares labels: whole-image inference against the automatic windows on
an image of each size (a mosaic of the synthetic data set's validation scenes, which the quickstart
model was trained on), and prints the fraction of pixels whose label differs, overall and within
``--border`` pixels of a window edge.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SIZES = {  # megapixels -> (height, width): 4:3 photos (24 MP: the 6000x4000 of the issue), Cityscapes
    "1": (864, 1152),
    "2": (1024, 2048),
    "4": (1728, 2304),
    "8": (2448, 3264),
    "12": (3000, 4000),
    "24": (4000, 6000),
}
MODELS = {"v3plus": "DeepLabV3Plus", "v3": "DeepLabV3"}


def status_kb(pid: int | str, key: str) -> int:
    """A ``/proc/<pid>/status`` memory field in kB (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------- child
def run_case(case: dict) -> dict:
    """Build the model and a Trainer, run one validate or predict on one image; report memory and time."""
    import torch
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    import deeplab_lit
    from deeplab_lit.inference import InferenceConfig

    torch.manual_seed(0)
    inference = InferenceConfig() if case["mode"] == "auto" else InferenceConfig(max_pixels=None)
    module = getattr(deeplab_lit, MODELS[case["model"]])(
        num_classes=21, backbone=case["backbone"], inference=inference
    )
    height, width = case["size"]
    sample = {"image": torch.randn(3, height, width), "mask": torch.randint(0, 21, (height, width))}
    loader = DataLoader([sample], batch_size=1)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    built = status_kb("self", "VmRSS")
    start = time.perf_counter()
    if case["step"] == "validate":
        trainer.validate(module, loader, verbose=False)
    else:
        trainer.predict(module, loader, return_predictions=False)
    seconds = time.perf_counter() - start
    window = inference.window_for(height, width)
    return {"peak_kb": status_kb("self", "VmHWM"), "built_kb": built, "s": seconds, "window": window}


# --------------------------------------------------------------------------------------------- parent
def measure(case: dict, cap_gb: float) -> dict:
    """Run ``case`` in a fresh process, stopping it when its resident set passes ``cap_gb``."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(case)], stdout=out, stderr=err, text=True
        )
        highest = 0
        while child.poll() is None:
            rss = status_kb(child.pid, "VmRSS")
            highest = max(highest, rss)
            if rss > cap_gb * 1e6:
                child.kill()
                child.wait()
                return {"capped": True, "peak_kb": highest}
            time.sleep(0.1)
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"case {case} failed (exit code {child.returncode}):\n{err.read()}")
        text = out.read()
    return json.loads(text.strip().splitlines()[-1])


def memory_table(args: argparse.Namespace) -> None:
    """Run every case and print one line each."""
    print(f"# {os.cpu_count()} CPUs, torch threads default; cap {args.cap_gb} GB; backbone {args.backbone}")
    print(f"{'model':7} {'size':>10} {'MP':>5} {'mode':5} {'step':8} {'peak GB':>8} {'built GB':>8} "
          f"{'s':>6}  window")  # fmt: skip
    for model in args.models:
        for key in args.sizes:
            for mode in args.modes:
                for step in args.steps:
                    height, width = SIZES[key]
                    case = {"model": model, "backbone": args.backbone, "size": [height, width],
                            "mode": mode, "step": step}  # fmt: skip
                    r = measure(case, args.cap_gb)
                    peak = f"> {args.cap_gb:g}" if r.get("capped") else f"{r['peak_kb'] / 1e6:.2f}"
                    built = "-" if r.get("capped") else f"{r['built_kb'] / 1e6:.2f}"
                    seconds = "-" if r.get("capped") else f"{r['s']:.0f}"
                    window = r.get("window")
                    window = "whole" if window is None else f"{window[1]}x{window[0]}"
                    print(f"{model:7} {width:>5}x{height:<4} {height * width / 1e6:5.1f} {mode:5} {step:8} "
                          f"{peak:>8} {built:>8} {seconds:>6}  {window}", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------------ agreement
def mosaic(height: int, width: int, tile: int = 128, seed: int = 0):
    """(1, 3, H, W) uint8 mosaic of synthetic scenes of ``tile`` pixels, and its (H, W) int64 mask."""
    import numpy as np
    import torch

    from deeplab_lit.data.synthetic import render_sample

    rows, cols = -(-height // tile), -(-width // tile)
    canvas = np.zeros((rows * tile, cols * tile, 3), dtype=np.uint8)
    mask = np.zeros((rows * tile, cols * tile), dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            image, labels = render_sample(np.random.default_rng([seed, i, j]), tile, 4, True)
            canvas[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile] = image
            mask[i * tile : (i + 1) * tile, j * tile : (j + 1) * tile] = labels
    image = torch.from_numpy(canvas[:height, :width]).permute(2, 0, 1)[None].contiguous()
    return image, torch.from_numpy(mask[:height, :width])


def agreement(args: argparse.Namespace) -> None:
    """Labels of whole-image inference against automatic windows, per size, with a trained checkpoint."""
    import importlib

    import torch

    from deeplab_lit.inference import InferenceConfig, _window_starts, segment

    hparams = torch.load(args.agreement, map_location="cpu", weights_only=False)["hyper_parameters"]
    module_path, name = hparams.get("_class_path", "deeplab_lit.DeepLabV3Plus").rsplit(".", 1)
    cls = getattr(importlib.import_module(module_path), name)
    module = cls.load_from_checkpoint(args.agreement, map_location="cpu").eval()
    normalization = module.normalization
    if normalization is None:
        raise SystemExit(f"{args.agreement} records no input normalisation; train it with this project")
    for key in args.sizes:
        height, width = SIZES[key]
        raw, truth = mosaic(height, width)
        images = normalization.normalize(raw)
        with torch.inference_mode():
            whole = segment(module.model, images, InferenceConfig(max_pixels=None)).argmax(1)[0]
            config = InferenceConfig(max_pixels=args.max_pixels)
            windowed = segment(module.model, images, config).argmax(1)[0]
        window = config.window_for(height, width)
        differ = whole != windowed
        line = f"{width}x{height}: window {window and f'{window[1]}x{window[0]}'}, "
        line += f"labels differ at {differ.float().mean().item():.4%} of pixels"
        if window is not None:
            near = torch.zeros_like(differ)
            stride = [max(1, int(w * (1 - config.overlap))) for w in window]
            for axis, (size, win, step) in enumerate(zip((height, width), window, stride)):
                for start in _window_starts(size, win, step):
                    for edge in (start, start + win):
                        if 0 < edge < size:
                            lo, hi = max(0, edge - args.border), min(size, edge + args.border)
                            near[(slice(lo, hi), slice(None))[:: 1 if axis == 0 else -1]] = True
            inside = differ[near].float().mean().item() if near.any() else 0.0
            outside = differ[~near].float().mean().item()
            line += f" ({inside:.4%} within {args.border} px of a window edge, {outside:.4%} elsewhere)"
        valid = truth != 255
        for kind, labels in (("whole", whole), ("windows", windowed)):
            line += f"; {kind} pixel accuracy {(labels == truth)[valid].float().mean().item():.4%}"
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=["1", "4", "8", "12", "24"], choices=list(SIZES))
    parser.add_argument("--modes", nargs="+", default=["whole", "auto"], choices=["whole", "auto"])
    steps = ["validate", "predict"]
    parser.add_argument("--steps", nargs="+", default=steps, choices=steps)
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--cap-gb", type=float, default=14.0)
    parser.add_argument("--agreement", metavar="CKPT", help="compare labels (whole vs windows) with CKPT")
    parser.add_argument("--max-pixels", type=int, default=None, help="--agreement: default InferenceConfig's")
    parser.add_argument("--border", type=int, default=32, help="--agreement: band around window edges")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(json.loads(args.child))))
    elif args.agreement:
        if args.max_pixels is None:
            from deeplab_lit.inference import DEFAULT_MAX_PIXELS

            args.max_pixels = DEFAULT_MAX_PIXELS
        agreement(args)
    else:
        memory_table(args)


if __name__ == "__main__":
    main()
