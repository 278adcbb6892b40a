"""STS: Spearman correlation between cosine similarity and gold similarity scores (MTEB protocol).

Both sentences are embedded symmetrically (``kind=None``). The headline is ``cosine_spearman``
×100; Pearson and the Euclidean/Manhattan variants are reported as MTEB does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ember_train.evaluation import metrics as M
from ember_train.evaluation.base import EvalResult, Evaluator, SupportsEncode, encode, percent


class STSEvaluator(Evaluator):
    """Score sentence pairs; gold scores may use any scale (only ranks/linear fit matter)."""

    task_type = "STS"

    def __init__(
        self,
        sentences1: Sequence[str],
        sentences2: Sequence[str],
        scores: Sequence[float],
        *,
        name: str = "sts",
        split: str = "test",
        batch_size: int = 64,
    ) -> None:
        if not (len(sentences1) == len(sentences2) == len(scores)):
            raise ValueError(
                f"{name}: {len(sentences1)}/{len(sentences2)}/{len(scores)} sentences/sentences/scores"
            )
        if len(scores) < 2:
            raise ValueError(f"{name}: need at least 2 pairs for a correlation")
        self.sentences1 = list(sentences1)
        self.sentences2 = list(sentences2)
        self.scores = [float(s) for s in scores]
        self.name = name
        self.split = split
        self.batch_size = batch_size

    def similarities(self, encoder: SupportsEncode) -> dict[str, torch.Tensor]:
        """Per-pair cosine similarity and negated Euclidean/Manhattan distances (higher = closer)."""
        emb = encode(encoder, self.sentences1 + self.sentences2, batch_size=self.batch_size)
        a, b = emb[: len(self.sentences1)].double(), emb[len(self.sentences1) :].double()
        return {
            "cosine": F.cosine_similarity(a, b, dim=-1),
            "euclidean": -(a - b).norm(dim=-1),
            "manhattan": -(a - b).abs().sum(dim=-1),
        }

    def __call__(self, encoder: SupportsEncode) -> EvalResult:
        fractions: dict[str, float] = {}
        for kind, sims in self.similarities(encoder).items():
            values = sims.numpy()
            fractions[f"{kind}_spearman"] = M.spearman(self.scores, values)
            fractions[f"{kind}_pearson"] = M.pearson(self.scores, values)
        return EvalResult(
            task_type=self.task_type,
            dataset=self.name,
            split=self.split,
            metrics=percent(fractions),
            main_metric="cosine_spearman",
            extra={"num_pairs": len(self.scores)},
        )
