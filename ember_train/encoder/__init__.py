"""The shared encoder: backbone + pooling, used by every pipeline."""

from ember_train.encoder.encoder import Encoder, TextKind, restore_order
from ember_train.encoder.pooling import POOLING_MODES, pool

__all__ = ["Encoder", "TextKind", "POOLING_MODES", "pool", "restore_order"]
