"""AdamW and its learning-rate schedule, with optional groups of parameters that learn differently.

A recipe that adds new modules to a trained body (RetroMAE's MLM head and decoder on a
sentence-transformers model) may want the body to learn slower than the new parts, or not at all
until they have settled: a :class:`ParamGroup` says so. Holding a group still is done through its
learning rate (0 until ``frozen_steps``), not ``requires_grad``: the parameters stay in the
optimizer and in DDP's or DeepSpeed's buckets from the first step, so nothing is re-wrapped
mid-run and a resume restores the same groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ember_train.config.schema import TrainConfig


@dataclass
class ParamGroup:
    """Parameters trained at ``lr_scale`` x the learning rate, and not at all for ``frozen_steps``
    optimizer steps (their warm-up then starts afresh)."""

    name: str
    params: Iterable[nn.Parameter]
    lr_scale: float = 1.0
    frozen_steps: int = 0


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, groups: Sequence[ParamGroup] = ()
) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and normalisation weights (the BERT convention).

    Parameters of ``groups`` get their own optimizer groups (after the model's other parameters, so
    the first group's learning rate is the configured one); each carries ``group_name`` and
    ``frozen_steps`` for :func:`build_schedule`.
    """
    owner: dict[int, ParamGroup | None] = {}
    for group in groups:
        for param in group.params:
            owner[id(param)] = group
    buckets: dict[tuple[str | None, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            group = owner.get(id(param))
            buckets.setdefault((group.name if group else None, _no_decay(name, param)), []).append(param)
    by_name = {g.name: g for g in groups}
    param_groups = []
    for group_name in [None, *by_name]:
        group = by_name.get(group_name) if group_name else None
        for no_decay in (False, True):
            params = buckets.get((group_name, no_decay), [])
            if not params and group_name is not None:
                continue
            param_groups.append(
                {
                    "params": params,
                    "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                    "lr": cfg.learning_rate * (group.lr_scale if group else 1.0),
                    "group_name": group_name or "",
                    "frozen_steps": group.frozen_steps if group else 0,
                }
            )
    # The fused kernel (CPU and CUDA) does the whole update in one pass over the parameters.
    try:
        return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, fused=True)
    except (RuntimeError, TypeError):  # a device or torch version without the fused kernel
        return torch.optim.AdamW(param_groups, lr=cfg.learning_rate)


def linear_warmup_decay(warmup_steps: int, total_steps: int, start: int = 0) -> Callable[[int], float]:
    """0 before ``start``, then a linear rise over ``warmup_steps`` and a linear fall to 0 at
    ``total_steps`` (with ``start=0``: transformers' ``get_linear_schedule_with_warmup``)."""

    def factor(step: int) -> float:
        if step < start:
            return 0.0
        if step - start < warmup_steps:
            return float(step - start) / float(max(1, warmup_steps))
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - start - warmup_steps)))

    return factor


def build_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, frozen_steps: Sequence[int]
) -> LambdaLR:
    """One linear warm-up/decay per optimizer group, starting after the group's frozen steps.

    ``frozen_steps`` is read from the optimizer :func:`build_optimizer` made, one per group: an
    engine that wraps it (DeepSpeed) keeps the groups in order but need not keep their extra keys.
    """
    if len(frozen_steps) != len(optimizer.param_groups):
        raise RuntimeError(
            f"the optimizer has {len(optimizer.param_groups)} parameter groups, the schedule "
            f"{len(frozen_steps)}: the wrapped optimizer regrouped its parameters"
        )
    return LambdaLR(
        optimizer, [linear_warmup_decay(warmup_steps, total_steps, start=n) for n in frozen_steps]
    )


def group_learning_rates(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> dict[str, float]:
    """``lr/<name>`` of each named group (``names`` as built, one per group), for the metrics log;
    the first group's is the run's ``lr``."""
    rates = {}
    for name, group in zip(names, optimizer.param_groups, strict=True):
        if name:
            rates[f"lr/{name}"] = group["lr"]
    return rates
