"""Evaluation metrics as pure functions on plain Python/NumPy inputs.

Everything here returns fractions in ``0..1`` (correlations in ``-1..1``); the evaluators scale
by 100 when they build an :class:`~ember_train.evaluation.base.EvalResult`, as MTEB reports.

Ranking metrics follow ``trec_eval`` (which MTEB uses through ``pytrec_eval``): a document is
relevant when its grade is ``>= 1``, nDCG uses the grade itself as the gain (linear gain) with a
``log2(rank + 1)`` discount, and the ideal ranking is built from every judged document, including
judged documents the system never retrieved.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _relevant(qrels: Mapping[str, int]) -> set[str]:
    return {doc for doc, grade in qrels.items() if grade >= 1}


def dcg(gains: Sequence[float]) -> float:
    """Discounted cumulative gain of gains listed in rank order (rank 1 first)."""
    return float(sum(g / math.log2(i + 2) for i, g in enumerate(gains)))


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """nDCG@k with graded relevance: ``DCG(top k) / DCG(ideal top k)``; 0 if nothing is relevant."""
    gains = [max(qrels.get(doc, 0), 0) for doc in ranking[:k]]
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    ideal_dcg = dcg(ideal)
    return dcg(gains) / ideal_dcg if ideal_dcg > 0 else 0.0


def mrr_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """Reciprocal rank of the first relevant document within the top ``k`` (0 if none)."""
    relevant = _relevant(qrels)
    for rank, doc in enumerate(ranking[:k], start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """Share of all relevant documents found in the top ``k``."""
    relevant = _relevant(qrels)
    if not relevant:
        return 0.0
    return len(relevant.intersection(ranking[:k])) / len(relevant)


def precision_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int) -> float:
    """Share of the top ``k`` slots (always ``k``, as trec_eval) holding a relevant document."""
    relevant = _relevant(qrels)
    return sum(1 for doc in ranking[:k] if doc in relevant) / k


def average_precision_at_k(ranking: Sequence[str], qrels: Mapping[str, int], k: int | None = None) -> float:
    """AP over the top ``k``: mean of precision at each relevant hit, divided by *all* relevant.

    Dividing by the total number of relevant documents (not only the retrieved ones) is what
    trec_eval's ``map_cut`` does, so missing a relevant document costs score.
    """
    relevant = _relevant(qrels)
    if not relevant:
        return 0.0
    top = ranking if k is None else ranking[:k]
    hits = 0
    total = 0.0
    for rank, doc in enumerate(top, start=1):
        if doc in relevant:
            hits += 1
            total += hits / rank
    return total / len(relevant)


def average_precision(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """AP of binary ``labels`` ranked by ``scores`` (higher first), as ``sklearn.average_precision_score``.

    Tied scores are handled as sklearn does: all documents sharing a score enter the
    precision-recall curve together, so the result does not depend on input order.
    """
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int((y > 0).sum())
    if n_pos == 0:
        return 0.0
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order] > 0, s[order]
    # Last index of each group of equal scores: the curve's thresholds.
    boundaries = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.cumsum(y)[boundaries]
    precision = tp / (boundaries + 1)
    recall = tp / n_pos
    prev_recall = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev_recall) * precision))


def rank_average(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (undefined)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} vs {len(b)}")
    a = a - a.mean()
    b = b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else 0.0


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman correlation: Pearson of average ranks, so ties are handled as scipy does."""
    return pearson(rank_average(x), rank_average(y))


def _entropy(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


def v_measure(labels_true: Sequence, labels_pred: Sequence, beta: float = 1.0) -> float:
    """V-measure: weighted harmonic mean of homogeneity and completeness (natural-log entropies)."""
    if len(labels_true) != len(labels_pred):
        raise ValueError(f"length mismatch: {len(labels_true)} vs {len(labels_pred)}")
    if len(labels_true) == 0:
        return 1.0
    classes, class_idx = np.unique(np.asarray(labels_true), return_inverse=True)
    clusters, cluster_idx = np.unique(np.asarray(labels_pred), return_inverse=True)
    contingency = np.zeros((len(classes), len(clusters)), dtype=np.float64)
    np.add.at(contingency, (class_idx, cluster_idx), 1.0)
    n = contingency.sum()
    h_class = _entropy(contingency.sum(axis=1))
    h_cluster = _entropy(contingency.sum(axis=0))
    nz = contingency > 0
    joint = contingency[nz] / n
    # H(C|K) and H(K|C) from the joint distribution and the marginals.
    col = (contingency.sum(axis=0, keepdims=True) / n).repeat(len(classes), axis=0)[nz]
    row = (contingency.sum(axis=1, keepdims=True) / n).repeat(len(clusters), axis=1)[nz]
    h_class_given_cluster = float(-(joint * np.log(joint / col)).sum())
    h_cluster_given_class = float(-(joint * np.log(joint / row)).sum())
    homogeneity = 1.0 if h_class == 0 else 1.0 - h_class_given_cluster / h_class
    completeness = 1.0 if h_cluster == 0 else 1.0 - h_cluster_given_class / h_cluster
    if homogeneity + completeness == 0:
        return 0.0
    return float((1 + beta) * homogeneity * completeness / (beta * homogeneity + completeness))
