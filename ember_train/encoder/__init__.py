"""The shared encoder: backbone + pooling, used by every pipeline."""

from ember_train.encoder.encoder import Encoder, TextKind
from ember_train.encoder.pooling import POOLING_MODES, pool

__all__ = ["Encoder", "TextKind", "POOLING_MODES", "pool"]
