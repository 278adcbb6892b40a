"""Load a model for evaluation or mining the way it was exported.

:meth:`Encoder.from_pretrained` already takes pooling, normalisation, max length and prompts
from a sentence-transformers directory when they are left unset; this wrapper only exposes the
overrides the CLI offers, moves the model to a device and puts it in eval mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ember_train.models import Encoder

logger = logging.getLogger(__name__)


def load_encoder(model: str | Path, *, device: str | None = None, **settings) -> Encoder:
    """An :class:`Encoder` in eval mode on ``device``.

    ``settings`` are :meth:`Encoder.from_pretrained`'s keyword arguments (``max_seq_length``,
    ``pooling``, ...); those left ``None`` keep the checkpoint's own.
    """
    encoder = Encoder.from_pretrained(model, **settings)
    if device:
        encoder.to(device)
    logger.info(
        "loaded %s: pooling=%s normalize=%s max_seq_length=%d",
        model,
        encoder.pooling,
        encoder.normalize,
        encoder.max_seq_length,
    )
    return encoder.eval()
