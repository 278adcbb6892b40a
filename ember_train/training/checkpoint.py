"""Resumable checkpoints: atomic to write, easy to find, rotated without losing the last good one.

A checkpoint is accelerate's ``save_state`` (model, optimizer, scheduler, RNG of every process,
plus registered objects such as the ``TrainState``), written into ``.tmp-step_N`` and renamed to
``step_N`` only when every process has finished writing. A directory without the final name is
never taken for a checkpoint. Checkpoints are for resuming; the release format is the export.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "checkpoint.json"


@dataclass
class TrainState:
    """Where training stands; saved inside every checkpoint so a resume continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    nonfinite_streak: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_RE.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto`` -> newest complete checkpoint (or None); ``none`` -> None; else the given path."""
    if resume == "none":
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(
            f"resume: {path} is not a complete ember-train checkpoint (no {COMPLETE_MARKER})"
        )
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: TrainState, keep: int) -> Path:
    """Write a checkpoint atomically, then delete the oldest beyond ``keep`` (never the new one)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{state.step:07d}"
    tmp = root / f".tmp-step_{state.step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except OSError as e:
        raise OSError(
            f"could not write checkpoint at step {state.step} to {tmp} ({e}); the previous checkpoint is kept"
        ) from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"state": state.state_dict()}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[: -max(keep, 1)]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_model_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load the model weights of a checkpoint (accelerate's ``model.safetensors``) into ``model``."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no model.safetensors (is it an ember-train checkpoint?)")
    model.load_state_dict(load_file(str(path)), strict=True)
