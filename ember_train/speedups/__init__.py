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
    step's first backward (after the gradients were cleared), :meth:`release` after training.

    The embedding-gradient buffer is made at the first :meth:`start_step`, after
    ``accelerator.prepare``: DDP decides at wrapping time whether a gradient is sparse.
    """

    def __init__(self, model: nn.Module, embedding_grad: bool) -> None:
        self.model = model
        self.embedding_grad = embedding_grad
        self.buffer: EmbeddingGradBuffer | None = None

    def start_step(self) -> None:
        if self.embedding_grad and self.buffer is None:
            self.buffer = EmbeddingGradBuffer.for_model(self.model)
            self.embedding_grad = self.buffer is not None
        if self.buffer is not None:
            self.buffer.attach()

    def release(self) -> None:
        if self.buffer is not None:
            self.buffer.release()


def apply_speedups(model: nn.Module, cfg: TrainConfig, device: torch.device, deepspeed: bool) -> Speedups:
    """Switch on the speedups ``cfg`` asks for on ``model`` (before ``accelerator.prepare``).

    Only on CPU; the embedding-gradient buffer not under DeepSpeed (its engine owns the gradients).
    """
    cpu = device.type == "cpu"
    if cfg.fast_cpu_dropout and cpu:
        use_fast_cpu_dropout(model)
    return Speedups(model, embedding_grad=cfg.fast_cpu_embedding_grad and cpu and not deepspeed)
