"""The test suite, laid out as the package it tests.

``tests/<sub>/test_<module>.py`` tests ``deeplab_lit/<sub>/<module>.py`` (``models``, ``modules``, ``data``,
``callbacks``, ``crf``), ``tests/test_<module>.py`` a top-level module such as ``deeplab_lit/metrics.py``;
``tests/integration/`` runs the whole program: every config through the CLI, DDP, notebooks, GPU, signals
sent to child processes. Shared helpers are modules of this package (``tests.fakes``: tiny data sets in the
real layouts; ``tests.tolerances``), imported as such: the repository root is on ``sys.path`` (pytest's
``pythonpath``; a subprocess gets it through ``PYTHONPATH``).
"""
