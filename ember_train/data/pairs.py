"""Pair data for contrastive tuning: (query, positive[, hard negatives]), validated before training.

Schema per row: ``query`` (string), ``pos`` (string or non-empty list of strings), optional
``neg`` (list of strings). Other column names are mapped in the config. A row with several
positives becomes one example per positive; the sampler keeps copies of a query out of the
same batch, so they never act as each other's negatives.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ember_train.data.batching import PADDED, BatchLayout, token_counts
from ember_train.data.reader import BadRows, DataError, check_text, handle_bad_row, iter_sourced_records
from ember_train.models.encoder import Encoder, TextKind

logger = logging.getLogger(__name__)


@dataclass
class PairColumns:
    """Names of the columns holding the query, the positive(s) and the hard negatives."""

    query: str = "query"
    pos: str = "pos"
    neg: str = "neg"


@dataclass
class PairExample:
    query: str
    positive: str
    negatives: list[str] = field(default_factory=list)
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


def parse_pair_row(
    record: dict, *, columns: PairColumns, source: str, row: int, num_negatives: int
) -> list[PairExample]:
    """Validate one row and expand it into one example per positive."""
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
    return [PairExample(query, p, negatives) for p in positives]


def load_pairs(
    source: str,
    *,
    columns: PairColumns | None = None,
    split: str = "train",
    on_bad_rows: str = "error",
    num_negatives: int = 0,
    limit: int | None = None,
) -> tuple[list[PairExample], BadRows]:
    """Read and validate every row of ``source``; errors name the file, row and field."""
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
                parse_pair_row(record, columns=columns, source=file, row=row, num_negatives=num_negatives)
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
        sources: Sequence[PairSource] | None = None,
    ) -> None:
        self.encoder = encoder
        self.num_negatives = num_negatives
        self.seed = seed
        self.layout = layout
        self.sources = sources

    def _negatives(self, example: PairExample, num_negatives: int | None = None) -> list[str]:
        count = self.num_negatives if num_negatives is None else num_negatives
        negatives = example.negatives
        if len(negatives) == count:
            return list(negatives)
        rng = random.Random(f"{self.seed}:{example.query}")
        if len(negatives) > count:
            return rng.sample(negatives, count)
        return [rng.choice(negatives) for _ in range(count)]

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
        owners = list(examples)  # the example each document belongs to (for its prefix)
        if num_negatives:
            for e in examples:
                documents.extend(self._negatives(e, num_negatives))
                owners.extend([e] * num_negatives)
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
        return {
            "query": queries,
            "query_order": query_order,
            "documents": documents,
            "document_order": document_order,
            # Counted here, on the host: after the batch moves to a GPU, reading them would stall it.
            "token_counts": token_counts(*queries, *documents),
        }


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
