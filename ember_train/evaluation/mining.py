"""Hard-negative mining: for each query, sample negatives the model finds close but not too close.

Procedure (the usual recipe for contrastive tuning data):

1. Embed every distinct query (``kind="query"``) and the corpus (``kind="document"``): by
   default the distinct positives of all pairs, or a corpus you pass.
2. Exact chunked search keeps the top ``rank_window[1]`` documents per query (faiss when it is
   installed and the corpus is large), so memory stays bounded.
3. Candidates are the documents at ranks ``rank_window[0] + 1 .. rank_window[1]`` (1-based):
   the very top is skipped because it is mostly unlabelled positives.
4. Excluded: any positive of the query (by text, whitespace and case folded), the query text
   itself, and near-duplicates of the positive: a candidate whose score is
   ``>= pos_score - margin`` or ``>= max_score_ratio * pos_score``, where ``pos_score`` is the
   query's *lowest* positive score (the conservative choice with several positives).
5. ``num_negatives`` are sampled uniformly from what remains, seeded per query text so the
   result does not depend on row order; queries left with fewer get all that remain (counted).

The output keeps every input field and sets ``neg`` to a list of strings: the pair schema
:mod:`ember_train.data.pairs` reads.

For distillation, :func:`score_pairs` adds a teacher's scores: the cosine similarity of each
query with its positive(s) (``pos_score``) and with each of its negatives (``neg_scores``, in
order), from an embedding model (``ember-train mine --teacher``).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ember_train.data.reader import BadRows, DataError, check_text, handle_bad_row, iter_records
from ember_train.evaluation.base import SupportsEncode, encode
from ember_train.evaluation.search import top_k

logger = logging.getLogger(__name__)


@dataclass
class MiningStats:
    """What happened to the candidates, so nothing is dropped silently."""

    rows: int = 0
    queries: int = 0
    corpus_size: int = 0
    negatives_written: int = 0
    queries_short: int = 0  # fewer than num_negatives candidates survived the filters
    excluded_positive: int = 0
    excluded_near_duplicate: int = 0

    def summary(self) -> str:
        return (
            f"{self.rows} rows / {self.queries} queries, corpus {self.corpus_size}: wrote {self.negatives_written} negatives; "
            f"excluded {self.excluded_positive} positives and {self.excluded_near_duplicate} near-duplicates; "
            f"{self.queries_short} queries got fewer negatives than asked"
        )


def fold_text(text: str) -> str:
    """Texts compared whitespace- and case-folded: a positive in another spelling is still a positive."""
    return " ".join(text.split()).casefold()


def _positives(row: Mapping[str, Any]) -> list[str]:
    pos = row["pos"]
    return [pos] if isinstance(pos, str) else list(pos)


@dataclass(kw_only=True)
class MiningSettings:
    """How negatives are chosen (the options of ``ember-train mine``), as a config section: the ember
    recipe's mining stage and mining while training both extend it."""

    rank_window: list[int] = field(default_factory=lambda: [10, 100])  # START, END: ranks START+1..END
    margin: float = 0.0  # drop candidates scoring >= pos_score - margin
    max_score_ratio: float | None = 0.95  # drop candidates >= ratio * pos_score (null disables)
    batch_size: int = 64  # texts embedded at once
    chunk_size: int = 16_384  # documents scored at once (memory bound)

    def __post_init__(self) -> None:
        if len(self.rank_window) != 2 or not 0 <= self.rank_window[0] < self.rank_window[1]:
            raise ValueError(
                f"rank_window must be [START, END] with 0 <= START < END, got {self.rank_window}"
            )
        if self.max_score_ratio is not None and self.max_score_ratio <= 0:
            raise ValueError(f"max_score_ratio must be > 0 or null, got {self.max_score_ratio}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be >= 1")

    def mine(
        self,
        encoder: SupportsEncode,
        pairs: Sequence[Mapping[str, Any]],
        *,
        num_negatives: int,
        seed: int,
        corpus: Sequence[str] | None = None,
        show_progress: bool = True,
    ) -> tuple[list[dict[str, Any]], MiningStats]:
        """:func:`mine_hard_negatives` with these settings."""
        return mine_hard_negatives(
            encoder,
            pairs,
            corpus=corpus,
            rank_window=(self.rank_window[0], self.rank_window[1]),
            margin=self.margin,
            max_score_ratio=self.max_score_ratio,
            num_negatives=num_negatives,
            seed=seed,
            batch_size=self.batch_size,
            chunk_size=self.chunk_size,
            show_progress=show_progress,
        )


def mine_hard_negatives(
    encoder: SupportsEncode,
    pairs: Sequence[Mapping[str, Any]],
    *,
    corpus: Sequence[str] | None = None,
    rank_window: tuple[int, int] = (10, 100),
    margin: float = 0.0,
    max_score_ratio: float | None = 0.95,
    num_negatives: int = 4,
    seed: int = 0,
    batch_size: int = 64,
    chunk_size: int = 16_384,
    use_faiss: bool | None = None,
    show_progress: bool = True,
) -> tuple[list[dict[str, Any]], MiningStats]:
    """Return the input rows with ``neg`` filled in, and counts of what was excluded.

    ``pairs`` rows need ``query`` (str) and ``pos`` (str or list of str).
    """
    lo, hi = rank_window
    if not 0 <= lo < hi:
        raise ValueError(f"rank_window must be (start, end) with 0 <= start < end, got {rank_window}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    stats = MiningStats(rows=len(pairs))

    positives_of: dict[str, list[str]] = {}
    for row in pairs:
        bucket = positives_of.setdefault(row["query"], [])
        bucket.extend(p for p in _positives(row) if p not in bucket)
    queries = list(positives_of)
    stats.queries = len(queries)

    if corpus is None:
        corpus = list(dict.fromkeys(p for ps in positives_of.values() for p in ps))
    else:
        corpus = list(dict.fromkeys(corpus))
    stats.corpus_size = len(corpus)
    if not corpus:
        raise ValueError("empty corpus")

    q_emb = F.normalize(encode(encoder, queries, batch_size=batch_size, kind="query"), dim=-1)
    d_emb = F.normalize(encode(encoder, corpus, batch_size=batch_size, kind="document"), dim=-1)
    # Positive scores: reuse corpus embeddings, embed only positives missing from the corpus.
    index_of = {text: i for i, text in enumerate(corpus)}
    missing = list(dict.fromkeys(p for ps in positives_of.values() for p in ps if p not in index_of))
    extra = (
        F.normalize(encode(encoder, missing, batch_size=batch_size, kind="document"), dim=-1)
        if missing
        else None
    )
    extra_index = {text: i for i, text in enumerate(missing)}

    def pos_embedding(text: str) -> torch.Tensor:
        return d_emb[index_of[text]] if text in index_of else extra[extra_index[text]]  # type: ignore[index]

    scores, indices = top_k(
        q_emb, d_emb, hi, doc_chunk=chunk_size, use_faiss=use_faiss, progress=show_progress
    )

    negatives_of: dict[str, list[str]] = {}
    for qi, query in enumerate(tqdm(queries, desc="mine", disable=not show_progress)):
        excluded_texts = {fold_text(p) for p in positives_of[query]} | {fold_text(query)}
        pos_score = min(float(q_emb[qi] @ pos_embedding(p)) for p in positives_of[query])
        ceiling = pos_score - margin
        if max_score_ratio is not None:
            ceiling = min(ceiling, max_score_ratio * pos_score)
        candidates = []
        for score, doc in zip(scores[qi, lo:hi].tolist(), indices[qi, lo:hi].tolist(), strict=True):
            text = corpus[doc]
            if fold_text(text) in excluded_texts:
                stats.excluded_positive += 1
            elif score >= ceiling:
                stats.excluded_near_duplicate += 1
            else:
                candidates.append(text)
        rng = random.Random(f"{seed}:{query}")
        chosen = rng.sample(candidates, num_negatives) if len(candidates) > num_negatives else candidates
        if len(chosen) < num_negatives:
            stats.queries_short += 1
        negatives_of[query] = chosen

    out = []
    for row in pairs:
        mined = dict(row)
        mined["neg"] = list(negatives_of[row["query"]])
        stats.negatives_written += len(mined["neg"])
        out.append(mined)
    logger.info("mining: %s", stats.summary())
    return out, stats


def score_pairs(
    teacher: SupportsEncode,
    rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[tuple[float | list[float], list[float]]]:
    """The teacher's cosine similarity of each row's query with its positive(s) and its ``neg`` list.

    Rows need ``query``, ``pos`` (str or list of str) and ``neg`` (list of str). Per row: the
    positive's score (a list, one per positive, when ``pos`` is a list) and the negatives' scores.
    Each distinct text is embedded once.
    """
    queries = list(dict.fromkeys(row["query"] for row in rows))
    documents = list(dict.fromkeys(d for row in rows for d in [*_positives(row), *row["neg"]]))
    if show_progress:
        logger.info("teacher: embedding %d queries and %d documents", len(queries), len(documents))
    q_emb = F.normalize(encode(teacher, queries, batch_size=batch_size, kind="query"), dim=-1)
    d_emb = F.normalize(encode(teacher, documents, batch_size=batch_size, kind="document"), dim=-1)
    q_index = {text: i for i, text in enumerate(queries)}
    d_index = {text: i for i, text in enumerate(documents)}

    def scores(query: str, texts: Sequence[str]) -> list[float]:
        if not texts:
            return []
        return (d_emb[[d_index[t] for t in texts]] @ q_emb[q_index[query]]).tolist()

    out: list[tuple[float | list[float], list[float]]] = []
    for row in rows:
        pos = scores(row["query"], _positives(row))
        out.append((pos[0] if isinstance(row["pos"], str) else pos, scores(row["query"], row["neg"])))
    return out


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as UTF-8 JSONL (one object per line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_pair_rows(
    path: str, *, query: str, pos: str, on_bad_rows: str, neg: str | None = None
) -> tuple[list[dict[str, Any]], BadRows]:
    """Rows with a valid query and positive(s) (and with ``neg``, a list of negatives to score);
    every other field is kept as is."""
    bad = BadRows()
    rows = []
    for row, record in iter_records(path, on_error=lambda e: handle_bad_row(e, on_bad_rows, bad)):
        try:
            check_text(record.get(query), source=path, row=row, field=query)
            value = record.get(pos)
            values = [value] if isinstance(value, str) or value is None else value
            if not isinstance(values, list) or not values:
                raise DataError(path, row, f"field {pos!r} must be a string or a non-empty list of strings")
            for i, v in enumerate(values):
                check_text(v, source=path, row=row, field=pos if isinstance(value, str) else f"{pos}[{i}]")
            if neg is not None:
                negatives = record.get(neg)
                if not isinstance(negatives, list):
                    raise DataError(
                        path,
                        row,
                        f"field {neg!r} must be a list of negatives to score, got "
                        f"{type(negatives).__name__ if negatives is not None else 'nothing'} "
                        "(give --model to mine them)",
                    )
                for i, v in enumerate(negatives):
                    check_text(v, source=path, row=row, field=f"{neg}[{i}]")
        except DataError as e:
            handle_bad_row(e, on_bad_rows, bad)
            continue
        rows.append(record)
    if not rows:
        raise DataError(path, None, f"no usable pairs ({bad.summary()})")
    return rows, bad


def read_corpus(path: str, *, field: str, on_bad_rows: str) -> list[str]:
    bad = BadRows()
    texts = []
    for row, record in iter_records(path, on_error=lambda e: handle_bad_row(e, on_bad_rows, bad)):
        try:
            texts.append(check_text(record.get(field), source=path, row=row, field=field))
        except DataError as e:
            handle_bad_row(e, on_bad_rows, bad)
    if bad.total:
        logger.warning("%s: %s", path, bad.summary())
    return texts
