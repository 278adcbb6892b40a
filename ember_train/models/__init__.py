"""Models: the shared encoder (backbone + pooling) and what is built around it.

``encoder`` (the :class:`Encoder` every pipeline trains), ``pooling``, ``attention`` (SDPA plus
per-text attention for packed batches), ``packing`` (the packed rows the encoder reads),
``retromae`` (encoder + decoder for pretraining), ``heads`` (classification heads), ``setfit``
(encoder + head, saved as one directory) and ``sentence_transformers`` (the saved format, read
and written).
"""

from ember_train.models.encoder import Encoder, TextKind
from ember_train.models.pooling import POOLING_MODES, pool

__all__ = ["Encoder", "TextKind", "POOLING_MODES", "pool"]
