"""InfoNCE with in-batch negatives, optional hard negatives, optionally across devices.

For query ``i`` the candidates are every positive in the (global) batch plus every hard
negative; its own positive is the target:

    loss_i = -log( exp(cos(q_i, p_i) / τ) / Σ_d exp(cos(q_i, d) / τ) )

With ``symmetric`` a document→query term (each positive must pick its query among all queries)
is averaged in. Similarities and the loss are computed in fp32 whatever the autocast precision.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ember_train.losses.gather import gather_with_grad, is_distributed

logger = logging.getLogger(__name__)


class InfoNCELoss(nn.Module):
    """Contrastive loss over (query, positive[, negatives]) embeddings.

    Args:
        temperature: τ; cosine similarities are divided by it. 0.01-0.05 is usual (0.02 default).
            A value above 1 is almost certainly a *scale* (e.g. 20 = 1/0.05) and is warned about.
        symmetric: add the document→query direction (positives against all queries).
        gather_across_devices: under data parallelism, use every process's positives and
            negatives as candidates. Gradients are exact: with the loss scaled by
            ``world_size / global_batch``, DDP's gradient average equals the gradient of one
            process holding the whole global batch.

    Inputs: ``query [B, D]``, ``positive [B, D]``, ``negatives [B, n, D]`` or ``None``.
    """

    def __init__(
        self, temperature: float = 0.02, symmetric: bool = False, gather_across_devices: bool = False
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if temperature > 1:
            warnings.warn(
                f"temperature={temperature} looks like a scale: InfoNCE divides similarities by the temperature "
                f"(a scale of 20 is temperature 0.05)",
                stacklevel=2,
            )
        self.temperature = temperature
        self.symmetric = symmetric
        self.gather_across_devices = gather_across_devices

    def forward(
        self, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = F.normalize(_at_least_float32(query), dim=-1)
        p = F.normalize(_at_least_float32(positive), dim=-1)
        n = F.normalize(_at_least_float32(negatives), dim=-1).flatten(0, 1) if negatives is not None else None
        batch = q.shape[0]

        offset = 0
        total = batch
        world = 1
        if self.gather_across_devices and is_distributed():
            import torch.distributed as dist

            world = dist.get_world_size()
            p, offset = gather_with_grad(p)
            if n is not None:
                n, _ = gather_with_grad(n)
            total = p.shape[0]  # the global batch: one positive per query

        candidates = p if n is None else torch.cat([p, n], dim=0)
        scores = q @ candidates.T / self.temperature  # [B, global positives + negatives]
        labels = torch.arange(batch, device=q.device) + offset
        loss = F.cross_entropy(scores, labels, reduction="sum")

        if self.symmetric:
            local_p = F.normalize(_at_least_float32(positive), dim=-1)
            all_q = q
            if self.gather_across_devices and is_distributed():
                all_q, _ = gather_with_grad(q)
            doc_scores = local_p @ all_q.T / self.temperature
            loss = (loss + F.cross_entropy(doc_scores, labels, reduction="sum")) / 2
        # Sum over local rows, scaled so that the average over processes is the global mean.
        return loss * world / total


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Scores in float32 at least: bf16/fp16 embeddings are upcast, float64 (tests of equal formulas) kept."""
    return x if x.dtype == torch.float64 else x.float()
