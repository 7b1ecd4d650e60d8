"""Benchmarks of deeplab_lit: scripts that print figures, and the parts the speed suite is made of.

Entry points (run from the repository root; see benchmarks/README.md):

- ``speed.py``: our DeepLab against torchvision and segmentation_models_pytorch, the data pipeline and
  every version; writes its tables into BENCHMARKS.md.
- ``crf_speed.py``, ``eval_memory.py``, ``preflight_speed.py``: standalone scripts.

The speed suite, one job per file:

- ``harness.py``: timing in interleaved rounds, FLOPs per image, a profile of one step, progress lines;
  nothing in it is specific to segmentation, so any script here can time its contenders with it.
- ``settings.py``: sizes, counts and switches of a run, with each device's defaults.
- ``contenders.py``: the models timed (ours, torchvision's, smp's, every version) and the shared loss.
- ``recipes.py``: which speed tricks each contender uses, and applying them (the one import of the
  training module's acceleration helpers).
- ``runners.py``: one contender's training step or inference pass, ready to be timed.
- ``memory.py``: peak memory of one training step.
- ``sections/``: one file per section of the report (``train``, ``infer``, ``data``, ``versions``;
  ``pairs.py`` times one pair of models under every recipe for the first two).
- ``report.py``: result tables and targets as markdown, the machine's description, the BENCHMARKS.md
  writer.
"""
