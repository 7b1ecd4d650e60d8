"""Peak memory of one training step, in MiB above what was allocated before it.

On CUDA: ``torch.cuda.max_memory_allocated`` during one step over the allocation before it (activations,
gradients, workspace). On a CPU, ``tracemalloc`` cannot see torch's allocations, so the contender runs
two steps in a fresh process: the kernel's peak-RSS mark (VmHWM) is reset after building the model and
batch (``/proc/self/clear_refs``, Linux >= 4.0), and the result is the peak's growth over the RSS at
that point. Elsewhere there is no resettable mark and the figure is None (shown as ``-``).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context

import torch

from benchmarks.contenders import Model
from benchmarks.harness import Runner
from benchmarks.recipes import Recipe
from benchmarks.runners import make_runner
from benchmarks.settings import Settings


def proc_status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` (given in kB) in MiB."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_memory_probe(model: Model, recipe: Recipe, batch: int, hw: tuple[int, int], settings: dict) -> float:
    """In a fresh process: peak RSS growth (MiB) during two training steps over the RSS after building."""
    s = Settings(**settings)
    torch.set_num_threads(s.threads)
    runner = make_runner("train", model, recipe, batch, hw, s)
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset VmHWM to the current RSS
    before = proc_status_mib("VmRSS")
    runner.run(2)
    return proc_status_mib("VmHWM") - before


def step_memory_mib(
    runner: Runner, model: Model, recipe: Recipe, hw: tuple[int, int], s: Settings
) -> float | None:
    """Peak memory of one training step of ``runner`` (rebuilt from ``model`` and ``recipe`` on a CPU).

    Returns:
        MiB above the memory in use before the step; None when ``--no-memory`` or not measurable here.
    """
    if not s.memory:
        return None
    if s.cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runner.run(1)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_cpu_memory_probe, model, recipe, runner.batch, hw, asdict(s)).result()
