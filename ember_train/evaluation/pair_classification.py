"""Pair classification: is a pair a duplicate/paraphrase? Scored threshold-free (MTEB protocol).

For each similarity (cosine, dot, negated Euclidean, negated Manhattan) we compute the average
precision of the binary labels ranked by that similarity, plus the best accuracy and F1 over all
thresholds. The headline ``max_ap`` is the best AP over cosine, dot and Euclidean (and Manhattan,
as MTEB includes it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ember_train.evaluation import metrics as M
from ember_train.evaluation.base import EvalResult, Evaluator, SupportsEncode, encode, percent


def best_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best accuracy of ``score > t`` over all thresholds ``t`` (ties kept on one side)."""
    order = np.argsort(-scores, kind="mergesort")
    y, s = labels[order], scores[order]
    n, n_pos = len(y), int(y.sum())
    # Predict positive for the first i items (i = 0..n); only cut between distinct scores.
    tp = np.r_[0, np.cumsum(y)]
    fp = np.r_[0, np.cumsum(1 - y)]
    cuts = np.r_[0, np.nonzero(np.diff(s))[0] + 1, n]
    acc = (tp[cuts] + (n - n_pos - fp[cuts])) / n
    return float(acc.max())


def best_f1(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 of ``score > t`` over all thresholds."""
    order = np.argsort(-scores, kind="mergesort")
    y, s = labels[order], scores[order]
    n_pos = int(y.sum())
    if n_pos == 0:
        return 0.0
    cuts = np.r_[np.nonzero(np.diff(s))[0] + 1, len(s)]
    tp = np.cumsum(y)[cuts - 1]
    f1 = 2 * tp / (cuts + n_pos)
    return float(f1.max())


class PairClassificationEvaluator(Evaluator):
    """Labels are 1 (similar) / 0 (dissimilar)."""

    task_type = "PairClassification"

    def __init__(
        self,
        sentences1: Sequence[str],
        sentences2: Sequence[str],
        labels: Sequence[int],
        *,
        name: str = "pair-classification",
        split: str = "test",
        batch_size: int = 64,
    ) -> None:
        if not (len(sentences1) == len(sentences2) == len(labels)):
            raise ValueError(
                f"{name}: {len(sentences1)}/{len(sentences2)}/{len(labels)} sentences/sentences/labels"
            )
        bad = sorted({int(v) for v in labels} - {0, 1})
        if bad:
            raise ValueError(f"{name}: labels must be 0 or 1, found {bad}")
        if len(set(int(v) for v in labels)) < 2:
            raise ValueError(f"{name}: need both positive and negative pairs")
        self.sentences1 = list(sentences1)
        self.sentences2 = list(sentences2)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name = name
        self.split = split
        self.batch_size = batch_size

    def __call__(self, encoder: SupportsEncode) -> EvalResult:
        emb = encode(encoder, self.sentences1 + self.sentences2, batch_size=self.batch_size).double()
        a, b = emb[: len(self.sentences1)], emb[len(self.sentences1) :]
        an, bn = (
            a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12),
            b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12),
        )
        sims = {
            "cosine": (an * bn).sum(-1),
            "dot": (a * b).sum(-1),
            "euclidean": -(a - b).norm(dim=-1),
            "manhattan": -(a - b).abs().sum(-1),
        }
        fractions: dict[str, float] = {}
        for kind, values in sims.items():
            s = values.numpy()
            fractions[f"{kind}_ap"] = M.average_precision(self.labels, s)
            fractions[f"{kind}_accuracy"] = best_accuracy(self.labels, s)
            fractions[f"{kind}_f1"] = best_f1(self.labels, s)
        fractions["max_ap"] = max(fractions[f"{k}_ap"] for k in sims)
        fractions["max_accuracy"] = max(fractions[f"{k}_accuracy"] for k in sims)
        fractions["max_f1"] = max(fractions[f"{k}_f1"] for k in sims)
        return EvalResult(
            task_type=self.task_type,
            dataset=self.name,
            split=self.split,
            metrics=percent(fractions),
            main_metric="max_ap",
            extra={"num_pairs": len(self.labels)},
        )
