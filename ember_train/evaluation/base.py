"""The result type every evaluator returns, and the small interface evaluators share.

Scores in an :class:`EvalResult` follow the MTEB convention: metrics are percentages
(``0..100``; correlations ``-100..100``), so our numbers read like the published tables.
The metric functions in :mod:`ember_train.evaluation.metrics` work in fractions; evaluators
scale once, when they build the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class SupportsEncode(Protocol):
    """Anything that embeds texts: our :class:`~ember_train.models.Encoder`, or an adapter."""

    def encode(self, texts: Sequence[str], batch_size: int = ..., kind: str | None = ...) -> torch.Tensor: ...


@dataclass
class EvalResult:
    """One task's scores. ``metrics`` are in MTEB's ×100 convention; ``main_metric`` names the headline."""

    task_type: str
    dataset: str
    split: str
    metrics: dict[str, float]
    main_metric: str
    config: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.main_metric not in self.metrics:
            raise ValueError(f"main metric {self.main_metric!r} is not among {sorted(self.metrics)}")

    @property
    def main_score(self) -> float:
        return self.metrics[self.main_metric]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["main_score"] = self.main_score
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        known = {
            k: data[k]
            for k in ("task_type", "dataset", "split", "metrics", "main_metric", "config", "extra")
            if k in data
        }
        return cls(**known)

    def __str__(self) -> str:
        return f"{self.task_type}/{self.dataset} [{self.split}] {self.main_metric}={self.main_score:.2f}"


def percent(metrics: dict[str, float]) -> dict[str, float]:
    """Fractions -> MTEB percentages (rounded only to float noise, never to display precision)."""
    return {k: float(v) * 100.0 for k, v in metrics.items()}


class Evaluator:
    """Base class: an evaluator has a ``name`` and maps an encoder to an :class:`EvalResult`.

    Subclasses implement ``__call__``. They call ``encoder.encode(texts, batch_size=..., kind=...)``
    with ``kind="query"``/``"document"`` where the task is asymmetric and ``None`` otherwise, so
    models trained with prefixes are evaluated the way they are used.
    """

    task_type: str = ""
    name: str = ""
    split: str = "test"

    def __call__(self, encoder: SupportsEncode) -> EvalResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r})"


def encode(
    encoder: SupportsEncode, texts: Sequence[str], *, batch_size: int, kind: str | None = None
) -> torch.Tensor:
    """Embed with ``encoder`` as a float32 CPU tensor, deduplicating repeated texts first.

    STS and pair sets repeat sentences a lot; encoding each distinct text once is exact (the
    encoder is deterministic in eval mode) and saves time on CPU.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("nothing to encode")
    unique: dict[str, int] = {}
    index = [unique.setdefault(t, len(unique)) for t in texts]
    emb = encoder.encode(list(unique), batch_size=batch_size, kind=kind)
    emb = torch.as_tensor(emb).float().cpu()
    return emb[torch.tensor(index)]
