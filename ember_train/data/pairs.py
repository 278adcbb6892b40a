"""Pair data for contrastive tuning: (query, positive[, hard negatives]), validated before training.

Schema per row: ``query`` (string), ``pos`` (string or non-empty list of strings), optional
``neg`` (list of strings), and for distillation the teacher's scores: ``pos_score`` (a number, or
one per positive when ``pos`` is a list) and ``neg_scores`` (one number per ``neg``), as
``ember-train mine --teacher`` writes them. Other column names are mapped in the config. A row
with several positives becomes one example per positive; the sampler keeps copies of a query out
of the same batch, so they never act as each other's negatives.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ember_train.data.batching import PADDED, BatchLayout, token_counts
from ember_train.data.reader import BadRows, DataError, check_text, handle_bad_row, iter_sourced_records
from ember_train.models.encoder import Encoder, TextKind

logger = logging.getLogger(__name__)


@dataclass
class PairColumns:
    """Names of the columns holding the query, the positive(s), the hard negatives and the teacher's scores."""

    query: str = "query"
    pos: str = "pos"
    neg: str = "neg"
    pos_score: str = "pos_score"
    neg_scores: str = "neg_scores"


@dataclass
class PairExample:
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
    # The teacher's scores for (query, positive) and (query, each negative): read only for distillation.
    positive_score: float | None = None
    negative_scores: list[float] | None = None
    dataset: int = 0  # index of its training dataset in a mixture (:class:`PairSource`)


@dataclass(frozen=True)
class PairSource:
    """What differs between the datasets of a mixture, per example in a batch."""

    name: str
    num_negatives: int = 0  # hard negatives per query
    query_prefix: str | None = None  # None: the model's (``model.query_prefix``)
    document_prefix: str | None = None


def _text_list(value: Any, *, source: str, row: int, field_name: str, allow_empty: bool) -> list[str]:
    if value is None and allow_empty:
        return []
    if isinstance(value, str):
        return [check_text(value, source=source, row=row, field=field_name)]
    if not isinstance(value, list | tuple):
        raise DataError(
            source,
            row,
            f"field {field_name!r} must be a string or a list of strings, got {type(value).__name__}",
            reason=f"bad type {field_name}",
        )
    if not value and not allow_empty:
        raise DataError(source, row, f"field {field_name!r} is an empty list", reason=f"empty {field_name}")
    return [check_text(v, source=source, row=row, field=f"{field_name}[{i}]") for i, v in enumerate(value)]


def _score(value: Any, *, source: str, row: int, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(
            source,
            row,
            f"field {field_name!r} must be a finite number, got {value!r}",
            reason=f"bad {field_name}",
        )
    return float(value)


def _teacher_scores(
    record: dict, *, columns: PairColumns, source: str, row: int, num_positives: int, num_negs: int
) -> tuple[list[float], list[float]]:
    """The teacher's score per positive and per negative; both must be there, and match in count."""
    for name in (columns.pos_score, columns.neg_scores):
        if record.get(name) is None:
            raise DataError(
                source,
                row,
                f"field {name!r} is missing (distillation, loss.distill_weight > 0, needs the teacher's "
                "scores on every row: ember-train mine --teacher writes them)",
                reason=f"missing {name}",
            )
    pos_value, neg_value = record[columns.pos_score], record[columns.neg_scores]
    pos_values = pos_value if isinstance(pos_value, list) else [pos_value]
    if len(pos_values) != num_positives:
        raise DataError(
            source,
            row,
            f"field {columns.pos_score!r} has {len(pos_values)} scores for {num_positives} positives",
            reason=f"bad {columns.pos_score}",
        )
    if not isinstance(neg_value, list) or len(neg_value) != num_negs:
        count = f"{len(neg_value)} scores" if isinstance(neg_value, list) else f"a {type(neg_value).__name__}"
        raise DataError(
            source,
            row,
            f"field {columns.neg_scores!r} has {count} for {num_negs} negatives in {columns.neg!r} "
            "(one score per negative, in the same order)",
            reason=f"bad {columns.neg_scores}",
        )
    pos_scores = [
        _score(
            v,
            source=source,
            row=row,
            field_name=columns.pos_score if not isinstance(pos_value, list) else f"{columns.pos_score}[{i}]",
        )
        for i, v in enumerate(pos_values)
    ]
    neg_scores = [
        _score(v, source=source, row=row, field_name=f"{columns.neg_scores}[{i}]")
        for i, v in enumerate(neg_value)
    ]
    return pos_scores, neg_scores


def parse_pair_row(
    record: dict,
    *,
    columns: PairColumns,
    source: str,
    row: int,
    num_negatives: int,
    teacher_scores: bool = False,
) -> list[PairExample]:
    """Validate one row and expand it into one example per positive.

    With ``teacher_scores`` (distillation on) the row must carry a score for each positive and
    each negative; otherwise the score columns are not read.
    """
    if columns.query not in record:
        raise DataError(source, row, f"field {columns.query!r} is missing", reason=f"missing {columns.query}")
    query = check_text(record.get(columns.query), source=source, row=row, field=columns.query)
    if columns.pos not in record or record[columns.pos] is None:
        raise DataError(
            source,
            row,
            f"row has no positive (field {columns.pos!r} is missing)",
            reason=f"missing {columns.pos}",
        )
    positives = _text_list(
        record[columns.pos], source=source, row=row, field_name=columns.pos, allow_empty=False
    )
    negatives = _text_list(
        record.get(columns.neg), source=source, row=row, field_name=columns.neg, allow_empty=True
    )
    if num_negatives and len(negatives) == 0:
        raise DataError(
            source,
            row,
            f"field {columns.neg!r} needs at least one hard negative (loss.num_negatives={num_negatives})",
            reason=f"missing {columns.neg}",
        )
    if not teacher_scores:
        return [PairExample(query, p, negatives) for p in positives]
    pos_scores, neg_scores = _teacher_scores(
        record, columns=columns, source=source, row=row, num_positives=len(positives), num_negs=len(negatives)
    )
    return [
        PairExample(query, p, negatives, positive_score=s, negative_scores=neg_scores)
        for p, s in zip(positives, pos_scores, strict=True)
    ]


def load_pairs(
    source: str,
    *,
    columns: PairColumns | None = None,
    split: str = "train",
    on_bad_rows: str = "error",
    num_negatives: int = 0,
    limit: int | None = None,
    teacher_scores: bool = False,
) -> tuple[list[PairExample], BadRows]:
    """Read and validate every row of ``source``; errors name the file, row and field.

    ``teacher_scores``: every row must carry the teacher's scores (distillation).
    """
    columns = columns or PairColumns()
    bad = BadRows()
    examples: list[PairExample] = []
    rows = 0

    def on_error(error: DataError) -> None:
        handle_bad_row(error, on_bad_rows, bad)

    for file, row, record in iter_sourced_records(source, split=split, on_error=on_error):
        rows += 1
        try:
            examples.extend(
                parse_pair_row(
                    record,
                    columns=columns,
                    source=file,
                    row=row,
                    num_negatives=num_negatives,
                    teacher_scores=teacher_scores,
                )
            )
        except DataError as e:
            handle_bad_row(e, on_bad_rows, bad)
        if limit is not None and len(examples) >= limit:
            examples = examples[:limit]
            break
    if bad.total:
        logger.warning("%s: %s", source, bad.summary())
    if not examples:
        if not rows and not bad.total:
            raise DataError(str(source), None, "no usable pairs: no rows at all (an empty file?)")
        raise DataError(str(source), None, f"no usable pairs ({rows} rows read; {bad.summary()})")
    return examples, bad


class PairCollator:
    """Tokenizes a list of examples into length-sorted slices of queries and of documents.

    Documents are laid out as ``[positives (B); negatives (B × n)]``. Each query gets exactly
    ``num_negatives`` hard negatives, drawn from its own list (with replacement when it has
    fewer), reproducibly per (seed, query). Each side is tokenized in the run's ``layout``: sorted
    by token length and padded in ``padded_slices`` (2) slices cut where padding is least
    (:func:`~ember_train.data.batching.tokenize_slices`): on Debian pairs grouped by document
    length, padding falls from 13.4% (one padded batch per side; most of it in the short queries)
    to 4.6% at batch 32; or packed, one padding-free row per side
    (:func:`~ember_train.data.batching.tokenize_packed`), sorted and cut the same way for attention.
    ``query_order``/``document_order`` put the slices' rows back in text order
    (:func:`~ember_train.data.batching.restore_order`); ``token_counts`` are for the logs.
    With ``teacher_scores`` the batch also holds ``teacher_scores [B, 1 + num_negatives]``: each
    query's group (its positive, then the negatives drawn for it) as the teacher scored it.

    With ``sources`` (a mixture of datasets), each example's :class:`PairSource` sets its hard
    negatives (one count per batch: the sampler's one-dataset batches, or one count for all) and
    its prefixes, which replace the model's for that example.
    """

    def __init__(
        self,
        encoder: Encoder,
        num_negatives: int = 0,
        seed: int = 0,
        layout: BatchLayout = PADDED,
        teacher_scores: bool = False,
        sources: Sequence[PairSource] | None = None,
    ) -> None:
        self.encoder = encoder
        self.num_negatives = num_negatives
        self.seed = seed
        self.layout = layout
        self.teacher_scores = teacher_scores
        self.sources = sources

    def _negative_indices(self, example: PairExample, num_negatives: int) -> list[int]:
        """Which of the example's negatives go in the batch: indices, so their scores follow them."""
        count = len(example.negatives)
        if count == num_negatives:
            return list(range(count))
        rng = random.Random(f"{self.seed}:{example.query}")
        if count > num_negatives:
            return rng.sample(range(count), num_negatives)
        return [rng.randrange(count) for _ in range(num_negatives)]

    def _batch_negatives(self, examples: list[PairExample]) -> int:
        if not self.sources:
            return self.num_negatives
        counts = {self.sources[e.dataset].num_negatives for e in examples}
        if len(counts) > 1:
            raise ValueError(f"a batch mixes datasets with different num_negatives ({sorted(counts)})")
        return counts.pop()

    def __call__(self, examples: list[PairExample]) -> dict[str, Any]:
        num_negatives = self._batch_negatives(examples)
        documents = [e.positive for e in examples]
        groups = [self._negative_indices(e, num_negatives) if num_negatives else [] for e in examples]
        owners = list(examples)  # the example each document belongs to (for its prefix)
        for e, chosen in zip(examples, groups, strict=True):
            documents.extend(e.negatives[i] for i in chosen)
            owners.extend([e] * len(chosen))
        queries = [e.query for e in examples]
        query_kind: TextKind | None = "query"
        document_kind: TextKind | None = "document"
        if self.sources and any(
            s.query_prefix is not None or s.document_prefix is not None for s in self.sources
        ):
            queries, query_kind = source_prefixed(self.encoder, self.sources, examples, queries, "query")
            documents, document_kind = source_prefixed(
                self.encoder, self.sources, owners, documents, "document"
            )
        queries, query_order = self.layout.tokenize(self.encoder, queries, query_kind)
        documents, document_order = self.layout.tokenize(self.encoder, documents, document_kind)
        batch = {
            "query": queries,
            "query_order": query_order,
            "documents": documents,
            "document_order": document_order,
            # Counted here, on the host: after the batch moves to a GPU, reading them would stall it.
            "token_counts": token_counts(*queries, *documents),
        }
        if self.teacher_scores:
            batch["teacher_scores"] = torch.tensor(
                [
                    [e.positive_score, *(e.negative_scores[i] for i in chosen)]  # type: ignore[index]
                    for e, chosen in zip(examples, groups, strict=True)
                ],
                dtype=torch.float32,
            )
        return batch


def source_prefixed(
    encoder: Encoder,
    sources: Sequence[PairSource],
    owners: Sequence[PairExample],
    texts: Sequence[str],
    kind: TextKind,
) -> tuple[list[str], None]:
    """``texts`` with the prefix of each owner's dataset (the model's where it sets none), and
    the kind to tokenize them as: None, so that the encoder adds no prefix of its own."""
    prefixes = [encoder.prefix(kind) if (p := getattr(s, f"{kind}_prefix")) is None else p for s in sources]
    return [prefixes[o.dataset] + t for o, t in zip(owners, texts, strict=True)], None
