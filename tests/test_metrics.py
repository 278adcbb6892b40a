"""Each metric against a hand-computed case, plus cross-checks with scipy/sklearn/pytrec_eval."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ember_train.evaluation import metrics as M


def test_ndcg_graded_relevance_hand_case():
    # Gains in rank order: d1=1, d2=0, d3=2 -> DCG = 1/log2(2) + 0 + 2/log2(4) = 2.
    # Ideal over all judged docs (3, 2, 1): 3 + 2/log2(3) + 1/2.
    qrels = {"d1": 1, "d2": 0, "d3": 2, "d4": 3}
    expected = 2.0 / (3.0 + 2.0 / math.log2(3) + 0.5)
    assert M.ndcg_at_k(["d1", "d2", "d3"], qrels, 3) == pytest.approx(expected)
    assert expected == pytest.approx(0.42001, abs=1e-5)
    # Perfect ranking -> 1; a cut at k=1 only sees the first document.
    assert M.ndcg_at_k(["d4", "d3", "d1"], qrels, 3) == pytest.approx(1.0)
    assert M.ndcg_at_k(["d3", "d4"], qrels, 1) == pytest.approx(2 / 3)
    assert M.ndcg_at_k(["x"], {"d1": 0}, 10) == 0.0


def test_mrr_recall_precision_hand_cases():
    qrels = {"a": 1, "b": 2, "c": 0}
    ranking = ["c", "x", "b", "a"]
    assert M.mrr_at_k(ranking, qrels, 10) == pytest.approx(1 / 3)
    assert M.mrr_at_k(ranking, qrels, 2) == 0.0  # first hit is at rank 3
    assert M.recall_at_k(ranking, qrels, 3) == pytest.approx(0.5)
    assert M.recall_at_k(ranking, qrels, 4) == pytest.approx(1.0)
    assert M.precision_at_k(ranking, qrels, 4) == pytest.approx(0.5)
    assert M.precision_at_k(ranking, qrels, 10) == pytest.approx(0.2)  # always divided by k


def test_map_divides_by_all_relevant_hand_case():
    # Relevant at ranks 1, 3, 5; a 4th relevant document is never retrieved.
    qrels = {"r1": 1, "r2": 1, "r3": 1, "r4": 1}
    ranking = ["r1", "n1", "r2", "n2", "r3"]
    assert M.average_precision_at_k(ranking, qrels, 100) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert M.average_precision_at_k(ranking, qrels, 3) == pytest.approx((1 + 2 / 3) / 4)


def test_average_precision_with_tied_scores_hand_case():
    # Thresholds 0.9 (P=1, R=.5) and 0.8 (both tied docs enter together: P=2/3, R=1).
    labels, scores = [1, 0, 1, 0], [0.9, 0.8, 0.8, 0.1]
    assert M.average_precision(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # Order of tied items must not matter.
    assert M.average_precision([1, 1, 0, 0], [0.9, 0.8, 0.8, 0.1]) == pytest.approx(
        M.average_precision(labels, scores)
    )


def test_spearman_with_ties_hand_case():
    # Average ranks: x -> [1, 2.5, 2.5, 4]; y -> [1, 3, 2, 4]; Pearson of ranks = 4.5 / sqrt(4.5 * 5).
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    np.testing.assert_allclose(M.rank_average(x), [1, 2.5, 2.5, 4])
    assert M.spearman(x, y) == pytest.approx(4.5 / math.sqrt(22.5))
    assert M.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert M.spearman([1, 1, 1], [1, 2, 3]) == 0.0  # undefined -> 0, not NaN


def test_v_measure_hand_case():
    true, pred = [0, 0, 1, 1], [0, 0, 0, 1]
    h_c = math.log(2)
    h_k = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h_c_given_k = -0.75 * (2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    h_k_given_c = -0.5 * (2 * 0.5 * math.log(0.5))
    hom, comp = 1 - h_c_given_k / h_c, 1 - h_k_given_c / h_k
    assert M.v_measure(true, pred) == pytest.approx(2 * hom * comp / (hom + comp))
    assert M.v_measure(true, pred) == pytest.approx(0.3437, abs=1e-4)
    assert M.v_measure(["a", "a", "b"], [5, 5, 7]) == pytest.approx(1.0)  # label names are irrelevant
    assert M.v_measure([0, 1, 2, 3], [0, 0, 0, 0]) == pytest.approx(0.0)


def test_against_scipy_and_sklearn_on_random_inputs():
    scipy_stats = pytest.importorskip("scipy.stats")
    from sklearn.metrics import average_precision_score, v_measure_score

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(3, 40))
        x, y = rng.integers(0, 5, n).astype(float), rng.normal(size=n).round(1)
        if len(set(x)) > 1 and len(set(y)) > 1:
            assert M.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)
        labels, scores = rng.integers(0, 2, n), rng.integers(0, 4, n).astype(float)
        if labels.sum():
            assert M.average_precision(labels, scores) == pytest.approx(
                average_precision_score(labels, scores), abs=1e-12
            )
        t, p = rng.integers(0, 4, n), rng.integers(0, 6, n)
        assert M.v_measure(t, p) == pytest.approx(v_measure_score(t, p), abs=1e-12)


def test_ranking_metrics_match_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = np.random.default_rng(1)
    docs = [f"d{i}" for i in range(150)]
    qrels, run = {}, {}
    for q in range(20):
        judged = rng.choice(docs, size=8, replace=False)
        qrels[f"q{q}"] = {d: int(rng.integers(0, 4)) for d in judged}
        qrels[f"q{q}"][str(judged[0])] = 2  # at least one relevant
        scores = rng.random(len(docs))
        run[f"q{q}"] = {d: float(s) for d, s in zip(docs, scores, strict=True)}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100", "map_cut.100", "P.10"})
    reference = evaluator.evaluate(run)
    for q, scores in run.items():
        ranking = sorted(scores, key=lambda d: -scores[d])
        assert M.ndcg_at_k(ranking, qrels[q], 10) == pytest.approx(reference[q]["ndcg_cut_10"], abs=1e-6)
        assert M.recall_at_k(ranking, qrels[q], 100) == pytest.approx(reference[q]["recall_100"], abs=1e-6)
        assert M.average_precision_at_k(ranking, qrels[q], 100) == pytest.approx(
            reference[q]["map_cut_100"], abs=1e-6
        )
        assert M.precision_at_k(ranking, qrels[q], 10) == pytest.approx(reference[q]["P_10"], abs=1e-6)
