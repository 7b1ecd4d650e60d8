"""Timing harness: contenders timed in interleaved rounds, forward FLOPs per image, a profile of one step.

Nothing here knows about segmentation: a contender is a :class:`Runner` (a ``step`` and a batch size),
so any script in ``benchmarks/`` can time its own contenders the same way.

Method. Every contender is built first and warmed up; then all are timed in rounds of alternating order
(A B C, C B A, ...), so that a machine's drift (clocks, other load) spreads over all of them instead of
favouring whichever ran first. CUDA is synchronised before and after every timed run. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` on the meta device (2 per multiply-add; nothing is computed).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

_START = time.perf_counter()


def log(message: str) -> None:
    """Print a progress line with the seconds since the start, so that slow steps show themselves."""
    print(f"[{time.perf_counter() - _START:6.0f} s] {message}", flush=True)


def synchronize(device: str) -> None:
    """Wait for queued CUDA work on ``device`` ("cpu": nothing to wait for), so timings are whole."""
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One contender: subclasses set ``batch`` and ``device`` and define ``step``; ``run`` times steps."""

    batch: int
    device: str

    def step(self) -> None:
        """Do one unit of work (a training step, a forward pass, a loader batch)."""
        raise NotImplementedError

    def run(self, iterations: int) -> float:
        """Seconds taken by ``iterations`` steps, CUDA synchronised before and after."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(iterations):
            self.step()
        synchronize(self.device)
        return time.perf_counter() - start


def interleaved_rates(
    runners: dict[str, Runner], iterations: int, warmup: int, rounds: int, title: str
) -> dict[str, list[float]]:
    """Warm every runner up, then time all of them in rounds of alternating order.

    Args:
        runners: the contenders, by row name; the order of the first round.
        iterations: steps per timed run.
        warmup: untimed steps of each runner before the first round (cuDNN autotuning, compilation).
        rounds: timed rounds; odd rounds run the contenders in reverse order.
        title: names the rounds in the progress lines.

    Returns:
        Images (batch items) per second of each runner, one value per round.
    """
    for runner in runners.values():
        for _ in range(warmup):
            runner.run(1)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            runner = runners[name]
            rates[name].append(iterations * runner.batch / runner.run(iterations))
        summary = ", ".join(f"{n} {r[-1]:.2f}" for n, r in rates.items())
        log(f"  {title} round {index + 1}/{rounds} (img/s): {summary}")
    return rates


def gflops_per_image(
    build: Callable[[], nn.Module], forward: Callable[[nn.Module, Tensor], object], hw: tuple[int, int]
) -> float:
    """Forward GFLOPs for one image of ``hw`` (height, width), counted on the meta device.

    Args:
        build: makes the network; it is built on the meta device, so no weights are allocated.
        forward: runs the network on an image batch the way the timed contender does (e.g. with or
            without auxiliary heads). The network is in eval mode (BatchNorm as a fixed affine map).
        hw: the image's (height, width).
    """
    with torch.device("meta"):
        model = build()
    model.eval()
    images = torch.empty(1, 3, *hw, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        forward(model, images)
    return counter.get_total_flops() / 1e9


def profile_runner(runner: Runner, cuda: bool, rows: int = 15) -> str:
    """A ``torch.profiler`` table of one step (after one untimed step): top ops by self CPU/CUDA time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    runner.run(1)
    with profile(activities=activities) as prof:
        runner.run(1)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)
