"""Sections of the speed report, one per file: ``train``, ``infer``, ``data``, ``versions``.

``pairs.py`` is not a section: it times one pair of models under every recipe, the table that the
train and infer sections are made of.
"""
