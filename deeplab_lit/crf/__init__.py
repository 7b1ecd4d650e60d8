"""Fully-connected (dense) CRF post-processing for DeepLab v1/v2, with two interchangeable backends.

* ``pydensecrf``: Krähenbühl's C++ reference (``pip install pydensecrf2``), one image per worker process.
* ``torch``: the same mean-field inference with permutohedral-lattice filtering in PyTorch, batched, on
  the CPU or the GPU.

:class:`CRFasRNN` is the same CRF as a trainable layer (CRF-as-RNN), trained with the network.

Pure numpy/torch: nothing here knows about Lightning, data or models.

Example:
    >>> refined = dense_crf(logits.softmax(1), raw_uint8_images, CRFParams.from_preset("deeplab_v2"))
"""

from deeplab_lit.crf.dense import BACKENDS, PROB_EPS, dense_crf
from deeplab_lit.crf.params import PRESETS, CRFParams
from deeplab_lit.crf.permutohedral import PermutohedralLattice
from deeplab_lit.crf.trainable import CRFasRNN

__all__ = ["BACKENDS", "PRESETS", "PROB_EPS", "CRFParams", "CRFasRNN", "PermutohedralLattice", "dense_crf"]
