"""``eval.select``: which evaluation metric (or weighted sum of metrics) picks the best checkpoint.

An expression is one metric key as logged (``dev/ndcg@10``; an ``eval/`` prefix is allowed), or a
weighted sum of them: ``0.7*dev/ndcg@10 + 0.3*STSB-300/cosine_spearman``. Keys are
``<dataset>/<metric>`` with the dataset named as in the evaluation log. A sum lets a run trade the
domain score against a general one without a second mechanism.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

_TERM = re.compile(r"^\s*(?:([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(\S+?)\s*$")


@dataclass(frozen=True)
class MetricSelector:
    """A parsed ``eval.select``: ``score(metrics)`` is the number to maximise or minimise."""

    terms: tuple[tuple[float, str], ...]  # (weight, metric key)
    mode: Literal["max", "min"] = "max"

    @classmethod
    def parse(cls, expression: str, mode: str = "max") -> MetricSelector:
        """Parse ``expression``; a ValueError says what is wrong with it."""
        if mode not in ("max", "min"):
            raise ValueError(f"select_mode must be max or min, got {mode!r}")
        terms = []
        for part in str(expression).split("+"):
            match = _TERM.match(part)
            if not match or "/" not in match.group(2):
                raise ValueError(
                    f"select: cannot read {part.strip()!r} in {expression!r}; use a logged metric key "
                    "such as dev/ndcg@10, or a weighted sum such as 0.7*dev/ndcg@10 + 0.3*STSB-300/cosine_spearman"
                )
            weight = float(match.group(1)) if match.group(1) else 1.0
            key = match.group(2).removeprefix("eval/")
            terms.append((weight, key))
        return cls(tuple(terms), mode)  # type: ignore[arg-type]

    @property
    def datasets(self) -> list[str]:
        return [key.split("/", 1)[0] for _, key in self.terms]

    def check_datasets(self, available: list[str]) -> None:
        """Before training: every term names a configured evaluation set."""
        missing = [d for d in self.datasets if d not in available]
        if missing:
            raise ValueError(
                f"eval.select names evaluation set(s) {missing} that are not configured; "
                f"the evaluation sets are {available}"
            )

    def score(self, metrics: dict[str, float]) -> float:
        """The selection score of one evaluation's ``{dataset/metric: value}``."""
        missing = [key for _, key in self.terms if key not in metrics]
        if missing:
            raise ValueError(f"eval.select: no metric {missing[0]!r}; the evaluation logs {sorted(metrics)}")
        return sum(weight * float(metrics[key]) for weight, key in self.terms)

    def better(self, score: float, best: float | None) -> bool:
        """Whether ``score`` beats ``best`` (ties keep the earlier step; NaN never wins)."""
        if math.isnan(score):
            return False
        if best is None:
            return True
        return score > best if self.mode == "max" else score < best

    def __str__(self) -> str:
        return " + ".join(key if w == 1.0 else f"{w:g}*{key}" for w, key in self.terms) + f" ({self.mode})"
