"""Read records from user data with row numbers, and turn every data problem into a clear error.

Users bring messy files. Every problem must name the file, the row and the field, and with
``on_bad_rows: skip`` every skipped row is counted, never dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ErrorHandler = Callable[["DataError"], None]

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet",)
ON_BAD_ROWS = ("error", "skip")
# One record per line: a longer line is almost always a file without newlines (or a dump of a
# whole corpus into one cell). It is reported, never read whole into memory.
MAX_LINE_BYTES = 8 * 2**20
_CHUNK = 2**20


class DataError(ValueError):
    """A problem in user data; the message names the source, the row and the field."""

    def __init__(self, source: str, row: int | None, problem: str, reason: str | None = None) -> None:
        where = f"{source}: row {row}" if row is not None else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.row = row
        self.problem = problem
        self.reason = reason or problem


class BadRows:
    """Counts rows skipped under ``on_bad_rows: skip``, by reason, with a few examples."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def add(self, error: DataError) -> None:
        self.counts[error.reason] += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "no bad rows"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"skipped {self.total} bad rows ({reasons}); first: {self.examples[0]}"


def handle_bad_row(error: DataError, on_bad_rows: str, bad: BadRows) -> None:
    """Raise the error (``error``) or count it (``skip``)."""
    if on_bad_rows == "skip":
        bad.add(error)
        return
    if on_bad_rows != "error":
        raise ValueError(f"on_bad_rows must be one of {ON_BAD_ROWS}, got {on_bad_rows!r}")
    raise error


def check_text(value: Any, *, source: str, row: int, field: str) -> str:
    """Return ``value`` if it is a non-empty string, else raise a DataError naming the field."""
    if value is None:
        raise DataError(source, row, f"field {field!r} is missing", reason=f"missing {field}")
    if not isinstance(value, str):
        raise DataError(
            source,
            row,
            f"field {field!r} must be a string, got {type(value).__name__}",
            reason=f"non-string {field}",
        )
    if not value.strip():
        raise DataError(source, row, f"field {field!r} is empty", reason=f"empty {field}")
    if "\x00" in value:
        raise DataError(source, row, f"field {field!r} contains a NUL byte", reason=f"NUL byte in {field}")
    return value


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    # Strict decoding: invalid UTF-8 is reported with its line, not replaced silently.
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def _read_lines(f: io.BufferedIOBase) -> Iterator[tuple[int, bytes | None]]:
    """``(line_no, raw)`` per physical line; ``raw`` is None for a line over ``MAX_LINE_BYTES``.

    Reads with a bounded ``readline`` so a file without newlines never has to fit in memory.
    """
    line_no = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):  # consume the rest of the line in chunks
                raw = f.readline(_CHUNK)
            yield line_no, None
        else:
            yield line_no, raw


def _too_long(source: str, line_no: int) -> DataError:
    return DataError(
        source,
        line_no,
        f"line is longer than {MAX_LINE_BYTES // 2**20} MiB (one record per line; is a newline missing?)",
        reason="line too long",
    )


def _iter_json_lines(path: Path, on_error: ErrorHandler | None = None) -> Iterator[tuple[int, dict]]:
    source = str(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, raw in _read_lines(f):
            try:
                if raw is None:
                    raise _too_long(source, line_no)
                record = _parse_json_line(raw, source, line_no)
            except DataError as e:
                if on_error is None:
                    raise
                on_error(e)
                continue
            if record is not None:
                yield line_no, record


def _parse_json_line(raw: bytes, source: str, line_no: int) -> dict | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            source, line_no, f"invalid UTF-8 ({e.reason} at byte {e.start})", reason="invalid UTF-8"
        ) from None
    if line_no == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
    if not line.strip():
        return None
    if "\x00" in line:
        raise DataError(source, line_no, "line contains a NUL byte", reason="NUL byte")
    try:
        # Without its newline, so a line cut short is reported at its end, not at "line 2 column 1".
        record = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        raise DataError(
            source, line_no, f"invalid JSON ({e.msg} at column {e.colno})", reason="invalid JSON"
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            source, line_no, f"expected a JSON object, got {type(record).__name__}", reason="not an object"
        )
    return record


def _iter_json_array(path: Path, on_error: ErrorHandler | None = None) -> Iterator[tuple[int, dict]]:
    source = str(path)
    try:
        with _open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(source, None, f"invalid UTF-8 ({e.reason})", reason="invalid UTF-8") from None
    stripped = text.lstrip()
    if not stripped.startswith("["):
        # A .json file holding one object per line.
        yield from _iter_json_lines(path, on_error)
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(source, e.lineno, f"invalid JSON ({e.msg})", reason="invalid JSON") from None
    for i, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataError(
                source, i, f"expected a JSON object, got {type(record).__name__}", reason="not an object"
            )
        yield i, record


def _decoded_lines(path: Path, on_error: ErrorHandler | None, where: list[int]) -> Iterator[str]:
    """Decode a CSV file line by line so a bad byte or an endless line names its line.

    ``where[0]`` is kept at the physical line number last read (the csv module only counts the
    lines it was given, and bad lines handed to ``on_error`` are not given to it).
    """
    source = str(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_no, raw in _read_lines(f):
            where[0] = line_no
            try:
                if raw is None:
                    raise _too_long(source, line_no)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        source,
                        line_no,
                        f"invalid UTF-8 ({e.reason} at byte {e.start})",
                        reason="invalid UTF-8",
                    ) from None
            except DataError as e:
                if on_error is None or line_no == 1:  # a bad header line is a bad file
                    raise
                on_error(e)
                continue
            yield line.removeprefix("\ufeff") if line_no == 1 else line  # spreadsheets write a BOM


def _iter_csv(path: Path, on_error: ErrorHandler | None = None) -> Iterator[tuple[int, dict]]:
    source = str(path)
    delimiter = "\t" if ".tsv" in path.name else ","
    # Records may be as long as a JSONL line (the module's default cell limit is 128 KiB).
    csv.field_size_limit(max(csv.field_size_limit(), MAX_LINE_BYTES))
    where = [0]
    reader = csv.reader(_decoded_lines(path, on_error, where), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise DataError(source, where[0], f"malformed CSV header ({e})", reason="malformed CSV") from None
    if header is None:
        return
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(source, 1, f"the header repeats column {repeated[0]!r}", reason="bad header")
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            # Row = the line the csv module stopped on (a spreadsheet's row number for one-line rows).
            error = DataError(source, where[0], f"malformed CSV ({e})", reason="malformed CSV")
            if on_error is None:
                raise error from None
            on_error(error)
            continue
        if not fields:
            continue  # a blank line
        if len(fields) != len(header):
            more = "more" if len(fields) > len(header) else "fewer"
            error = DataError(
                source,
                where[0],
                f"row has {len(fields)} field{'s' * (len(fields) != 1)}, {more} than the header's "
                f"{len(header)} ({', '.join(header)})",
                reason=f"{more} fields than the header",
            )
            if on_error is None:
                raise error
            on_error(error)
            continue
        yield where[0], dict(zip(header, fields, strict=True))


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(str(path), None, f"cannot read Parquet file ({e})", reason="bad Parquet") from None
    yield from enumerate(table.to_pylist(), start=1)


def _iter_file(path: Path, on_error: ErrorHandler | None) -> Iterator[tuple[int, dict]]:
    name = path.name.lower()
    if name.endswith((".json", ".json.gz")):
        yield from _iter_json_array(path, on_error)
    elif name.endswith(JSON_SUFFIXES):
        yield from _iter_json_lines(path, on_error)
    elif name.endswith(CSV_SUFFIXES):
        yield from _iter_csv(path, on_error)
    elif name.endswith(PARQUET_SUFFIXES):
        yield from _iter_parquet(path)
    else:
        raise DataError(
            str(path),
            None,
            f"unsupported file type; use one of {JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES}",
        )


def _iter_hub(name: str, split: str) -> Iterator[tuple[int, dict]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(
            name, None, f"cannot load dataset (not a local file, and the Hub said: {e})"
        ) from None
    for i, record in enumerate(dataset, start=1):
        yield i, dict(record)


def iter_sourced_records(
    source: str | Path, *, split: str = "train", on_error: ErrorHandler | None = None
) -> Iterator[tuple[str, int, dict]]:
    """Like :func:`iter_records`, with the file each record came from.

    For a directory of shards, validation errors must name the shard, not the directory.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.name.lower().endswith(JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES)
        )
        if not files:
            raise DataError(str(path), None, "directory holds no .jsonl/.json/.csv/.tsv/.parquet files")
        for file in files:
            for row, record in _iter_file(file, on_error):
                yield str(file), row, record
        return
    if path.is_file():
        for row, record in _iter_file(path, on_error):
            yield str(path), row, record
        return
    if path.suffix or str(source).startswith((".", "/")):
        raise DataError(str(source), None, "file not found")
    for row, record in _iter_hub(str(source), split):
        yield str(source), row, record


def iter_records(
    source: str | Path, *, split: str = "train", on_error: ErrorHandler | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, record)`` from a file, a directory of files, or a Hub dataset name.

    An unparsable line (bad JSON, bad UTF-8, a line over ``MAX_LINE_BYTES``, a CSV row with the
    wrong number of fields) raises a DataError, or, when ``on_error`` is given, is passed to it
    and reading goes on (``on_bad_rows: skip``).

    Row numbers are 1-based line numbers for JSONL and CSV (so users can open the file at
    that line), and 1-based record indices for Parquet, JSON arrays and Hub datasets.
    """
    for _, row, record in iter_sourced_records(source, split=split, on_error=on_error):
        yield row, record
