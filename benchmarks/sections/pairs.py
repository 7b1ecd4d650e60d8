"""One pair (ours vs torchvision or smp) under every recipe, timed in interleaved rounds, as one table.

The train and infer sections are made of these tables. Rows: ours, the other library plain (+AMP on a
GPU) and with our tricks, extra rows of ours (v3+: separable), and the ablations where the pair has them.
Each row gets images/s (median and range over rounds), GFLOPs per image and, for training rows that are
not ablations, peak step memory. The pair's target compares ours with the other library's plain run
(+AMP on a GPU); a missed target, or ``--profile``, adds a profile of both steps.
"""

from __future__ import annotations

import torch

from benchmarks.contenders import NUM_CLASSES, Model, Pair
from benchmarks.harness import Runner, gflops_per_image, interleaved_rates, log, profile_runner
from benchmarks.memory import step_memory_mib
from benchmarks.recipes import Recipe, infer_recipes, train_recipes
from benchmarks.report import Row, Table, Target
from benchmarks.runners import InferRunner, make_runner
from benchmarks.settings import Settings

#: (row name, model, recipe) of every contender of one table.
Plan = list[tuple[str, Model, Recipe]]


def plan_pair(kind: str, pair: Pair, s: Settings) -> Plan:
    """Every contender of the pair's ``kind`` ("train" or "infer") table, in the order of its rows."""
    recipes = (train_recipes if kind == "train" else infer_recipes)(s, s.ablations and pair.ablations)
    plan: Plan = []
    for name, recipe in recipes.items():
        if name == "ours" or name.startswith("ours-"):
            plan.append((name, pair.ours, recipe))
        else:
            plan.append((f"{pair.other_name} {name}", pair.other, recipe))
    for offset, (name, model) in enumerate(pair.extra, start=1):
        plan.insert(offset, (name, model, recipes["ours"]))
    return plan


def _row(kind: str, name: str, model: Model, recipe: Recipe, runner: Runner, rates: list[float],
         hw: tuple[int, int], s: Settings) -> Row:  # fmt: skip
    """The row of one timed contender: its rates, memory (training rows but ablations), GFLOPs, note."""
    memory = None
    if kind == "train" and not name.startswith("ours-"):  # ablation rows: speed only
        if s.memory:
            log(f"  peak memory of {name} ...")
        memory = step_memory_mib(runner, model, recipe, hw, s)
    forward = model.outputs if kind == "train" else model.logits
    gflops = gflops_per_image(model.build, forward, hw)
    note = ""
    if isinstance(runner, InferRunner) and recipe.fold_bn:
        note = f"{runner.batchnorms_left} BN left"
    return Row(name, recipe.label, rates, memory, gflops, note)


def pair_table(kind: str, pair: Pair, hw: tuple[int, int], goal: float, s: Settings,
               targets: list[Target]) -> Table:  # fmt: skip
    """Time ``pair`` for ``kind`` ("train" or "infer") at ``hw``, print its table, append its target.

    Args:
        kind: "train" (forward + backward + SGD step) or "infer" (whole-image inference).
        pair: the models compared.
        hw: input (height, width), already one the pair accepts.
        goal: the least ours / theirs ratio the target asks for.
        s: the run's settings.
        targets: the run's targets; this pair's is appended.
    """
    batch = s.train_batch if kind == "train" else s.infer_batch
    iterations = s.train_iters if kind == "train" else s.infer_iters
    plan = plan_pair(kind, pair, s)
    log(f"[{kind} {pair.name}] {batch}x3x{hw[0]}x{hw[1]} on {s.device}: building {len(plan)} contenders")
    runners = {name: make_runner(kind, model, recipe, batch, hw, s) for name, model, recipe in plan}
    log("  built; warming up")
    rates = interleaved_rates(runners, iterations, s.warmup, s.rounds, f"{kind} {pair.name}")
    rows = [
        _row(kind, name, model, recipe, runners[name], rates[name], hw, s) for name, model, recipe in plan
    ]
    what = "training step (forward + backward + SGD)" if kind == "train" else "inference"
    table = Table(
        f"{'Training' if kind == 'train' else 'Inference'}: {pair.title}",
        f"{what}, batch {batch} x 3 x {hw[0]} x {hw[1]}, {NUM_CLASSES} classes, {s.rounds} alternating "
        f"rounds of {iterations} step(s) after {s.warmup} warm-up step(s); GFLOPs: one image's forward pass.",
        rows,
    )
    versus = f"{pair.other_name} {'amp' if s.cuda else 'plain'}"
    target = Target(
        f"{what}, {pair.name} vs {pair.other_name} at {hw[1]}x{hw[0]}", table.ratio(versus), goal, versus
    )
    if s.profile or not target.met:
        for name in ("ours", versus):
            log(f"  profiling {name} ...")
            target.profiles.append((name, profile_runner(runners[name], s.cuda)))
    targets.append(target)
    del runners
    if s.cuda:
        torch.cuda.empty_cache()
    print("\n".join(table.markdown()), flush=True)
    return table
