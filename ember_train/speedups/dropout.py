"""Cheaper dropout for training on CPU: the same Bernoulli dropout, its mask computed where it is applied.

PyTorch draws a CPU dropout mask with ``bernoulli_``: one double-precision sample per element,
on one thread on CPUs where it does not use MKL (AMD, for one). That was 14% of a contrastive
step of all-MiniLM-L6-v2 on this project's development machine
(``python -m benchmarks.profile_contrastive_step``), and attention-probability dropout also sends
``scaled_dot_product_attention`` to its slowest path. Here a mask is a function of one seed (drawn
from torch's generator) and each element's index: a 16-bit uniform from an integer hash of the
index (``dropout_kernel.c`` defines it), compared with a threshold. For float32, a small C kernel
(:mod:`ember_train.speedups.dropout_kernel`) computes the mask and applies it in one pass, forward
and again in backward, so no mask is drawn, stored or converted; without a C compiler, and for
other dtypes, the same mask is made as booleans. The keep probability is rounded to a multiple of
1/65536 (0.9 becomes 0.899994) and kept values are scaled by exactly its inverse, so the
expectation of every activation is unchanged.

Only the CPU changes: :func:`use_fast_cpu_dropout` is applied by the training loop when it runs
on CPU (``train.fast_cpu_dropout``), and on any other device the modules fall back to PyTorch's
fused kernels. Attention dropout goes through :func:`seeded_dropout_attention`, which it installs
as the attention modules' dense attention (:mod:`ember_train.models.attention`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ember_train.models.attention import DENSE_ATTENTION_ATTR, sdpa_attention_forward, use_ember_attention
from ember_train.speedups import dropout_kernel

_LEVELS = 1 << 16
_MAX_ELEMENTS = 1 << 33  # the hash's 32-bit counter covers two elements each


def keep_probability(p: float) -> float:
    """The keep probability the masks really have: ``1 - p`` rounded to a multiple of 1/65536."""
    return round((1.0 - p) * _LEVELS) / _LEVELS


def _threshold(p: float) -> int:
    return round(keep_probability(p) * _LEVELS)


def _draw_seed() -> int:
    """One seed per mask, from torch's default generator: ``torch.manual_seed``, checkpointed RNG
    states, activation checkpointing and the gradient cache's replay all reproduce the masks."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _mix32(x: np.ndarray) -> np.ndarray:
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def numpy_keep_mask(numel: int, seed: int, threshold: int) -> np.ndarray:
    """The mask ``dropout_kernel.c`` computes, in NumPy: used where the kernel cannot be built."""
    blocks = -(-numel // 16)
    counters = np.arange(blocks * 8, dtype=np.uint32)
    hashes = _mix32(_mix32(counters ^ np.uint32(seed & 0xFFFFFFFF)) ^ np.uint32(seed >> 32)).reshape(
        blocks, 1, 8
    )
    uniforms = np.empty((blocks, 2, 8), dtype=np.uint32)
    np.bitwise_and(hashes, np.uint32(0xFFFF), out=uniforms[:, :1])
    np.right_shift(hashes, np.uint32(16), out=uniforms[:, 1:])
    return uniforms.reshape(-1)[:numel] < threshold


def _mask_from_seed(shape: torch.Size | tuple[int, ...], seed: int, threshold: int) -> torch.Tensor:
    with torch.profiler.record_function("ember_train::keep_mask"):
        if dropout_kernel.load() is not None:
            return dropout_kernel.keep_mask(shape, seed, threshold)
        return torch.from_numpy(numpy_keep_mask(math.prod(shape), seed, threshold)).view(shape)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A boolean CPU mask, True with probability :func:`keep_probability` (p), independently per element.

    It draws one seed from torch's generator, like :func:`fast_dropout`: after the same
    ``torch.manual_seed``, this is the mask ``fast_dropout`` applies to a tensor of ``shape``.
    """
    return _mask_from_seed(shape, _draw_seed(), _threshold(p))


class _ScaleByMask(torch.autograd.Function):
    """``x * mask * scale`` with the boolean mask saved for backward (not a float copy of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return x.mul(mask).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad.mul(mask).mul_(ctx.scale), None, None


class _SeededDropout(torch.autograd.Function):
    """Float32 dropout by the C kernel: backward recomputes the mask from the seed (nothing saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, seed: int, threshold: int, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.mask_args = (seed, threshold, scale)
        return dropout_kernel.dropout_f32(x, seed, threshold, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        return dropout_kernel.dropout_f32(grad, *ctx.mask_args), None, None, None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout with the seeded masks on CPU; PyTorch's own dropout on other devices."""
    if not training or p == 0.0:
        return x
    keep = keep_probability(p)
    if x.device.type != "cpu" or not 0.0 < keep < 1.0 or x.numel() >= _MAX_ELEMENTS:
        return F.dropout(x, p, training=True)  # other devices; p = 1; p below 1/131072; huge
    seed, threshold, scale = _draw_seed(), _threshold(p), 1.0 / keep
    if x.dtype == torch.float32 and dropout_kernel.load() is not None:
        return _SeededDropout.apply(x, seed, threshold, scale)
    return _ScaleByMask.apply(x, _mask_from_seed(x.shape, seed, threshold), scale)


class FastCPUDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same place in the model) whose CPU masks come from :func:`keep_mask`."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return fast_dropout(input, self.p, self.training)


def seeded_dropout_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
) -> tuple[torch.Tensor, None]:
    """Dense attention whose attention-probability dropout on CPU is :func:`fast_dropout`.

    :func:`use_fast_cpu_dropout` gives it to each attention module whose dropout it swapped (the
    module's dense attention, :func:`ember_train.models.attention.dense_attention`). It applies
    when the module's own dropout is a :class:`FastCPUDropout`; otherwise (evaluation, other
    devices, or what the explicit path below does not cover: causal or grouped-query attention,
    position biases, soft-capping) it *is* SDPA.
    """
    dropout, scaling, is_causal = kwargs.get("dropout", 0.0), kwargs.get("scaling"), kwargs.get("is_causal")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (
        dropout == 0.0
        or query.device.type != "cpu"
        or not isinstance(getattr(module, "dropout", None), FastCPUDropout)
        or causal
        or getattr(module, "num_key_value_groups", 1) != 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # Scale and mask go into the score matmul (baddbmm's alpha and bias): no extra passes over the
    # [B, H, L, L] scores, forward or backward (a MiniLM step 1.04-1.06x faster than matmul,
    # multiply and where).
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    batch, heads, length, head_dim = query.shape
    keys = key.shape[-2]
    q = query.reshape(batch * heads, length, head_dim)
    k = key.reshape(batch * heads, keys, head_dim)
    v = value.reshape(batch * heads, keys, head_dim)
    if attention_mask is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:
        if attention_mask.dtype == torch.bool:  # SDPA masks: True = attend
            bias = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
            bias.masked_fill_(~attention_mask, torch.finfo(query.dtype).min)
        else:
            bias = attention_mask.to(query.dtype)
        bias = bias.expand(batch, heads, bias.shape[-2], keys).reshape(batch * heads, -1, keys)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    probs = fast_dropout(scores.softmax(dim=-1), dropout)
    out = torch.bmm(probs, v).view(batch, heads, length, head_dim)
    return out.transpose(1, 2).contiguous(), None


def use_fast_cpu_dropout(model: nn.Module) -> int:
    """Swap every ``nn.Dropout`` in ``model`` for :class:`FastCPUDropout`, with :func:`seeded_dropout_attention`.

    Returns how many dropout modules were swapped. Idempotent. Parameters, state dicts and saved
    configs do not change.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastCPUDropout(child.p, child.inplace).train(child.training))
                swapped += 1
        if isinstance(getattr(parent, "dropout", None), FastCPUDropout):  # an attention module's
            setattr(parent, DENSE_ATTENTION_ATTR, seeded_dropout_attention)
    use_ember_attention(model)
    return swapped
