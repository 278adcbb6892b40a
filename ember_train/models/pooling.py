"""Pooling: token embeddings + attention mask -> one vector per text.

Every pooling mode ignores padding, so a text gives the same vector alone or padded in a batch.
The names match sentence-transformers' ``1_Pooling/config.json`` keys so the export is exact.
"""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "cls", "max", "weighted_mean", "lasttoken")

# sentence-transformers' Pooling config key for each mode.
ST_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "weighted_mean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``[B, L, D]`` token embeddings into ``[B, D]`` using only the real (unmasked) tokens."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    if mode == "mean":
        summed = (token_embeddings * mask).sum(dim=1)
        return summed / mask.sum(dim=1).clamp(min=1e-9)
    if mode == "cls":
        return token_embeddings[:, 0]
    if mode == "max":
        filled = token_embeddings.masked_fill(mask == 0, torch.finfo(token_embeddings.dtype).min)
        return filled.max(dim=1).values
    if mode == "weighted_mean":
        # Position-weighted mean (weights 1..L), as in sentence-transformers' weightedmean mode.
        weights = torch.arange(1, token_embeddings.shape[1] + 1, device=token_embeddings.device)
        weights = weights.to(token_embeddings.dtype).view(1, -1, 1) * mask
        return (token_embeddings * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if mode == "lasttoken":
        # Index of the last real token in each row; works for right padding.
        last = attention_mask.sum(dim=1).long() - 1
        return token_embeddings[torch.arange(token_embeddings.shape[0], device=last.device), last]
    raise ValueError(f"unknown pooling mode {mode!r}; choose one of {POOLING_MODES}")
