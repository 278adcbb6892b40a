"""``merge.alpha: auto``: the tuned/base interpolation weight chosen on domain and general evaluations.

For every candidate alpha the model is set to ``alpha * tuned + (1 - alpha) * base``
(:func:`ember_train.models.merge.interpolate_state_dicts`) and scored twice: on the domain
evaluation and on the general slice. The rule (:func:`choose_alpha`): the best domain score among
the alphas that lose at most ``max_general_drop`` points of the base's general score; when none
does, the best general score. A budget in points is what a user can state ("keep general ability
within one point"); a weighted sum of nDCG and Spearman would need a weight that means nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ember_train.models.merge import interpolate_state_dicts

MERGE_RULE = (
    "the best domain score among the alphas whose general score is at most {drop:g} points below "
    "the base's (else the best general score)"
)


@dataclass
class MergePoint:
    """One alpha's scores (MTEB x100 scale), with the gain and loss against the base (alpha 0)."""

    alpha: float
    domain: float
    general: float
    domain_gain: float = 0.0  # domain - base domain
    general_loss: float = 0.0  # base general - general (positive: ability lost)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def choose_alpha(
    points: Sequence[MergePoint], candidates: Sequence[float], max_general_drop: float
) -> MergePoint:
    """The rule above, over ``candidates`` (ties: the smaller general loss, then the larger alpha)."""
    pool = [p for p in points if p.alpha in candidates]
    within = [p for p in pool if p.general_loss <= max_general_drop + 1e-9]
    if within:
        return max(within, key=lambda p: (p.domain, -p.general_loss, p.alpha))
    return max(pool, key=lambda p: (p.general, p.domain, p.alpha))


def score_alphas(
    model: torch.nn.Module,
    tuned: dict[str, torch.Tensor],
    base: dict[str, torch.Tensor],
    alphas: Sequence[float],
    score: Callable[[], tuple[float, float]],
    log: Callable[[str], None] = print,
) -> list[MergePoint]:
    """Load each merge into ``model`` and ``score()`` it as (domain, general); the base (alpha 0)
    is always scored, as the reference. ``model`` holds the last merge afterwards."""
    points: list[MergePoint] = []
    for alpha in sorted({0.0, *alphas}):
        model.load_state_dict(interpolate_state_dicts(tuned, base, alpha))
        domain, general = score()
        points.append(MergePoint(alpha, domain, general))
        log(f"merge alpha {alpha:.2f}: domain {domain:.2f}, general {general:.2f}")
    reference = points[0]
    for p in points:
        p.domain_gain = p.domain - reference.domain
        p.general_loss = reference.general - p.general
    return points


def format_table(points: Sequence[MergePoint], chosen: float | None = None) -> str:
    """The alpha table as Markdown (printed, and kept in results.json's ``merge.table``)."""
    lines = [
        "| alpha | domain | general | domain gain | general loss |",
        "|---|---|---|---|---|",
    ]
    for p in points:
        mark = " (chosen)" if chosen is not None and p.alpha == chosen else ""
        lines.append(
            f"| {p.alpha:.2f}{mark} | {p.domain:.2f} | {p.general:.2f} | {p.domain_gain:+.2f} | {p.general_loss:+.2f} |"
        )
    return "\n".join(lines)
