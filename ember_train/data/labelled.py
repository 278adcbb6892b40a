"""Labelled texts and scored sentence pairs for SetFit-style tuning, validated row by row.

Two input shapes, from any source :func:`~ember_train.data.reader.iter_records` reads (JSONL,
JSON, CSV/TSV, Parquet, a directory of them, or a Hub dataset):

* labelled texts: ``{"text": ..., "label": ...}``; the label is a string or an integer, or for
  multi-label data a list of them (a text may have no label: ``[]``). A file is either all
  single-label or all multi-label. The list names the labels (``["bug", "ui"]``); it is not a
  0/1 indicator vector as some libraries use;
* scored pairs: ``{"sentence1": ..., "sentence2": ..., "score": ...}`` with a finite number
  (CSV cells are parsed), for STS-style tuning with the same cosine loss.

Every problem names the file, the row and the field; with ``on_bad_rows: skip`` bad rows are
counted and the count is logged, never dropped silently.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from ember_train.data.reader import BadRows, DataError, check_text, handle_bad_row, iter_sourced_records

logger = logging.getLogger(__name__)

Label = str | int


@dataclass
class LabelledTexts:
    """Texts with one label each, or (``multi_label``) a list of labels each."""

    texts: list[str]
    labels: list[Any]
    multi_label: bool = False
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def label_names(self) -> list[Label]:
        """Distinct labels, sorted when comparable."""
        from ember_train.models.heads import label_list

        return label_list(self.labels, self.multi_label)

    def subset(self, rows: Sequence[int]) -> LabelledTexts:
        return LabelledTexts(
            [self.texts[i] for i in rows], [self.labels[i] for i in rows], self.multi_label, self.source
        )


@dataclass
class ScoredPairs:
    """Sentence pairs with a similarity score each (raw scale; see :func:`normalize_scores`)."""

    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]
    source: str = ""

    def __len__(self) -> int:
        return len(self.scores)


def _check_label(value: Any, *, source: str, row: int, field: str) -> Label | list[Label]:
    """A single label (str/int) or a list of them; rejects what would silently become a new class."""

    def one(v: Any, where: str) -> Label:
        if isinstance(v, bool) or v is None:
            raise DataError(
                source,
                row,
                f"field {where!r} must be a string or an integer, got {v!r}",
                reason=f"bad {field}",
            )
        if isinstance(v, float) and v.is_integer():
            return int(v)  # Parquet/pandas may store integer labels as floats
        if isinstance(v, int):
            return v
        if isinstance(v, str):
            if not v.strip():
                raise DataError(source, row, f"field {where!r} is empty", reason=f"empty {field}")
            return v
        raise DataError(
            source,
            row,
            f"field {where!r} must be a string or an integer, got {type(v).__name__} {v!r}",
            reason=f"bad {field}",
        )

    if value is None:
        raise DataError(source, row, f"field {field!r} is missing", reason=f"missing {field}")
    if isinstance(value, list | tuple):
        labels = [one(v, f"{field}[{i}]") for i, v in enumerate(value)]
        if len(set(labels)) != len(labels):
            raise DataError(
                source, row, f"field {field!r} repeats a label: {list(value)!r}", reason=f"repeated {field}"
            )
        return labels
    return one(value, field)


def load_labelled(
    source: str,
    *,
    split: str = "train",
    text_field: str = "text",
    label_field: str = "label",
    on_bad_rows: str = "error",
    max_rows: int | None = None,
) -> LabelledTexts:
    """Read labelled texts; single- vs multi-label is decided by the first good row."""
    bad = BadRows()
    texts: list[str] = []
    labels: list[Any] = []
    multi: bool | None = None
    name = str(source)

    def skip(error: DataError) -> None:
        handle_bad_row(error, on_bad_rows, bad)

    for where, row, record in iter_sourced_records(source, split=split, on_error=skip):
        try:
            text = check_text(record.get(text_field), source=where, row=row, field=text_field)
            label = _check_label(record.get(label_field), source=where, row=row, field=label_field)
            is_list = isinstance(label, list)
            if multi is not None and is_list != multi:
                kind = "a list of labels" if is_list else "a single label"
                earlier = "lists (multi-label)" if multi else "single labels"
                raise DataError(
                    where,
                    row,
                    f"field {label_field!r} is {kind} but earlier rows have {earlier}",
                    reason=f"mixed {label_field} kinds",
                )
        except DataError as error:
            handle_bad_row(error, on_bad_rows, bad)
            continue
        multi = is_list if multi is None else multi
        texts.append(text)
        labels.append(label)
        if max_rows is not None and len(texts) >= max_rows:
            break
    if bad.total:
        logger.warning("%s: %s", name, bad.summary())
    if not texts:
        raise DataError(name, None, f"no usable rows ({bad.summary()})")
    return LabelledTexts(texts, labels, bool(multi), name)


def _check_score(value: Any, *, source: str, row: int, field: str) -> float:
    if value is None:
        raise DataError(source, row, f"field {field!r} is missing", reason=f"missing {field}")
    if isinstance(value, bool):
        raise DataError(
            source, row, f"field {field!r} must be a number, got {value!r}", reason=f"bad {field}"
        )
    try:
        score = float(value)  # CSV cells are strings
    except (TypeError, ValueError):
        raise DataError(
            source, row, f"field {field!r} must be a number, got {value!r}", reason=f"bad {field}"
        ) from None
    if not math.isfinite(score):
        raise DataError(
            source, row, f"field {field!r} is not finite ({value!r})", reason=f"non-finite {field}"
        )
    return score


def load_scored_pairs(
    source: str,
    *,
    split: str = "train",
    fields: tuple[str, str, str] = ("sentence1", "sentence2", "score"),
    on_bad_rows: str = "error",
    max_rows: int | None = None,
) -> ScoredPairs:
    """Read ``(sentence1, sentence2, score)`` rows."""
    f1, f2, fs = fields
    bad = BadRows()
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    name = str(source)

    def skip(error: DataError) -> None:
        handle_bad_row(error, on_bad_rows, bad)

    for file, row, record in iter_sourced_records(source, split=split, on_error=skip):
        try:
            a = check_text(record.get(f1), source=file, row=row, field=f1)
            b = check_text(record.get(f2), source=file, row=row, field=f2)
            score = _check_score(record.get(fs), source=file, row=row, field=fs)
        except DataError as error:
            handle_bad_row(error, on_bad_rows, bad)
            continue
        s1.append(a)
        s2.append(b)
        scores.append(score)
        if max_rows is not None and len(scores) >= max_rows:
            break
    if bad.total:
        logger.warning("%s: %s", name, bad.summary())
    if not scores:
        raise DataError(name, None, f"no usable rows ({bad.summary()})")
    return ScoredPairs(s1, s2, scores, name)


def normalize_scores(
    scores: Sequence[float], low: float | None = None, high: float | None = None
) -> list[float]:
    """Map scores linearly onto ``[0, 1]`` (``low`` -> 0, ``high`` -> 1; defaults: the data's min/max).

    Pass the scale's real bounds (STS: 0 and 5) so a training file that lacks the extremes keeps
    its meaning. Scores outside the bounds are an error, not clipped.
    """
    lo = min(scores) if low is None else low
    hi = max(scores) if high is None else high
    if hi <= lo:
        raise ValueError(f"score range is empty (low={lo}, high={hi})")
    out = []
    for s in scores:
        if s < lo or s > hi:
            raise ValueError(f"score {s} is outside the given range [{lo}, {hi}]")
        out.append((s - lo) / (hi - lo))
    return out


def sample_per_label(data: LabelledTexts, per_label: int, seed: int) -> LabelledTexts:
    """Few-shot subset: ``per_label`` random texts of each label (all of a rarer label), seeded.

    For multi-label data a text counts towards each of its labels; it is taken once.
    """
    if per_label < 1:
        raise ValueError("per_label must be >= 1")
    rows = list(range(len(data)))
    random.Random(seed).shuffle(rows)
    taken: dict[Any, int] = defaultdict(int)
    chosen = []
    for i in rows:
        keys = data.labels[i] if data.multi_label else [data.labels[i]]
        if any(taken[k] < per_label for k in keys):
            chosen.append(i)
            for k in keys:
                taken[k] += 1
    return data.subset(sorted(chosen))


def subsample(data: LabelledTexts, limit: int | None, seed: int) -> LabelledTexts:
    """A seeded random subset of ``limit`` texts (in their order), or ``data`` when it is no larger."""
    if limit is None or len(data) <= limit:
        return data
    rows = sorted(random.Random(seed).sample(range(len(data)), limit))
    return data.subset(rows)


class ScoredPairDataset(Dataset):
    """Scored pairs as ``{"text1", "text2", "label"}`` items, the score mapped onto [0, 1]."""

    def __init__(self, pairs: ScoredPairs, score_range: list[float] | None) -> None:
        low, high = score_range if score_range is not None else (None, None)
        self.pairs = pairs
        self.targets = normalize_scores(pairs.scores, low, high)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return {"text1": self.pairs.sentence1[k], "text2": self.pairs.sentence2[k], "label": self.targets[k]}


class TextCollator:
    """Labelled texts -> tokenized features + head targets (end-to-end tuning)."""

    def __init__(self, encoder: Any, head: Any) -> None:  # an Encoder and a LinearHead
        self.encoder = encoder
        self.head = head

    def __call__(self, items: list[tuple[str, Any]]) -> dict[str, Any]:
        return {
            "features": self.encoder.tokenize([t for t, _ in items]),
            "targets": self.head.targets([label for _, label in items]),
        }
