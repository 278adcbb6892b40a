"""Weight-space interpolation of a tuned model with its base (LM-Cocktail-style linear merge).

``merged = alpha * tuned + (1 - alpha) * base``, parameter by parameter: alpha = 1 is the tuned
model, 0 the base. Models tuned from the same base stay in one basin, so points between them are
models too; in practice they trade the tuned domain's gain against the base's general ability.
"""

from __future__ import annotations

import torch


def interpolate_state_dicts(
    tuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``alpha * tuned + (1 - alpha) * base`` for every floating-point tensor; others (integer
    buffers such as position ids) are the tuned model's. Both must have the same keys and shapes."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"merge alpha must be in [0, 1], got {alpha}")
    missing, extra = sorted(set(tuned) - set(base)), sorted(set(base) - set(tuned))
    if missing or extra:
        raise ValueError(
            f"cannot merge: the base model has different weights (missing {missing[:5]}, extra {extra[:5]}); "
            "merge.base must have the tuned model's architecture"
        )
    merged = {}
    for name, weight in tuned.items():
        other = base[name]
        if other.shape != weight.shape:
            raise ValueError(
                f"cannot merge {name}: shape {tuple(weight.shape)} vs the base's {tuple(other.shape)}"
            )
        if weight.is_floating_point():
            # This form (not base + alpha * (tuned - base)) gives each end exactly at alpha 0 and 1.
            mixed = alpha * weight.to(torch.float32) + (1.0 - alpha) * other.to(torch.float32)
            merged[name] = mixed.to(weight.dtype)
        else:
            merged[name] = weight.clone()
    return merged


def cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s weights (the model may go on changing)."""
    return {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
