"""The encoder's attention function: transformers' SDPA, plus per-text attention for packed batches.

Packed (padding-free) batches (:mod:`ember_train.models.packing`) need attention that keeps each
text to itself, on every device, so every :class:`~ember_train.models.Encoder` backbone gets
:func:`ember_attention` when it is built (:func:`use_ember_attention`). On padded batches it is
SDPA, unless a speedup gave the attention module a dense attention function of its own
(:data:`DENSE_ATTENTION_ATTR`, set by :func:`ember_train.speedups.dropout.use_fast_cpu_dropout`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel

try:  # transformers' attention registry (recent versions; developed against 5.x)
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
except ImportError:  # older transformers: no packed batches
    AttentionInterface = None

ATTENTION_IMPLEMENTATION = "ember"
# An attention module's own dense attention function (transformers' signature), used instead of
# SDPA on padded inputs and on each packed attention group.
DENSE_ATTENTION_ATTR = "ember_dense_attention"


def dense_attention(module: nn.Module) -> Callable:
    """The dense attention function of ``module``: SDPA unless a speedup set its own."""
    return getattr(module, DENSE_ATTENTION_ATTR, sdpa_attention_forward)


def ember_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    packed_layout=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, extended for ember-train's training batches.

    Packed (padding-free) batches: ``packed_layout`` (a
    :class:`~ember_train.models.packing.PackedLayout`, passed through the backbone's keyword
    arguments) regroups the tokens so each text attends only to itself. Otherwise it is the
    module's dense attention (:func:`dense_attention`): SDPA itself, or a speedup's.
    """
    if packed_layout is not None:
        out = packed_layout.attend(
            ember_attention, module, query, key, value, dropout=dropout, scaling=scaling, **kwargs
        )
        return out, None
    return dense_attention(module)(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=is_causal,
        **kwargs,
    )


def use_ember_attention(model: nn.Module) -> None:
    """Give every SDPA transformers model inside ``model`` :func:`ember_attention` (idempotent).

    The choice is not written to ``config.json``: a saved model loads with SDPA as before.
    """
    if AttentionInterface is None:
        return
    if ATTENTION_IMPLEMENTATION not in AttentionInterface():  # registered once, when first used
        AttentionInterface.register(ATTENTION_IMPLEMENTATION, ember_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.config._attn_implementation == "sdpa":
            module.set_attn_implementation(ATTENTION_IMPLEMENTATION)
