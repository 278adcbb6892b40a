"""Pair losses on cosine similarity: SetFit's regression loss, and CoSENT as an option.

Both take two embedding batches ``a [B, D]``, ``b [B, D]`` and a target per pair in ``[0, 1]``:
1/0 for SetFit positive/negative pairs, or an STS score normalised to ``[0, 1]``
(:func:`ember_train.data.labelled.normalize_scores`).

* ``cosine_mse``: ``mean_i (cos(a_i, b_i) - y_i)^2``. Pulls positives to cosine 1 and pushes
  negatives to cosine 0 (orthogonal, not opposite), as SetFit does.
* ``cosent``: ``log(1 + Σ_{(i,j): y_i > y_j} exp(λ · (cos_j - cos_i)))``. Only the *order* of the
  targets matters: every pair the batch says is more similar must get a higher cosine. Often
  better for graded STS scores; ``λ = 20`` as in the CoSENT paper.

Both are computed in fp32 whatever the autocast precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOSSES = ("cosine_mse", "cosent")


def pair_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity ``[B]`` in fp32."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


class CosineMSELoss(nn.Module):
    """Mean squared error between each pair's cosine and its target."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pair_cosine(a, b), target.float().to(a.device))


class CoSENTLoss(nn.Module):
    """CoSENT ranking loss over all ordered pairs of pairs in the batch.

    Args:
        scale: λ, the inverse temperature of the cosine differences.
    """

    def __init__(self, scale: float = 20.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        cos = pair_cosine(a, b) * self.scale
        target = target.float().to(a.device)
        # diff[i, j] = λ(cos_j - cos_i), kept only where pair i should be more similar than pair j.
        diff = cos[None, :] - cos[:, None]
        ordered = target[:, None] > target[None, :]
        diff = diff.masked_fill(~ordered, float("-inf"))
        # log(1 + Σ exp(x)) = logsumexp([0, x...]); a batch with one target level gives 0.
        zero = torch.zeros(1, device=cos.device, dtype=cos.dtype)
        return torch.logsumexp(torch.cat([zero, diff.flatten()]), dim=0)


def build_pair_loss(name: str, *, cosent_scale: float = 20.0) -> nn.Module:
    """The loss named in the config (``cosine_mse`` or ``cosent``)."""
    if name == "cosine_mse":
        return CosineMSELoss()
    if name == "cosent":
        return CoSENTLoss(scale=cosent_scale)
    raise ValueError(f"unknown pair loss {name!r}; choose one of {LOSSES}")
