"""Process-group helpers for the training side: sharded maps, global counts, CPU group settings.

Gathering embeddings with exact gradients (cross-device negatives) is the losses' own:
:mod:`ember_train.losses.gather`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ember_train.losses.gather import is_distributed

T = TypeVar("T")
R = TypeVar("R")


def map_sharded(fn: Callable[[list[T]], list[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)`` (one result per item, in order), each process computing every N-th item.

    For per-item work that every process needs in full, such as the token lengths behind
    length-grouped batching: N processes each do 1/N of it and exchange the results
    (``all_gather_object``), instead of each doing all of it. On one process: ``fn(items)``.
    """
    if not is_distributed():
        return fn(list(items))
    world, rank = dist.get_world_size(), dist.get_rank()
    local = fn(list(items[rank::world]))
    shards: list[list[R] | None] = [None] * world
    dist.all_gather_object(shards, local)
    results: list[R] = [None] * len(items)  # type: ignore[list-item]
    for r, shard in enumerate(shards):
        results[r::world] = shard  # type: ignore[assignment]
    return results


class ShardedEncoder:
    """``encode`` with each process embedding every N-th text; every process gets every vector.

    Wraps anything with ``encode(texts, batch_size, kind)`` (an ``Encoder``); mining with it on
    N processes gives each the same embeddings, hence the same negatives.
    """

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def encode(self, texts: Sequence[str], batch_size: int = 64, kind: str | None = None) -> torch.Tensor:
        def embed(shard: list[str]) -> list[torch.Tensor]:
            return list(self.encoder.encode(shard, batch_size=batch_size, kind=kind)) if shard else []

        return torch.stack(map_sharded(embed, list(texts)))


def global_count(
    local_count: int, device: torch.device, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> int:
    """Sum of ``local_count`` over processes (the global batch size); ``op=MAX``: the largest."""
    if not is_distributed():
        return local_count
    t = torch.tensor([local_count], device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def decide_on_main(accelerator: Any, compute: Callable[[], float]) -> float:
    """``compute()`` on the main process, the same number on every process.

    A ValueError on the main process (a bad ``eval.select`` key) is raised on every process,
    instead of leaving the others waiting in a collective for a process that has stopped.
    """
    value, error = 0.0, ""
    if accelerator.is_main_process:
        try:
            value = float(compute())
        except ValueError as e:
            error = str(e)
    if accelerator.num_processes == 1:
        if error:
            raise ValueError(error)
        return value
    packed = torch.tensor([value, 1.0 if error else 0.0], dtype=torch.float64, device=accelerator.device)
    from accelerate.utils import broadcast

    packed = broadcast(packed, from_process=0)
    if packed[1].item():
        raise ValueError(error or "the main process stopped the run (its error message says why)")
    return float(packed[0].item())


def cpu_process_group_kwargs() -> dict:
    """Arguments for ``Accelerator`` so that several processes on a machine without CUDA form a
    gloo process group; empty when there is one process or a GPU.

    accelerate only picks gloo (MULTI_CPU) when asked for the CPU explicitly, and
    ``accelerate launch --cpu`` starts a single process; so ``--multi_gpu --num_processes N`` on a
    CPU machine needs ``cpu=True``. Under DeepSpeed, ``cpu=True`` would silently turn DeepSpeed off
    (accelerate then trains plain DDP), so the backend is named instead and DeepSpeed's CPU
    accelerator runs on gloo.
    """
    import os

    from accelerate.utils import InitProcessGroupKwargs

    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}
