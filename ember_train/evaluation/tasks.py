"""Task descriptors: small YAML/JSON files that turn local data into an evaluator.

A descriptor names the task type, a display name, the split and where the data lives::

    type: STS                      # STS | Classification | Reranking | Retrieval | Clustering | PairClassification
    name: STSBenchmark
    split: test
    path: ${EMBER_EVAL_ROOT}/STSBenchmark/test.jsonl
    columns: {sentence1: sentence1, sentence2: sentence2, score: score}   # optional renames

Paths may use ``${VAR}`` (environment variables; ``load_task(..., data_root=...)`` sets
``EMBER_EVAL_ROOT``); a relative path is relative to the descriptor's own folder, so a
descriptor can sit next to its data. Files are read with :func:`ember_train.data.reader.iter_records`
(JSONL/JSON/CSV/TSV/Parquet), and bad rows raise by default (``on_bad_rows: skip`` counts them).

Per-type keys: ``path`` (STS, PairClassification, Reranking, Clustering, Retrieval: a BEIR
folder), ``train_path`` + ``test_path`` (Classification). Optional: ``batch_size``, ``limit``
(first N rows, for quick checks during training), and the evaluator's own knobs
(``n_experiments``, ``samples_per_label``, ``k_values``, ``mrr_at_k``, ``seed``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from ember_train.data.reader import BadRows, DataError, check_text, handle_bad_row, iter_records
from ember_train.evaluation.base import Evaluator
from ember_train.evaluation.classification import ClassificationEvaluator
from ember_train.evaluation.clustering import ClusteringEvaluator
from ember_train.evaluation.pair_classification import PairClassificationEvaluator
from ember_train.evaluation.reranking import RerankingEvaluator, RerankSample
from ember_train.evaluation.retrieval import RetrievalEvaluator
from ember_train.evaluation.sts import STSEvaluator

logger = logging.getLogger(__name__)

ROOT_VAR = "EMBER_EVAL_ROOT"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "STS": {"sentence1": "sentence1", "sentence2": "sentence2", "score": "score"},
    "PairClassification": {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"},
    "Classification": {"text": "text", "label": "label"},
    "Clustering": {"text": "text", "label": "label", "set": "set"},
    "Reranking": {"query": "query", "positive": "positive", "negative": "negative"},
    "Retrieval": {},
}
COMMON_KEYS = {
    "type",
    "name",
    "split",
    "path",
    "train_path",
    "test_path",
    "columns",
    "batch_size",
    "limit",
    "on_bad_rows",
}
EXTRA_KEYS = {
    "STS": set(),
    "PairClassification": set(),
    "Classification": {"n_experiments", "samples_per_label", "max_iter", "seed"},
    "Clustering": {"clustering_batch_size", "seed"},
    "Reranking": {"mrr_at_k"},
    "Retrieval": {"k_values"},
}


class TaskError(ValueError):
    """A descriptor problem; the message names the descriptor file and the key."""


def _expand(value: str, *, descriptor: Path, env: dict[str, str]) -> Path:
    def sub(match: re.Match) -> str:
        var = match.group(1)
        if var not in env:
            hint = " (pass --data-root)" if var == ROOT_VAR else ""
            raise TaskError(f"{descriptor}: ${{{var}}} is not set{hint}")
        return env[var]

    path = Path(_VAR.sub(sub, value)).expanduser()
    return path if path.is_absolute() else (descriptor.parent / path)


def read_descriptor(path: str | Path) -> dict[str, Any]:
    """Parse a descriptor file (``.yaml``/``.yml``/``.json``) into a dict, checking its keys."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task descriptor not found")
    text = path.read_text(encoding="utf-8")
    try:
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise TaskError(f"{path}: cannot parse descriptor ({e})") from None
    if not isinstance(spec, dict):
        raise TaskError(f"{path}: a descriptor is a mapping with at least 'type' and 'name'")
    task_type = spec.get("type")
    if task_type not in DEFAULT_COLUMNS:
        raise TaskError(f"{path}: 'type' must be one of {sorted(DEFAULT_COLUMNS)}, got {task_type!r}")
    unknown = set(spec) - COMMON_KEYS - EXTRA_KEYS[task_type]
    if unknown:
        raise TaskError(f"{path}: unknown keys {sorted(unknown)} for a {task_type} task")
    spec.setdefault("name", path.stem)
    spec.setdefault("split", "test")
    return spec


def load_task(
    path: str | Path, *, data_root: str | Path | None = None, batch_size: int | None = None
) -> Evaluator:
    """Build the evaluator a descriptor describes. ``data_root`` fills ``${EMBER_EVAL_ROOT}``."""
    descriptor = Path(path)
    spec = read_descriptor(descriptor)
    env = dict(os.environ)
    if data_root is not None:
        env[ROOT_VAR] = str(Path(data_root).resolve())  # relative to the caller, not the descriptor
    task_type = spec["type"]
    columns = {**DEFAULT_COLUMNS[task_type], **(spec.get("columns") or {})}
    common = {"name": str(spec["name"]), "split": str(spec["split"])}
    bs = batch_size or spec.get("batch_size")
    if bs:
        common["batch_size"] = int(bs)
    extra = {k: spec[k] for k in EXTRA_KEYS[task_type] if k in spec}

    def need(key: str) -> Path:
        if key not in spec:
            raise TaskError(f"{descriptor}: a {task_type} task needs '{key}'")
        return _expand(str(spec[key]), descriptor=descriptor, env=env)

    reader = _RowReader(columns, limit=spec.get("limit"), on_bad_rows=spec.get("on_bad_rows", "error"))
    if task_type == "Retrieval":
        if "k_values" in extra:
            extra["k_values"] = tuple(int(k) for k in extra["k_values"])
        folder = need("path")
        if not folder.is_dir():
            raise TaskError(
                f"{descriptor}: 'path' must be a BEIR folder (corpus.jsonl, queries.jsonl, qrels/), got {folder}"
            )
        return RetrievalEvaluator.from_beir(folder, **common, **extra)
    if task_type == "STS":
        rows = reader.rows(need("path"), text=("sentence1", "sentence2"), number=("score",))
        return STSEvaluator(
            [r["sentence1"] for r in rows],
            [r["sentence2"] for r in rows],
            [r["score"] for r in rows],
            **common,
        )
    if task_type == "PairClassification":
        rows = reader.rows(need("path"), text=("sentence1", "sentence2"), number=("label",))
        return PairClassificationEvaluator(
            [r["sentence1"] for r in rows],
            [r["sentence2"] for r in rows],
            [int(r["label"]) for r in rows],
            **common,
        )
    if task_type == "Classification":
        train = reader.rows(need("train_path"), text=("text",), label=("label",))
        test = reader.rows(need("test_path"), text=("text",), label=("label",))
        return ClassificationEvaluator(
            [r["text"] for r in train],
            [r["label"] for r in train],
            [r["text"] for r in test],
            [r["label"] for r in test],
            **common,
            **extra,
        )
    if task_type == "Clustering":
        rows = reader.rows(need("path"), text=("text",), label=("label",), optional=("set",))
        groups: dict[Any, tuple[list[str], list[Any]]] = {}
        for r in rows:
            texts, labels = groups.setdefault(r.get("set"), ([], []))
            texts.append(r["text"])
            labels.append(r["label"])
        return ClusteringEvaluator(
            [g[0] for g in groups.values()], [g[1] for g in groups.values()], **common, **extra
        )
    if task_type == "Reranking":
        rows = reader.rows(need("path"), text=("query",), text_lists=("positive", "negative"))
        samples = [RerankSample(r["query"], r["positive"], r["negative"]) for r in rows]
        return RerankingEvaluator(samples, **common, **extra)
    raise TaskError(f"{descriptor}: unsupported type {task_type!r}")  # pragma: no cover - checked above


def load_tasks(
    paths: list[str | Path], *, data_root: str | Path | None = None, batch_size: int | None = None
) -> list[Evaluator]:
    """Several descriptors; a directory stands for every ``*.yaml``/``*.yml``/``*.json`` in it."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix in (".yaml", ".yml", ".json"))
        else:
            files.append(p)
    return [load_task(f, data_root=data_root, batch_size=batch_size) for f in files]


class _RowReader:
    """Reads and validates rows with column renames, a row limit and the bad-row policy."""

    def __init__(self, columns: dict[str, str], *, limit: int | None, on_bad_rows: str) -> None:
        self.columns = columns
        self.limit = int(limit) if limit else None
        self.on_bad_rows = on_bad_rows

    def rows(
        self,
        path: Path,
        *,
        text: tuple[str, ...] = (),
        number: tuple[str, ...] = (),
        label: tuple[str, ...] = (),
        text_lists: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
    ) -> list[dict[str, Any]]:
        bad = BadRows()
        out: list[dict[str, Any]] = []
        for row, rec in self._records(path, on_error=lambda e: handle_bad_row(e, self.on_bad_rows, bad)):
            try:
                out.append(self._parse(rec, str(path), row, text, number, label, text_lists, optional))
            except DataError as e:
                handle_bad_row(e, self.on_bad_rows, bad)
            if self.limit and len(out) >= self.limit:
                break
        if bad.total:
            logger.warning("%s: %s", path, bad.summary())
        if not out:
            raise DataError(str(path), None, "no usable rows")
        return out

    @staticmethod
    def _records(path: Path, on_error: Callable[[DataError], None]) -> Iterator[tuple[int, dict]]:
        if not path.exists():
            raise DataError(str(path), None, "file not found")
        yield from iter_records(path, on_error=on_error)

    def _parse(self, rec, source, row, text, number, label, text_lists, optional) -> dict[str, Any]:
        parsed: dict[str, Any] = {}
        get: Callable[[str], Any] = lambda key: rec.get(self.columns.get(key, key))  # noqa: E731
        for key in text:
            parsed[key] = check_text(get(key), source=source, row=row, field=self.columns.get(key, key))
        for key in number:
            value = get(key)
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                raise DataError(
                    source, row, f"field {self.columns.get(key, key)!r} must be a number, got {value!r}"
                ) from None
        for key in label:
            value = get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                raise DataError(
                    source, row, f"field {self.columns.get(key, key)!r} is missing", reason=f"missing {key}"
                )
            parsed[key] = value
        for key in text_lists:
            value = get(key)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise DataError(
                    source, row, f"field {self.columns.get(key, key)!r} must be a list of strings"
                )
            parsed[key] = [
                check_text(v, source=source, row=row, field=f"{self.columns.get(key, key)}[{i}]")
                for i, v in enumerate(value)
            ]
        for key in optional:
            parsed[key] = get(key)
        return parsed
