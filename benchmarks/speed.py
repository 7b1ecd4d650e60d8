"""Speed suite's entry point: our DeepLab against torchvision and segmentation_models_pytorch, and more.

    python benchmarks/speed.py --device cpu                  # CPU settings (see README for the time it takes)
    python benchmarks/speed.py --device cuda                 # GPU settings: 8x3x513x513 training, AMP
    python benchmarks/speed.py --device cpu --quick          # tiny sizes: checks that it runs; no figures
    python benchmarks/speed.py --sections train infer        # a subset of: train, infer, data, versions
    python benchmarks/speed.py --help                        # what each section measures, every option

The options and the order of the sections are in ``benchmarks/suite.py``; the parts it is made of are
listed in ``benchmarks/__init__.py``. ``python -m benchmarks.speed`` works as well.
"""

import sys
from pathlib import Path

if not __package__:  # run as a script: import `benchmarks` from the repository root, not its own folder
    _HERE = Path(__file__).resolve().parent
    sys.path[:] = [str(_HERE.parent), *(p for p in sys.path if Path(p or ".").resolve() != _HERE)]

from benchmarks.suite import main

if __name__ == "__main__":
    main()
