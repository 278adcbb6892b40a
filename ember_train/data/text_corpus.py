"""Raw text for pretraining: files or a Hub dataset, in memory or streamed, short texts optionally joined.

Sources: JSONL/JSON/CSV/Parquet (a text column, through the shared reader), plain text files
(``.txt``/``.txt.gz``: one document per line), a directory of either, or a Hub dataset name.
Texts shorter than ``min_tokens`` are skipped and *counted*; with joining, consecutive short
texts are joined (with ``separator``) up to the token budget of one sequence. Every skipped
row or text shows up in :meth:`CorpusStats.summary`, which the pipeline logs.
"""

from __future__ import annotations

import gzip
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ember_train.data.reader import BadRows, DataError, check_text, handle_bad_row, iter_records

logger = logging.getLogger(__name__)

PLAIN_TEXT_SUFFIXES = (".txt", ".txt.gz", ".text")


@dataclass
class CorpusStats:
    """What happened to every input row: kept, too short, blank, bad; and how many sequences came out."""

    texts_read: int = 0
    too_short: int = 0
    blank_lines: int = 0
    sequences: int = 0
    tokens: int = 0
    bad_rows: BadRows = field(default_factory=BadRows)

    def summary(self) -> str:
        parts = [
            f"{self.texts_read} texts read",
            f"{self.too_short} shorter than the minimum skipped",
            f"{self.sequences} training sequences ({self.tokens} tokens)",
        ]
        if self.blank_lines:
            parts.append(f"{self.blank_lines} blank lines ignored")
        if self.bad_rows.total:
            parts.append(self.bad_rows.summary())
        return "; ".join(parts)


def _is_plain_text(path: Path) -> bool:
    return path.name.lower().endswith(PLAIN_TEXT_SUFFIXES)


def _iter_plain_text(path: Path, stats: CorpusStats, on_bad_rows: str) -> Iterator[str]:
    """One document per line. Lines are decoded one by one so a bad byte names its line."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        str(path), line_no, f"invalid UTF-8 ({e.reason})", reason="invalid UTF-8"
                    ) from None
                if "\x00" in line:
                    raise DataError(str(path), line_no, "line contains a NUL byte", reason="NUL byte")
            except DataError as error:
                handle_bad_row(error, on_bad_rows, stats.bad_rows)
                continue
            line = line.rstrip("\r\n")
            if not line.strip():
                stats.blank_lines += 1
                continue
            yield line


def _iter_field(
    records: Iterable[tuple[int, dict]], source: str, text_field: str, stats: CorpusStats, on_bad_rows: str
) -> Iterator[str]:
    for row, record in records:
        try:
            yield check_text(record.get(text_field), source=source, row=row, field=text_field)
        except DataError as error:
            handle_bad_row(error, on_bad_rows, stats.bad_rows)


def _iter_hub_streaming(name: str, split: str) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:
        raise DataError(
            name, None, f"cannot stream dataset (not a local file, and the Hub said: {e})"
        ) from None
    for i, record in enumerate(dataset, start=1):
        yield i, dict(record)


def iter_texts(
    source: str,
    *,
    text_field: str = "text",
    split: str = "train",
    on_bad_rows: str = "error",
    stats: CorpusStats | None = None,
    streaming: bool = False,
) -> Iterator[str]:
    """Yield the raw texts of ``source`` lazily (local files are read line by line).

    ``streaming`` matters only for Hub datasets (``datasets`` streaming mode instead of a full
    download); local files are never loaded whole.
    """
    stats = stats if stats is not None else CorpusStats()

    def on_error(error: DataError) -> None:  # an unparsable line: raise, or count and skip
        handle_bad_row(error, on_bad_rows, stats.bad_rows)

    path = Path(source)
    if path.is_dir() and any(_is_plain_text(p) for p in path.iterdir() if p.is_file()):
        for file in sorted(p for p in path.iterdir() if p.is_file() and _is_plain_text(p)):
            yield from _iter_plain_text(file, stats, on_bad_rows)
        # Record files next to the text files are read too, so a mixed folder loses nothing.
        others = [
            p for p in path.iterdir() if p.is_file() and not _is_plain_text(p) and not p.name.startswith(".")
        ]
        for file in sorted(others):
            yield from _iter_field(
                iter_records(file, on_error=on_error), str(file), text_field, stats, on_bad_rows
            )
        return
    if path.is_file() and _is_plain_text(path):
        yield from _iter_plain_text(path, stats, on_bad_rows)
        return
    is_local = path.exists() or path.suffix or str(source).startswith((".", "/"))
    records = (
        _iter_hub_streaming(source, split)
        if streaming and not is_local
        else iter_records(source, split=split, on_error=on_error)
    )
    yield from _iter_field(records, str(source), text_field, stats, on_bad_rows)


def token_lengths(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[int]]:
    """Token counts without special tokens (what a text costs inside a sequence)."""

    def lengths(texts: list[str]) -> list[int]:
        ids = tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]
        return [len(x) for x in ids]

    return lengths


def filter_and_join(
    texts: Iterable[str],
    length_fn: Callable[[list[str]], list[int]],
    *,
    min_tokens: int = 0,
    join_to: int | None = None,
    separator: str = " ",
    stats: CorpusStats | None = None,
    chunk_size: int = 512,
) -> Iterator[tuple[str, int]]:
    """Drop (and count) texts under ``min_tokens``; with ``join_to``, greedily join neighbours.

    Yields ``(text, tokens)``. Joining keeps order and never splits a text: a text that does not
    fit starts the next sequence, and one longer than ``join_to`` stands alone (truncated later).
    """
    stats = stats if stats is not None else CorpusStats()
    pending: list[str] = []
    pending_tokens = 0

    def emit(text: str, n: int) -> tuple[str, int]:
        stats.sequences += 1
        stats.tokens += n
        return text, n

    def chunks() -> Iterator[list[str]]:
        buffer: list[str] = []
        for text in texts:
            buffer.append(text)
            if len(buffer) == chunk_size:
                yield buffer
                buffer = []
        if buffer:
            yield buffer

    for chunk in chunks():
        for text, n in zip(chunk, length_fn(chunk), strict=True):
            stats.texts_read += 1
            if n < min_tokens:
                stats.too_short += 1
                continue
            if join_to is None:
                yield emit(text, n)
                continue
            if pending and pending_tokens + n > join_to:
                yield emit(separator.join(pending), pending_tokens)
                pending, pending_tokens = [], 0
            pending.append(text)
            pending_tokens += n
    if pending:
        yield emit(separator.join(pending), pending_tokens)


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffling of a stream with ``size`` items in memory (``size <= 1``: no shuffle)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class StreamingBatches:
    """Batches from a text stream too large for memory, with the interface the training loop uses.

    ``make_stream()`` returns a fresh iterator over the (filtered, joined) texts; it is called
    once per pass and passes repeat until ``num_batches`` batches are out, so ``len()`` is known
    up front. Texts are dealt round-robin to ``world_size`` processes (every process yields the
    same number of batches). Order depends only on ``seed`` and the pass, so a resumed run skips
    to exactly where it stopped (``set_epoch(epoch, start_batch)``, called by the loop) without
    collating the skipped batches.
    """

    def __init__(
        self,
        make_stream: Callable[[], Iterator[str]],
        collate_fn: Callable[[list[dict]], Any],
        *,
        batch_size: int,
        num_batches: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle_buffer_size: int = 10_000,
    ) -> None:
        if num_batches < 1:
            raise ValueError("streaming needs a known number of batches: set train.max_steps > 0")
        self.make_stream = make_stream
        self.collate_fn = collate_fn
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.epoch = 0
        self.start_batch = 0
        self.batch_sampler = self  # the loop looks for ``batch_sampler.set_epoch``

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.num_batches

    def _text_batches(self) -> Iterator[list[str]]:
        """Endless batches of this process's texts; a batch may span the end of one pass."""
        batch: list[str] = []
        pass_no = 0
        while True:
            rng = random.Random(self.seed * 1_000_003 + self.epoch * 1_009 + pass_no)
            seen = 0
            for i, text in enumerate(shuffle_buffer(self.make_stream(), self.shuffle_buffer_size, rng)):
                seen += 1
                if i % self.world_size != self.rank:
                    continue
                batch.append(text)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if seen < self.world_size:
                raise DataError(
                    "<stream>",
                    None,
                    f"the corpus yielded {seen} texts, too few for {self.world_size} processes",
                )
            pass_no += 1

    def __iter__(self) -> Iterator[Any]:
        for number, texts in enumerate(self._text_batches()):
            if number >= self.num_batches:
                return
            if number < self.start_batch:
                continue
            yield self.collate_fn([{"text": t, "key": (self.epoch, number)} for t in texts])


class KeyedBatches:
    """Wraps a batch sampler so every index carries ``(epoch, batch number)`` to the collator.

    The collator seeds its masking from that key, so masks depend on where a batch sits in
    training, not on a random state that a resume or a loader worker would not reproduce.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch=start_batch)
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for number, indices in enumerate(self.sampler, start=self.start_batch):
            yield [(self.epoch, number, i) for i in indices]


class KeyedTexts:
    """A map-style dataset of texts indexed by :class:`KeyedBatches` keys."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        epoch, number, index = key
        return {"text": self.texts[index], "key": (epoch, number)}
