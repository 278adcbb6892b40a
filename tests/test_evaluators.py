"""Evaluators (MTEB protocol), task descriptors, the eval CLI and the MTEB runner."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from ember_train.evaluation.base import EvalResult
from ember_train.evaluation.classification import ClassificationEvaluator, experiment_samples
from ember_train.evaluation.clustering import ClusteringEvaluator
from ember_train.evaluation.pair_classification import PairClassificationEvaluator
from ember_train.evaluation.reranking import RerankingEvaluator
from ember_train.evaluation.retrieval import RetrievalEvaluator
from ember_train.evaluation.search import top_k
from ember_train.evaluation.sts import STSEvaluator
from ember_train.evaluation.tasks import TaskError, load_task, read_descriptor

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"
SHIPPED = sorted((REPO / "configs" / "eval").glob("*.yaml"))


class TableEncoder:
    """Looks texts up in a table of vectors; records the ``kind`` of every call."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.kinds: list[str | None] = []

    def encode(self, texts, batch_size=32, kind=None):
        self.kinds.append(kind)
        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32)


# --- classification protocol -------------------------------------------------------------


def _mteb_reference_draws(labels, n_experiments, samples_per_label, seed):
    """MTEB 1.x ``_undersample_data`` as it runs: global RNG re-seeded before every shuffle."""
    idxs = None
    draws = []
    for _ in range(n_experiments):
        np.random.seed(seed)
        if idxs is None:
            idxs = np.arange(len(labels))
        np.random.shuffle(idxs)
        counts: Counter = Counter()
        chosen = []
        for i in idxs:
            if counts[labels[i]] < samples_per_label:
                chosen.append(int(i))
                counts[labels[i]] += 1
        draws.append(chosen)
    return draws


def test_classification_sampling_is_exactly_8_per_label_and_reproducible():
    rng = np.random.default_rng(0)
    labels = [f"label{int(i)}" for i in rng.integers(0, 7, size=400)]
    draws = experiment_samples(labels, n_experiments=10, samples_per_label=8, seed=42)
    assert len(draws) == 10
    for draw in draws:
        assert len(draw) == len(set(draw)) == 7 * 8
        assert Counter(labels[i] for i in draw) == {label: 8 for label in set(labels)}
    assert len({tuple(sorted(d)) for d in draws}) == 10  # each experiment draws a different set
    assert draws == experiment_samples(labels, n_experiments=10, samples_per_label=8, seed=42)
    assert draws != experiment_samples(labels, n_experiments=10, samples_per_label=8, seed=7)
    assert draws == _mteb_reference_draws(labels, 10, 8, 42)


def test_classification_sampling_takes_all_of_a_rare_label():
    labels = ["a"] * 20 + ["b"] * 3
    for draw in experiment_samples(labels, n_experiments=3, samples_per_label=8, seed=0):
        assert Counter(labels[i] for i in draw) == {"a": 8, "b": 3}


def test_classification_evaluator_on_separable_embeddings():
    train_texts = [f"{c}-train-{i}" for c in "xyz" for i in range(10)]
    test_texts = [f"{c}-test-{i}" for c in "xyz" for i in range(4)]
    centers = {"x": [5.0, 0, 0], "y": [0, 5.0, 0], "z": [0, 0, 5.0]}
    rng = np.random.default_rng(0)
    table = {t: (np.array(centers[t[0]]) + rng.normal(0, 0.3, 3)).tolist() for t in train_texts + test_texts}
    evaluator = ClassificationEvaluator(
        train_texts, [t[0] for t in train_texts], test_texts, [t[0] for t in test_texts], name="toy"
    )
    result = evaluator(TableEncoder(table))
    assert result.task_type == "Classification" and result.main_metric == "accuracy"
    assert result.main_score == pytest.approx(100.0)
    assert result.metrics["f1"] == pytest.approx(100.0)
    assert len(result.extra["accuracy_per_experiment"]) == 10

    # Shuffled test labels: the same probe now gets about a third right.
    wrong = [("y", "z", "x")["xyz".index(t[0])] for t in test_texts]
    bad = ClassificationEvaluator(train_texts, [t[0] for t in train_texts], test_texts, wrong, name="toy")(
        TableEncoder(table)
    )
    assert bad.main_score == pytest.approx(0.0)


# --- STS, pair classification, reranking, clustering --------------------------------------


def test_sts_evaluator_spearman_of_cosine():
    table = {"a": [1, 0], "b": [1, 0], "c": [1, 1], "d": [0, 1], "e": [-1, 0.1]}
    s1, s2 = ["a", "a", "a", "a"], ["b", "c", "d", "e"]
    gold = [5.0, 3.0, 1.0, 0.0]  # cosine order matches gold order exactly
    result = STSEvaluator(s1, s2, gold, name="toy")(TableEncoder(table))
    assert result.main_metric == "cosine_spearman"
    assert result.main_score == pytest.approx(100.0)
    reversed_result = STSEvaluator(s1, s2, gold[::-1], name="toy")(TableEncoder(table))
    assert reversed_result.main_score == pytest.approx(-100.0)


def test_pair_classification_max_ap_over_similarities():
    # Cosine cannot separate (same directions) but Euclidean can: max_ap takes the best.
    table = {"p": [1, 0], "q": [1.1, 0], "r": [10, 0], "s": [1, 0], "t": [30, 0]}
    s1, s2, labels = ["p", "p", "s", "p"], ["q", "r", "t", "s"], [1, 0, 0, 1]
    result = PairClassificationEvaluator(s1, s2, labels, name="toy")(TableEncoder(table))
    assert result.metrics["euclidean_ap"] == pytest.approx(100.0)
    assert result.metrics["cosine_ap"] == pytest.approx(50.0)  # all cosines tie: AP = positive rate
    assert result.main_metric == "max_ap" and result.main_score == pytest.approx(100.0)


def test_reranking_map_and_mrr_hand_case():
    table = {"q": [1, 0], "p1": [0.9, 0.1], "p2": [0.1, 0.9], "n1": [0.8, 0.2], "n2": [0, 1]}
    # Order by cosine to q: p1, n1, p2, n2 -> AP = (1/1 + 2/3) / 2; MRR = 1.
    enc = TableEncoder(table)
    result = RerankingEvaluator(
        [{"query": "q", "positive": ["p1", "p2"], "negative": ["n1", "n2"]}], name="toy"
    )(enc)
    assert result.metrics["map"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert result.metrics["mrr@10"] == pytest.approx(100.0)
    assert set(enc.kinds) == {"query", "document"}


def test_clustering_v_measure_on_separated_groups():
    texts = [f"{c}{i}" for c in "abc" for i in range(12)]
    centers = {"a": [10, 0], "b": [0, 10], "c": [-10, -10]}
    rng = np.random.default_rng(0)
    table = {t: (np.array(centers[t[0]]) + rng.normal(0, 0.1, 2)).tolist() for t in texts}
    result = ClusteringEvaluator(texts, [t[0] for t in texts], name="toy")(TableEncoder(table))
    assert result.main_metric == "v_measure" and result.main_score == pytest.approx(100.0)


# --- retrieval --------------------------------------------------------------------------


def test_chunked_search_equals_full_sort():
    rng = torch.Generator().manual_seed(0)
    q, d = torch.randn(37, 8, generator=rng), torch.randn(1000, 8, generator=rng)
    scores, idx = top_k(q, d, 25, query_chunk=5, doc_chunk=64)
    full = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(d, dim=-1).T
    ref_scores, ref_idx = full.topk(25, dim=1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(idx, ref_idx)


def test_retrieval_metrics_with_known_ranking():
    # q1's relevant docs rank 1st and 3rd; q2's only relevant doc ranks 2nd.
    table = {
        "q1": [1, 0],
        "q2": [0, 1],
        "d1": [1, 0.0],
        "d2": [1, 0.3],
        "d3": [1, 0.6],
        "d4": [0.5, 1],
        "d5": [0, 1],
    }
    corpus = {k: k for k in ("d1", "d2", "d3", "d4", "d5")}
    qrels = {"q1": {"d1": 1, "d3": 1}, "q2": {"d4": 1}}
    enc = TableEncoder(table)
    result = RetrievalEvaluator({"q1": "q1", "q2": "q2"}, corpus, qrels, name="toy")(enc)
    assert set(enc.kinds) == {"query", "document"}
    assert result.metrics["mrr@10"] == pytest.approx(100 * (1 + 1 / 2) / 2)
    assert result.metrics["recall@1"] == pytest.approx(100 * (0.5 + 0) / 2)
    ndcg_q1 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    ndcg_q2 = (1 / np.log2(3)) / 1
    assert result.metrics["ndcg@10"] == pytest.approx(100 * (ndcg_q1 + ndcg_q2) / 2)
    assert result.main_metric == "ndcg@10"


def test_retrieval_from_beir_and_from_pairs():
    ev = RetrievalEvaluator.from_beir(FIXTURES / "SciFact")
    assert len(ev.queries) == 8 and len(ev.corpus) == 38
    assert all(text.strip() for text in ev.corpus.values())
    pairs = RetrievalEvaluator.from_pairs(["q a", "q b", "q a"], [["p1"], "p2", ["p3", "p1"]], name="held")
    assert len(pairs.queries) == 2 and len(pairs.corpus) == 3
    qid = next(q for q, text in pairs.queries.items() if text == "q a")
    assert {pairs.corpus[d] for d in pairs.qrels[qid]} == {"p1", "p3"}


# --- descriptors --------------------------------------------------------------------------


@pytest.mark.parametrize("descriptor", SHIPPED, ids=lambda p: p.stem)
def test_shipped_descriptors_load_against_fixture_layout(descriptor):
    evaluator = load_task(descriptor, data_root=FIXTURES)
    spec = read_descriptor(descriptor)
    assert evaluator.name == spec["name"] and evaluator.task_type == spec["type"]


def test_descriptor_errors_name_the_problem(tmp_path, monkeypatch):
    monkeypatch.delenv("EMBER_EVAL_ROOT", raising=False)
    with pytest.raises(TaskError, match="EMBER_EVAL_ROOT.*--data-root"):
        load_task(REPO / "configs" / "eval" / "STS12.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: STS\nname: x\npath: data.jsonl\nthreshold: 3\n")
    with pytest.raises(TaskError, match="unknown keys.*threshold"):
        load_task(bad)
    bad.write_text("type: Regression\nname: x\n")
    with pytest.raises(TaskError, match="'type' must be one of"):
        load_task(bad)


def test_descriptor_relative_paths_columns_and_bad_rows(tmp_path):
    from ember_train.data.reader import DataError

    rows = [
        {"a": "one", "b": "two", "gold": 1.0},
        {"a": "x", "b": "", "gold": 2.0},
        {"a": "y", "b": "z", "gold": 0.5},
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    desc = tmp_path / "mine.yaml"
    desc.write_text(
        "type: STS\nname: mine\npath: pairs.jsonl\ncolumns: {sentence1: a, sentence2: b, score: gold}\n"
    )
    with pytest.raises(DataError, match=r"pairs.jsonl: row 2: field 'b' is empty"):
        load_task(desc)
    desc.write_text(desc.read_text() + "on_bad_rows: skip\n")
    evaluator = load_task(desc)
    assert evaluator.sentences2 == ["two", "z"] and evaluator.scores == [1.0, 0.5]


# --- real model: CLI and MTEB runner ------------------------------------------------------


def test_eval_cli_writes_results_and_updates_card(tmp_path, tiny_bert_path, capsys):
    import shutil

    import yaml

    from ember_train.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_bert_path, model_dir)
    tasks = ",".join(
        str(REPO / "configs" / "eval" / f"{t}.yaml") for t in ("STS12", "SciFact", "TrecQA-Reranking")
    )
    out = tmp_path / "results.json"
    rc = main(
        [
            "eval",
            str(model_dir),
            "--tasks",
            tasks,
            "--data-root",
            str(FIXTURES),
            "--output",
            str(out),
            "--update-card",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    results = [EvalResult.from_dict(r) for r in json.loads(out.read_text())]
    assert [r.dataset for r in results] == ["STS12", "SciFact", "TrecQA-Reranking"]
    card = (model_dir / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    entries = front["model-index"][0]["results"]
    for r in results:
        assert f"| {r.dataset} | {r.split} | {r.main_metric} | {r.main_score:.2f} |" in printed
        entry = next(e for e in entries if e["dataset"]["name"] == r.dataset)
        main = next(m["value"] for m in entry["metrics"] if m["type"] == "main_score")
        assert main == pytest.approx(r.main_score, abs=1e-4)


def test_mteb_runner_matches_our_sts_evaluator_on_a_local_task(minilm_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTEB_CACHE", str(tmp_path / "mteb-cache"))  # mteb creates its cache dir on import
    pytest.importorskip("mteb")
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    from ember_train.evaluation.loading import load_encoder
    from ember_train.evaluation.mteb_runner import run_mteb

    rows = [json.loads(line) for line in (FIXTURES / "STSBenchmark" / "test.jsonl").read_text().splitlines()]

    class LocalSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            name="LocalSTSFixture",
            description="24 STSBenchmark test pairs from the ember-train test fixtures.",
            reference="https://github.com/embeddings-benchmark/mteb",
            dataset={"path": "local", "revision": "local"},
            type="STS",
            category="t2t",
            modalities=["text"],
            eval_splits=["test"],
            eval_langs=["eng-Latn"],
            main_score="cosine_spearman",
            date=("2012-01-01", "2017-12-31"),
            domains=[],
            task_subtypes=[],
            license="cc-by-sa-4.0",
            annotations_creators="human-annotated",
            dialect=[],
            sample_creation="found",
            bibtex_citation="",
        )
        min_score = 0
        max_score = 5

        def load_data(self, **kwargs):
            columns = {k: [r[k] for r in rows] for k in ("sentence1", "sentence2", "score")}
            self.dataset = DatasetDict({"test": Dataset.from_dict(columns)})
            self.data_loaded = True

    results = run_mteb(minilm_path, [LocalSTS()], batch_size=16)
    assert len(results) == 1
    theirs = results[0]
    assert (
        theirs.task_type == "STS"
        and theirs.dataset == "LocalSTSFixture"
        and theirs.main_metric == "cosine_spearman"
    )
    ours = STSEvaluator(
        [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [r["score"] for r in rows]
    )(load_encoder(minilm_path))
    assert ours.main_score == pytest.approx(theirs.main_score, abs=0.01)

    from ember_train.cli import main

    assert main(["eval", str(minilm_path), "--mteb", "NoSuchMTEBTask"]) == 2
    assert "unknown MTEB task" in capsys.readouterr().err


def test_mteb_runner_says_how_to_install_when_missing(monkeypatch):
    import builtins

    from ember_train.evaluation import mteb_runner

    real_import = builtins.__import__

    def no_mteb(name, *args, **kwargs):
        if name == "mteb" or name.startswith("mteb."):
            raise ImportError("No module named 'mteb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mteb)
    with pytest.raises(ImportError, match=r"pip install 'ember-train\[mteb\]'"):
        mteb_runner.run_mteb("any-model", ["STS12"])


def test_relative_data_root_is_relative_to_the_caller(monkeypatch):
    monkeypatch.chdir(REPO / "tests")
    evaluator = load_task(REPO / "configs" / "eval" / "BIOSSES.yaml", data_root="fixtures/eval")
    assert len(evaluator.scores) == 24
