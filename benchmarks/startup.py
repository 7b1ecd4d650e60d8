"""Start-up cost of the command line and of the pure-PyTorch models, each in a fresh interpreter.

    python benchmarks/startup.py            # 5 rounds, interleaved
    python benchmarks/startup.py --rounds 9

Each case is one new ``python`` process (what a user pays per command); rounds interleave the cases so
that a change in the machine's load hits all of them alike; the median and the range are printed with the
load average. The issue's target: ``deeplab-lit --help`` at most 1.5 s more than
``python -c "import lightning.pytorch"``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "import lightning.pytorch": [sys.executable, "-c", "import lightning.pytorch"],
    "import deeplab_lit.models": [sys.executable, "-c", "import deeplab_lit.models"],
    "deeplab-lit --version": [sys.executable, "-m", "deeplab_lit", "--version"],
    "deeplab-lit --help": [sys.executable, "-m", "deeplab_lit", "--help"],
    "deeplab-lit fit --help": [sys.executable, "-m", "deeplab_lit", "fit", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, command in CASES.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    load = os.getloadavg()[0]
    print(f"load average (1 min) at the end: {load:.2f}; {args.rounds} rounds, {os.cpu_count()} CPUs")
    base = statistics.median(times["import lightning.pytorch"])
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:28s} median {median:6.2f} s  (min {min(values):.2f}, max {max(values):.2f})"
            f"  vs import lightning.pytorch: {median - base:+.2f} s"
        )


if __name__ == "__main__":
    main()
