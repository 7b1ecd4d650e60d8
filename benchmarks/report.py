"""Report: result tables and targets as markdown, the machine's description, and the BENCHMARKS.md block.

Each table gives the median images/s over rounds with the range, ours' rate over each row's, peak step
memory and GFLOPs. Targets compare ours with the reference the goal is set against; a missed target
carries a ``torch.profiler`` table of both steps. The whole report goes between :data:`BEGIN` and
:data:`END` in the output file, whose other content is kept.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from benchmarks.settings import Settings

BEGIN, END = "<!-- speed.py: begin -->", "<!-- speed.py: end -->"


def markers(block: str = "") -> tuple[str, str]:
    """The begin and end markers of a named block of the report (``""``: the main one, :data:`BEGIN`)."""
    name = f" {block}" if block else ""
    return f"<!-- speed.py{name}: begin -->", f"<!-- speed.py{name}: end -->"


@dataclass
class Row:
    """One contender's results: images/s per round, peak step memory, GFLOPs, and a note."""

    name: str
    recipe: str
    rates: list[float]
    memory_mib: float | None = None
    gflops: float | None = None
    note: str = ""

    @property
    def median(self) -> float:
        """Median images/s over rounds (robust to one disturbed round)."""
        return statistics.median(self.rates)

    @property
    def spread(self) -> str:
        """The range of images/s over rounds, as text."""
        return f"{min(self.rates):.2f}-{max(self.rates):.2f}"


@dataclass
class Table:
    """One table of contenders timed together; ratios are the reference row's rate over each row's."""

    title: str
    setting: str
    rows: list[Row]
    reference: str = "ours"

    def row(self, name: str) -> Row:
        """The row called ``name``."""
        return next(r for r in self.rows if r.name == name)

    def ratio(self, name: str) -> float:
        """The reference's median images/s over row ``name``'s (above 1: the reference is faster)."""
        return self.row(self.reference).median / self.row(name).median

    def markdown(self) -> list[str]:
        """The table's title, setting and rows as markdown lines, ending with a blank line."""
        lines = [f"### {self.title}", "", self.setting, ""]
        lines += [
            "| model | recipe | images/s (median) | range | ours / this | peak step memory (MiB) | GFLOPs |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            memory = f"{row.memory_mib:.0f}" if row.memory_mib is not None else "-"
            gflops = f"{row.gflops:.1f}" if row.gflops is not None else "-"
            note = f" ({row.note})" if row.note else ""
            lines.append(
                f"| {row.name} | {row.recipe}{note} | {row.median:.2f} | {row.spread} "
                f"| {self.ratio(row.name):.2f}x | {memory} | {gflops} |"
            )
        return [*lines, ""]


@dataclass
class Target:
    """A goal for ours / theirs (``ratio``; None when not measured), with profiles when it is missed."""

    what: str
    ratio: float | None
    goal: float
    versus: str
    profiles: list[tuple[str, str]] = field(default_factory=list)  # (contender, profiler table)

    @property
    def met(self) -> bool | None:
        """Whether the ratio reaches the goal; None when there is no ratio."""
        return None if self.ratio is None else self.ratio >= self.goal


def targets_markdown(targets: list[Target]) -> list[str]:
    """The targets table, then the profiles of the targets that carry them."""
    lines = ["### Targets", "", "| what | ours / theirs | goal | met |", "|---|---:|---:|---|"]
    for target in targets:
        ratio = "-" if target.ratio is None else f"{target.ratio:.2f}x"
        met = {True: "yes", False: "**no**", None: "-"}[target.met]
        lines.append(f"| {target.what} (vs {target.versus}) | {ratio} | {target.goal:.1f}x | {met} |")
    lines.append("")
    profiled = [t for t in targets if t.profiles]
    if profiled:
        lines += ["### Where the time goes", ""]
        for target in profiled:
            for name, table in target.profiles:
                lines += [
                    f"{target.what}: **{name}**, one step (torch.profiler, top ops by self time)",
                    "",
                    "```",
                ]
                lines += [table, "```", ""]
    return lines


def _version_of(package: str) -> str:
    """The installed version of ``package``, or "not installed"."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as file:
        for line in file:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def environment(s: Settings, load_start: tuple[float, ...]) -> list[str]:
    """Date, device, software, load average at start and end, and the command, as markdown bullets.

    A machine busy at the start (load above half its cores) gets a warning first: with more runnable
    threads than cores, torch's multi-threaded kernels wait on descheduled threads.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = f"CPU {cpu_name()}, {cores} cores available, torch threads {torch.get_num_threads()}"
    if s.cuda:
        device = (
            f"GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark on, AMP {s.amp_dtype}); {device}"
        )
    packages = ", ".join(
        f"{name} {_version_of(dist)}"
        for name, dist in (("torch", "torch"), ("torchvision", "torchvision"),
                           ("smp", "segmentation-models-pytorch"), ("timm", "timm"),
                           ("lightning", "lightning"), ("albumentations", "albumentations"))
    )  # fmt: skip
    load_end = os.getloadavg()
    busy = []
    if load_start[0] > 0.5 * (cores or 1):  # before our own work: others' load
        busy = [
            f"- **Warning: the machine was busy at the start (load average {load_start[0]:.1f} on {cores} "
            "cores): these timings are not trustworthy. With more runnable threads than cores, torch's "
            "multi-threaded kernels wait on descheduled threads; `--threads 1` suffers least.**"
        ]
    return [
        *busy,
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
        f"- Device: {device}",
        f"- Software: Python {platform.python_version()}, {packages}",
        f"- Load average (1/5/15 min) at start {load_start[0]:.1f}/{load_start[1]:.1f}/{load_start[2]:.1f}, "
        f"at end {load_end[0]:.1f}/{load_end[1]:.1f}/{load_end[2]:.1f}",
        f"- Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`",
        "",
    ]


def write_report(path: Path, lines: list[str], block_name: str = "") -> None:
    """Write ``lines`` between the markers in ``path``, replacing an earlier block and keeping the rest.

    ``block_name`` names a block of its own (:func:`markers`), so a section run alone keeps the others. A
    file without the markers gets the block appended; a missing file starts as "# Benchmarks".
    """
    begin, end = markers(block_name)
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
