"""CPU speedups: the same numbers (or the same distribution), faster. Each is one file, one
``train.*`` flag and one line in :func:`apply_speedups`, which the training loop calls once.

``dropout`` (+ ``dropout_kernel`` and its C file): seeded dropout masks (``train.fast_cpu_dropout``).
``embedding_grad``: one persistent word-embedding gradient buffer (``train.fast_cpu_embedding_grad``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ember_train.speedups.dropout import use_fast_cpu_dropout
from ember_train.speedups.embedding_grad import EmbeddingGradBuffer

if TYPE_CHECKING:
    from ember_train.config.schema import TrainConfig


class Speedups:
    """The per-step part of the speedups a run switched on: :meth:`start_step` before each optimizer
    step's first backward (after the gradients were cleared), :meth:`release` after training."""

    def __init__(self, buffers: list[EmbeddingGradBuffer]) -> None:
        self.buffers = buffers

    def start_step(self) -> None:
        for buffer in self.buffers:
            buffer.attach()

    def release(self) -> None:
        for buffer in self.buffers:
            buffer.release()


def apply_speedups(model: nn.Module, cfg: TrainConfig, device: torch.device, deepspeed: bool) -> Speedups:
    """Switch on the speedups ``cfg`` asks for on ``model`` (the unwrapped one, after ``prepare``).

    Only on CPU; the embedding-gradient buffer not under DeepSpeed (its engine owns the gradients).
    """
    cpu = device.type == "cpu"
    if cfg.fast_cpu_dropout and cpu:
        use_fast_cpu_dropout(model)
    buffer = (
        EmbeddingGradBuffer.for_model(model)
        if cfg.fast_cpu_embedding_grad and cpu and not deepspeed
        else None
    )
    return Speedups([buffer] if buffer is not None else [])
