"""A few-parameter model run through the real ``train_loop``: fast checks of its guards and checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ember_train.config import TrainConfig
from ember_train.training.loop import build_accelerator, train_loop

Poison = Callable[[int, torch.Tensor], torch.Tensor]


class TinyModel(nn.Module):
    """Linear -> dropout -> linear: has RNG (dropout), an optimizer state and a scheduler."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.1)
        self.outer = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer(self.drop(torch.relu(self.inner(x))))


def make_loader(n: int = 24, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def make_loss_step(poison: Poison | None = None, calls: list[int] | None = None):
    """MSE; ``poison(call_index, loss)`` may replace the loss of a given call (1-based)."""
    calls = calls if calls is not None else [0]

    def loss_step(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        calls[0] += 1
        x, y = batch
        loss = nn.functional.mse_loss(model(x), y)
        if poison is not None:
            loss = poison(calls[0], loss)
        return loss, {}

    return loss_step


def run_tiny(
    output_dir: Path,
    *,
    poison: Poison | None = None,
    accelerator: Accelerator | None = None,
    seed: int = 0,
    **train: Any,
) -> dict[str, Any]:
    """Train ``TinyModel`` with ``train_loop``; ``train`` overrides TrainConfig fields."""
    cfg = TrainConfig(
        **{"batch_size": 4, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every": 1, **train}
    )
    accelerator = accelerator or build_accelerator(cfg, output_dir, seed)
    torch.manual_seed(seed)
    model = TinyModel()
    return train_loop(
        accelerator=accelerator,
        model=model,
        loss_step=make_loss_step(poison),
        dataloader=make_loader(batch_size=cfg.batch_size),
        cfg=cfg,
        output_dir=output_dir,
    )
