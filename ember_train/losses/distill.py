"""Distillation from a teacher's scores: KL between the teacher's and the student's ranking of each group.

A query's group is its positive followed by its ``n`` hard negatives. With teacher scores
``t_i = [t_i0 .. t_in]`` (``t_i0`` for the positive) and student cosine similarities
``s_ij = cos(q_i, d_ij)`` over the same documents:

    p_i = softmax(t_i / T_teacher)          (target)
    log r_i = log_softmax(s_i / T_student)  (input)
    loss = (1 / B) Σ_i KL(p_i || r_i) = (1 / B) Σ_i Σ_j p_ij (log p_ij - log r_ij)

as FlagEmbedding distils (its ``kl_div`` option is the cross-entropy ``-Σ p log r``, which
differs only by the teacher's entropy: same gradient, but this loss is 0 when the student agrees).
Unlike InfoNCE the groups are local to a query, so nothing is gathered across processes; the
mean is still over the *global* batch (a summed count, no host read), so the average of the
processes' gradients equals one process holding the whole batch, also for an uneven last batch.
Computed in fp32 whatever the autocast precision.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ember_train.losses.gather import is_distributed
from ember_train.losses.infonce import _at_least_float32


class DistillationLoss(nn.Module):
    """KL(teacher || student) over each query's group (positive + hard negatives).

    Args:
        temperature: T_student; the student's cosine similarities are divided by it.
        teacher_temperature: T_teacher; the teacher's scores are divided by it (for cosine scores
            from an embedding teacher, its own training temperature; for cross-encoder logits, 1).

    Inputs: ``query [B, D]``, ``positive [B, D]``, ``negatives [B, n, D]``, ``teacher_scores [B, 1 + n]``.
    """

    def __init__(self, temperature: float = 0.05, teacher_temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0 or teacher_temperature <= 0:
            raise ValueError(
                f"temperatures must be > 0, got temperature={temperature}, teacher_temperature={teacher_temperature}"
            )
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature

    def forward(
        self,
        query: torch.Tensor,
        positive: torch.Tensor,
        negatives: torch.Tensor,
        teacher_scores: torch.Tensor,
    ) -> torch.Tensor:
        q = F.normalize(_at_least_float32(query), dim=-1)
        documents = torch.cat([positive.unsqueeze(1), negatives], dim=1)  # [B, 1 + n, D]
        d = F.normalize(_at_least_float32(documents), dim=-1)
        if teacher_scores.shape != d.shape[:2]:
            raise ValueError(
                f"teacher_scores {tuple(teacher_scores.shape)} do not match the groups {tuple(d.shape[:2])}"
            )
        student = torch.einsum("bd,bgd->bg", q, d) / self.temperature
        teacher = teacher_scores.to(device=student.device, dtype=student.dtype) / self.teacher_temperature
        kl = F.kl_div(
            F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), reduction="sum", log_target=True
        )
        if not is_distributed():
            return kl / q.shape[0]
        # Sum over local rows, scaled so that the average over processes is the global mean.
        total = torch.tensor(float(q.shape[0]), device=kl.device, dtype=kl.dtype)
        dist.all_reduce(total)
        return kl * dist.get_world_size() / total
