"""Load a model for evaluation or mining the way it was exported.

:meth:`Encoder.from_pretrained` already takes pooling, normalisation, max length and prompts
from a sentence-transformers directory when they are left unset; this wrapper only exposes the
overrides the CLI offers, moves the model to a device and puts it in eval mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ember_train.encoder import Encoder

logger = logging.getLogger(__name__)


def load_encoder(
    model: str | Path,
    *,
    pooling: str | None = None,
    normalize: bool | None = None,
    max_seq_length: int | None = None,
    query_prefix: str | None = None,
    document_prefix: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
) -> Encoder:
    """An :class:`Encoder` in eval mode; ``None`` arguments keep the checkpoint's own settings."""
    encoder = Encoder.from_pretrained(
        model,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
        query_prefix=query_prefix,
        document_prefix=document_prefix,
        trust_remote_code=trust_remote_code,
    )
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
