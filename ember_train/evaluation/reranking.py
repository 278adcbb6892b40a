"""Reranking: order each query's candidates by cosine similarity; MAP and MRR@10 (MTEB protocol).

Queries are embedded with ``kind="query"`` and candidates with ``kind="document"``. AP per
query is sklearn's ``average_precision_score`` over all its candidates (ours is the same
definition, tie-aware); queries without both a positive and a negative are skipped, as MTEB does.
Headline: ``map`` ×100.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F

from ember_train.evaluation import metrics as M
from ember_train.evaluation.base import EvalResult, Evaluator, SupportsEncode, encode, percent

logger = logging.getLogger(__name__)


@dataclass
class RerankSample:
    query: str
    positive: list[str]
    negative: list[str]


class RerankingEvaluator(Evaluator):
    task_type = "Reranking"

    def __init__(
        self,
        samples: Sequence[RerankSample | dict],
        *,
        name: str = "reranking",
        split: str = "test",
        mrr_at_k: int = 10,
        batch_size: int = 64,
    ) -> None:
        parsed = [
            s
            if isinstance(s, RerankSample)
            else RerankSample(s["query"], list(s["positive"]), list(s["negative"]))
            for s in samples
        ]
        self.samples = [s for s in parsed if s.positive and s.negative]
        if len(self.samples) < len(parsed):
            logger.info(
                "%s: %d queries lack a positive or a negative and are skipped",
                name,
                len(parsed) - len(self.samples),
            )
        if not self.samples:
            raise ValueError(f"{name}: no query has both positive and negative candidates")
        self.name = name
        self.split = split
        self.mrr_at_k = mrr_at_k
        self.batch_size = batch_size

    def __call__(self, encoder: SupportsEncode) -> EvalResult:
        q_emb = encode(encoder, [s.query for s in self.samples], batch_size=self.batch_size, kind="query")
        docs = [d for s in self.samples for d in (*s.positive, *s.negative)]
        d_emb = encode(encoder, docs, batch_size=self.batch_size, kind="document")
        q_emb, d_emb = F.normalize(q_emb.double(), dim=-1), F.normalize(d_emb.double(), dim=-1)
        aps, mrrs = [], []
        start = 0
        for i, s in enumerate(self.samples):
            n = len(s.positive) + len(s.negative)
            scores = (d_emb[start : start + n] @ q_emb[i]).numpy()
            start += n
            labels = np.r_[
                np.ones(len(s.positive), dtype=np.int64), np.zeros(len(s.negative), dtype=np.int64)
            ]
            aps.append(M.average_precision(labels, scores))
            order = np.argsort(-scores, kind="stable")
            ranking = [str(j) for j in order]
            mrrs.append(M.mrr_at_k(ranking, {str(j): 1 for j in range(len(s.positive))}, self.mrr_at_k))
        fractions = {"map": float(np.mean(aps)), f"mrr@{self.mrr_at_k}": float(np.mean(mrrs))}
        return EvalResult(
            task_type=self.task_type,
            dataset=self.name,
            split=self.split,
            metrics=percent(fractions),
            main_metric="map",
            extra={"num_queries": len(self.samples)},
        )
