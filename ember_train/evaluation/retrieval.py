"""Retrieval: rank a corpus for each query by cosine similarity and score the ranking.

MTEB protocol (BEIR): queries and documents are embedded separately (queries with the query
prefix, documents with the document prefix), a document's text is ``title + " " + text``, the
search is exact cosine, and nDCG@10 is the headline. Metrics are averaged over the queries
that have at least one relevant document, and reported ×100.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ember_train.data.reader import DataError, check_text, iter_records
from ember_train.evaluation import metrics as M
from ember_train.evaluation.base import EvalResult, Evaluator, SupportsEncode, encode, percent
from ember_train.evaluation.search import top_k

logger = logging.getLogger(__name__)


class RetrievalEvaluator(Evaluator):
    """nDCG@10 (main), MRR@10, MAP@100, Recall@k and Precision@k over an in-memory BEIR-style task.

    ``qrels[query_id][doc_id] = grade`` (grade >= 1 is relevant; higher grades give more nDCG gain).
    """

    task_type = "Retrieval"

    def __init__(
        self,
        queries: Mapping[str, str],
        corpus: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        *,
        name: str = "retrieval",
        split: str = "test",
        k_values: Sequence[int] = (1, 10, 100),
        batch_size: int = 64,
        score: str = "cosine",
        show_progress: bool = False,
    ) -> None:
        if not corpus:
            raise ValueError(f"{name}: empty corpus")
        self.queries = {
            qid: q for qid, q in queries.items() if any(g >= 1 for g in qrels.get(qid, {}).values())
        }
        if not self.queries:
            raise ValueError(f"{name}: no query has a relevant document in qrels")
        dropped = len(queries) - len(self.queries)
        if dropped:
            logger.info("%s: %d queries without relevant documents are not scored", name, dropped)
        self.corpus = dict(corpus)
        self.qrels = {qid: dict(qrels[qid]) for qid in self.queries}
        self.name = name
        self.split = split
        self.k_values = tuple(sorted(set(k_values) | {10}))
        self.batch_size = batch_size
        self.score = score
        self.show_progress = show_progress

    def rank(self, encoder: SupportsEncode, k: int) -> dict[str, list[tuple[str, float]]]:
        """Top ``k`` ``(doc_id, score)`` per query, best first."""
        qids = list(self.queries)
        dids = list(self.corpus)
        q_emb = encode(encoder, [self.queries[q] for q in qids], batch_size=self.batch_size, kind="query")
        d_emb = encode(encoder, [self.corpus[d] for d in dids], batch_size=self.batch_size, kind="document")
        scores, indices = top_k(q_emb, d_emb, k, score=self.score, progress=self.show_progress)
        return {
            qid: [(dids[j], s) for j, s in zip(indices[i].tolist(), scores[i].tolist(), strict=True)]
            for i, qid in enumerate(qids)
        }

    def score_rankings(self, rankings: Mapping[str, Sequence[str]]) -> dict[str, float]:
        """Mean metrics (fractions) of ranked doc-id lists against the qrels."""
        per_metric: dict[str, list[float]] = {}

        def add(key: str, value: float) -> None:
            per_metric.setdefault(key, []).append(value)

        for qid, qrel in self.qrels.items():
            ranking = list(rankings.get(qid, []))
            for k in self.k_values:
                add(f"ndcg@{k}", M.ndcg_at_k(ranking, qrel, k))
                add(f"recall@{k}", M.recall_at_k(ranking, qrel, k))
                add(f"precision@{k}", M.precision_at_k(ranking, qrel, k))
            add("mrr@10", M.mrr_at_k(ranking, qrel, 10))
            add(f"map@{max(self.k_values)}", M.average_precision_at_k(ranking, qrel, max(self.k_values)))
        return {key: float(np.mean(values)) for key, values in per_metric.items()}

    def __call__(self, encoder: SupportsEncode) -> EvalResult:
        ranked = self.rank(encoder, max(self.k_values))
        fractions = self.score_rankings({qid: [d for d, _ in hits] for qid, hits in ranked.items()})
        return EvalResult(
            task_type=self.task_type,
            dataset=self.name,
            split=self.split,
            metrics=percent(fractions),
            main_metric="ndcg@10",
            extra={"num_queries": len(self.queries), "num_documents": len(self.corpus)},
        )

    @classmethod
    def from_beir(cls, folder: str | Path, split: str = "test", **kwargs) -> RetrievalEvaluator:
        """Load ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` and ``qrels/<split>.tsv``."""
        folder = Path(folder)
        corpus: dict[str, str] = {}
        corpus_file = _find(folder, "corpus")
        for row, rec in iter_records(corpus_file):
            doc_id = _id(rec, source=str(corpus_file), row=row)
            title = rec.get("title") or ""
            body = rec.get("text")
            if not (title.strip() if isinstance(title, str) else "") and not (
                isinstance(body, str) and body.strip()
            ):
                raise DataError(
                    str(corpus_file), row, "fields 'title' and 'text' are both empty", reason="empty doc"
                )
            corpus[doc_id] = f"{title} {body or ''}".strip()
        queries: dict[str, str] = {}
        queries_file = _find(folder, "queries")
        for row, rec in iter_records(queries_file):
            queries[_id(rec, source=str(queries_file), row=row)] = check_text(
                rec.get("text"), source=str(queries_file), row=row, field="text"
            )
        qrels_file = _find(folder / "qrels", split)
        qrels: dict[str, dict[str, int]] = {}
        for row, rec in iter_records(qrels_file):
            try:
                qid, did, grade = str(rec["query-id"]), str(rec["corpus-id"]), int(rec["score"])
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    str(qrels_file),
                    row,
                    "needs columns 'query-id', 'corpus-id' and an integer 'score'",
                    reason="bad qrel",
                ) from None
            if qid not in queries:
                raise DataError(str(qrels_file), row, f"query-id {qid!r} is not in {queries_file.name}")
            qrels.setdefault(qid, {})[did] = grade
        missing = sum(1 for rel in qrels.values() for d in rel if d not in corpus)
        if missing:
            logger.warning(
                "%s: %d judged documents are not in the corpus (they still count as relevant)",
                folder,
                missing,
            )
        kwargs.setdefault("name", folder.name)
        return cls({q: queries[q] for q in qrels}, corpus, qrels, split=split, **kwargs)

    @classmethod
    def from_pairs(
        cls,
        queries: Sequence[str],
        positives: Sequence[Sequence[str]] | Sequence[str],
        *,
        name: str = "held-out pairs",
        **kwargs,
    ) -> RetrievalEvaluator:
        """Held-out (query, positive) pairs: the corpus is every distinct positive text.

        A repeated query text is one query whose relevant set is the union of its positives.
        """
        if len(queries) != len(positives):
            raise ValueError(f"{len(queries)} queries but {len(positives)} positive lists")
        doc_ids: dict[str, str] = {}
        query_ids: dict[str, str] = {}
        qrels: dict[str, dict[str, int]] = {}
        for query, pos in zip(queries, positives, strict=True):
            pos_list = [pos] if isinstance(pos, str) else list(pos)
            qid = query_ids.setdefault(query, f"q{len(query_ids)}")
            for text in pos_list:
                did = doc_ids.setdefault(text, f"d{len(doc_ids)}")
                qrels.setdefault(qid, {})[did] = 1
        corpus = {did: text for text, did in doc_ids.items()}
        return cls({qid: q for q, qid in query_ids.items()}, corpus, qrels, name=name, **kwargs)


def _id(rec: dict, *, source: str, row: int) -> str:
    value = rec.get("_id", rec.get("id"))
    if value is None or str(value).strip() == "":
        raise DataError(source, row, "field '_id' is missing", reason="missing _id")
    return str(value)


def _find(folder: Path, stem: str) -> Path:
    """``folder/stem.jsonl`` (or .jsonl.gz/.tsv/...): BEIR files come in a few spellings."""
    for suffix in (".jsonl", ".jsonl.gz", ".json", ".tsv", ".csv", ".tsv.gz", ".parquet"):
        path = folder / f"{stem}{suffix}"
        if path.is_file():
            return path
    raise DataError(
        str(folder / stem),
        None,
        "file not found (expected BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv)",
    )
