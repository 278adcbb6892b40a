"""Metrics: a JSONL file in the output directory, optional wandb, and the progress bar's numbers."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from accelerate import Accelerator

logger = logging.getLogger(__name__)

# Metric keys that are counts to add up over a log window rather than values to average.
COUNTER_KEYS = ("samples", "tokens", "padding_tokens")


class MetricsLogger:
    """Averages per-step metrics over a log window and writes them where the config asks."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, report_to: list[str]) -> None:
        self.accelerator = accelerator
        self.path = output_dir / "metrics.jsonl"
        self.use_jsonl = "jsonl" in report_to
        self.use_wandb = "wandb" in report_to
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._window_start = time.perf_counter()

    def accumulate(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
            self._counts[key] = self._counts.get(key, 0) + 1

    def flush(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Average the window (sum counters, turn them into per-second rates) and write one record."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        record: dict[str, float] = {}
        for key, total in self._sums.items():
            if key in COUNTER_KEYS:
                record[f"{key}_per_s"] = total / elapsed
            else:
                record[key] = total / self._counts[key]
        if "tokens" in self._sums and "padding_tokens" in self._sums:
            padded = self._sums["tokens"] + self._sums["padding_tokens"]
            record["padding_fraction"] = self._sums["padding_tokens"] / max(padded, 1.0)
        # Counters are summed on this process only; scale rates to all processes.
        for key in list(record):
            if key.endswith("_per_s"):
                record[key] *= self.accelerator.num_processes
        record.update(extra or {})
        self.log(step, record)
        self._sums.clear()
        self._counts.clear()
        self._window_start = time.perf_counter()
        return record

    def log(self, step: int, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        if self.use_jsonl:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")
        if self.use_wandb:
            self.accelerator.log(record, step=step)
