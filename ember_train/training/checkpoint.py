"""Resumable checkpoints: atomic to write, easy to find, rotated without losing the last good one.

A checkpoint is accelerate's ``save_state`` (model, optimizer, scheduler, RNG of every process),
written into ``.tmp-step_N``, flushed to disk, marked complete with ``checkpoint.json`` (the
``TrainState`` and the size of every file) and renamed to ``step_N`` only when every process has
finished writing. A directory without the final name or the marker, or whose files do not match
the marker, is never taken for a checkpoint. Loading uses safetensors and
``torch.load(weights_only=True)`` only: a checkpoint cannot run code. Checkpoints are for
resuming; the release format is the export.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# ``.old-step_N`` is a complete checkpoint moved aside while a new ``step_N`` replaces it.
_STEP_RE = re.compile(r"^(\.old-)?step_(\d+)$")
COMPLETE_MARKER = "checkpoint.json"
REFRESH_STATE = "refresh_state.json"  # the training loop's data hook (e.g. re-mined negatives), as JSON


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message says which and what was kept."""


@dataclass
class TrainState:
    """Where training stands; saved inside every checkpoint so a resume continues exactly."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of ``epoch`` already consumed
    nonfinite_streak: int = 0
    last_eval_step: int = 0  # the step of the latest evaluation during training (0: none yet)
    # eval.select: the best evaluation so far; its weights are in <output_dir>/best/step_N
    best_step: int = 0  # 0 = none yet
    best_score: float | None = None
    best_select: str | None = None  # the eval.select that chose it (another one starts afresh)

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def _read_marker(path: Path) -> dict | None:
    """The marker of a complete checkpoint whose files all have their recorded sizes, else None."""
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    for name, size in marker.get("files", {}).items():
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            logger.warning("ignoring checkpoint %s: %s is missing or truncated", path, name)
            return None
    return marker


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for path in sorted(root.iterdir(), key=lambda p: p.name.startswith(".old-")):  # step_N first
        match = _STEP_RE.match(path.name)
        if match and int(match.group(2)) not in found and _read_marker(path) is not None:
            found[int(match.group(2))] = path
    return [found[step] for step in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto`` -> newest complete checkpoint (or None); ``none`` -> None; else the given path."""
    if resume == "none":
        return None
    if resume == "auto":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if _read_marker(path) is None:
        from ember_train.config.parse import ConfigError

        raise ConfigError(
            f"train.resume: {path} is not a complete ember-train checkpoint "
            f"(no valid {COMPLETE_MARKER}, or its files are missing or truncated)"
        )
    return path


# What a run leaves in its output_dir that a new run there must not mistake for its own: checkpoints
# (train.resume: auto would continue the old run), kept best weights, and the metrics log.
PREVIOUS_RUN_DIR = "previous"
RUN_STATE = ("checkpoints", "best", "metrics.jsonl")


def set_aside_previous_run(output_dir: str | Path) -> Path | None:
    """``train.resume: none`` in a directory that holds a run: move that run's state to
    ``<output_dir>/previous`` (replacing an older one), so this run starts clean and a later
    ``resume: auto`` continues this run, not that one. Returns the folder, or None if nothing moved.

    Moved, not deleted: one generation is kept for a user who did not mean to start over. Exports,
    ``results.json`` and ``config.yaml`` are rewritten by the new run.
    """
    root = Path(output_dir)
    found = [name for name in RUN_STATE if (root / name).exists()]
    if not found:
        return None
    previous = root / PREVIOUS_RUN_DIR
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir(parents=True)
    for name in found:
        os.replace(root / name, previous / name)
    logger.warning(
        "train.resume: none: %s held a previous run; its %s moved to %s (delete it if not needed)",
        root, ", ".join(found), previous,
    )  # fmt: skip
    return previous


# Settings that may change between a run and its resume, and take effect: how long to train, how
# often to log, evaluate and checkpoint, evaluation and export, and speed switches that compute the
# same sums. Any other change would be ignored by the restored optimizer, schedule or data order, or
# would mix two experiments in one run, so it stops the resume.
RESUMABLE_CHANGES = (
    "output_dir",
    "train.resume",
    "train.max_steps",
    "train.epochs",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.max_nonfinite_steps",
    "train.num_workers",
    "train.cpu_threads",
    "train.fast_cpu_embedding_grad",
    "train.report_to",
    "train.wandb_project",
    "train.wandb_run_name",
    "eval.",
    "merge.",  # applied after training
    "export.",
)


def check_resume_config(run_config: Any, output_dir: str | Path, checkpoint: Path | None) -> None:
    """Stop a resume whose config changed a setting that cannot take effect mid-run, naming it.

    The reference is the ``config.yaml`` of the run that wrote ``checkpoint``. A restored optimizer
    keeps its learning rate, a restored sampler its batch size and order: continuing with such a
    change listed but ignored is what this prevents. ``run_config`` is the recipe's config (its
    dataclass), and the saved file is read through that same class
    (:func:`~ember_train.config.parse.changes_since_saved`), so an upgrade of ember-train between
    the run and its resume changes nothing by itself: keys added since are not changes, renamed
    ones are compared under their new names, removed ones are left out with a warning. A saved
    config this version cannot read at all (a value it now refuses) cannot be compared: the resume
    goes on with a warning that says why, since the user could not restore that value anyway.
    """
    if checkpoint is None:
        return
    from ember_train.config.parse import ConfigError, changes_since_saved, read_yaml

    saved = checkpoint.parent.parent / "config.yaml"
    if not saved.is_file():
        return  # a checkpoint from elsewhere: nothing to compare against
    saved_config = read_yaml(saved)  # not YAML, or not a mapping: stops the resume, naming the file
    try:
        changes = changes_since_saved(saved_config, run_config, source=str(saved))
    except ConfigError as e:
        logger.warning(
            "resuming %s without comparing its config: this version cannot read %s (%s)", checkpoint, saved, e
        )
        return
    fixed = [c for c in changes if not c.split(":")[0].startswith(RESUMABLE_CHANGES)]
    if fixed:
        shown = "; ".join(fixed[:8]) + (f"; and {len(fixed) - 8} more" if len(fixed) > 8 else "")
        raise ConfigError(
            f"train.resume: {checkpoint} was written by a run with another config, and these settings "
            f"cannot change when resuming: {shown}. Restore them to continue that run, or start afresh "
            f"with train.resume=none or another output_dir ({output_dir} is kept as it is)."
        )
    if changes:
        logger.info(
            "resuming %s with changed settings (they take effect): %s", checkpoint, "; ".join(changes)
        )


def _fsync(path: Path) -> None:
    """Flush a file or directory to disk, so a checkpoint survives a node crash, not only a kill."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot fsync directories
        if path.is_file() or e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_marker(tmp: Path, state: TrainState) -> None:
    files = {}
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(file)
        files[str(file.relative_to(tmp))] = file.stat().st_size
    marker = tmp / COMPLETE_MARKER
    marker.write_text(json.dumps({"state": state.state_dict(), "files": files}))
    _fsync(marker)
    _fsync(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, never deleted first."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)  # also one left by a crash between the two renames
    _fsync(final.parent)


def _describe_failure(error: BaseException, step: int, tmp: Path, previous: Path | None) -> str:
    try:
        free = f"{shutil.disk_usage(tmp.parent).free / 2**30:.2f} GiB free there"
    except OSError:
        free = "free space unknown"
    full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    cause = "the disk is full" if full else f"{type(error).__name__}: {error}"
    kept = f"the previous checkpoint {previous} is kept" if previous else "there is no earlier checkpoint"
    return (
        f"could not write the checkpoint of step {step} to {tmp} ({cause}; {free}); {kept}. "
        "Free space (or fix the error) and rerun with train.resume=auto."
    )


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    state: TrainState,
    keep: int,
    refresh_state: dict | None = None,
) -> Path:
    """Write a checkpoint atomically, then delete the oldest beyond ``keep`` (never the new one).

    ``refresh_state`` (the same on every process) is written as JSON beside the weights, inside
    the marker's file list, so a truncated copy is never resumed from.

    Any failure while writing (a full disk, a quota, a broken file system) removes the partial
    directory and raises a :class:`CheckpointError`; the previous checkpoint is untouched.
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{state.step:07d}"
    tmp = root / f".tmp-step_{state.step:07d}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if refresh_state is not None:
                (tmp / REFRESH_STATE).write_text(json.dumps(refresh_state), encoding="utf-8")
            _write_marker(tmp, state)
            _publish(tmp, final)
    except Exception as e:  # torch.save reports a full disk as RuntimeError, safetensors as its own type
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = [p for p in list_checkpoints(output_dir) if p != final]
        raise CheckpointError(
            _describe_failure(e, state.step, tmp, previous[-1] if previous else None)
        ) from e
    if accelerator.is_main_process:
        for old in list_checkpoints(output_dir)[: -max(keep, 1)]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-step_*"):  # left by a kill; never a checkpoint, only disk space
            if int(stale.name.rsplit("_", 1)[1]) < state.step:
                shutil.rmtree(stale, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: str | Path, state: TrainState) -> None:
    """Restore model, optimizer, scheduler and RNG from ``checkpoint`` and ``state`` from its marker.

    Everything is read with safetensors or ``torch.load(weights_only=True)`` (numpy RNG arrays
    are allow-listed by accelerate). The ``TrainState`` comes from the JSON marker rather than
    accelerate's pickled custom state, which accelerate always reads with ``weights_only=False``.
    accelerate only logs a failure to restore RNG states; here it is an error, since the resumed
    run would silently differ from the uninterrupted one.
    """
    path = Path(checkpoint)
    marker = _read_marker(path)
    if marker is None:
        raise CheckpointError(f"{path} is not a complete ember-train checkpoint")
    pickled = sorted(path.glob("custom_checkpoint_*.pkl"))
    if pickled:  # accelerate would unpickle these with weights_only=False, i.e. run any code in them
        raise CheckpointError(
            f"{path} holds {pickled[0].name}, which accelerate can only load by unpickling it freely "
            f"(it may run code). ember-train keeps its train state in {COMPLETE_MARKER}; if you trust this "
            f"checkpoint (earlier ember-train versions pickled their train state), delete {pickled[0]} and resume again."
        )
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    _check_rng_restored(path, accelerator.process_index)
    state.load_state_dict(marker["state"])


def read_refresh_state(checkpoint: str | Path) -> dict | None:
    """The data hook's state saved with ``checkpoint``, or None when it was saved without one."""
    path = Path(checkpoint) / REFRESH_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _check_rng_restored(path: Path, process_index: int) -> None:
    from accelerate.utils import load  # torch.load(weights_only=True) with numpy's RNG types allowed

    file = path / f"random_states_{process_index}.pkl"
    if not file.is_file():
        logger.warning(
            "%s has no RNG state for process %d (saved with fewer processes?); the resumed run will "
            "not repeat the uninterrupted one exactly",
            path,
            process_index,
        )
        return
    saved = load(file, weights_only=True)
    restored = (
        torch.equal(saved["torch_manual_seed"], torch.get_rng_state())
        and saved["random_state"] == random.getstate()
        and all(
            np.array_equal(a, b)
            for a, b in zip(saved["numpy_random_seed"], np.random.get_state(), strict=True)
        )
    )
    if not restored:
        raise CheckpointError(
            f"could not restore the RNG states saved in {file}; the resume would not be exact"
        )


def load_model_weights(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load the model weights of a checkpoint into ``model``.

    accelerate writes ``model.safetensors``, without the second copy of tied weights (RetroMAE's
    MLM head); under DeepSpeed the checkpoint holds DeepSpeed's (ZeRO-partitioned, pickled) files
    instead, which DeepSpeed's own converter merges: only load those from a run you trust.
    """
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    path = checkpoint / "model.safetensors"
    if path.is_file():
        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        own = model.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
        untied = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
        if untied or unexpected:
            raise ValueError(
                f"{path}: does not match the model (missing {untied[:5]}, unexpected {unexpected[:5]})"
            )
        return
    if (checkpoint / "latest").is_file():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        missing, unexpected = model.load_state_dict(state, strict=False)
        buffers = {name for name, _ in model.named_buffers()}
        if unexpected or set(missing) - buffers:  # DeepSpeed saves parameters, not buffers
            raise ValueError(
                f"{checkpoint}: DeepSpeed checkpoint does not match the model "
                f"(missing {sorted(set(missing) - buffers)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
        return
    raise FileNotFoundError(
        f"{checkpoint} has neither model.safetensors nor a DeepSpeed checkpoint (is it an ember-train checkpoint?)"
    )


BEST_DIR = "best"
BEST_MARKER = "best.json"


def best_weights_dir(output_dir: str | Path, step: int) -> Path:
    """Where ``eval.select`` keeps the weights of the best evaluation (step ``step``)."""
    return Path(output_dir) / BEST_DIR / f"step_{step:07d}"


def save_best_weights(
    accelerator: Accelerator, model: torch.nn.Module, output_dir: str | Path, step: int, record: dict
) -> Path:
    """Write the model's weights (every process calls: ZeRO-3 gathers them) and ``record`` (step,
    score, metrics) atomically to :func:`best_weights_dir`.

    On disk rather than in memory: a copy of BERT-large's weights is 1.3 GB of host memory for the
    whole run, and the best-so-far must survive a resume anyway.
    """
    final = best_weights_dir(output_dir, step)
    tmp = final.with_name(f".tmp-{final.name}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_model(model, tmp, max_shard_size="1000GB", safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / BEST_MARKER).write_text(json.dumps(record, indent=2))
        for file in tmp.iterdir():
            _fsync(file)
        shutil.rmtree(final, ignore_errors=True)  # a replayed step after a resume: same weights
        os.replace(tmp, final)
        _fsync(final.parent)
    accelerator.wait_for_everyone()
    return final


def read_best_record(output_dir: str | Path, step: int) -> dict:
    """The record :func:`save_best_weights` wrote for ``step``; a clear error when it is gone."""
    path = best_weights_dir(output_dir, step) / BEST_MARKER
    if not path.is_file():
        raise CheckpointError(
            f"eval.select: the best weights of step {step} ({path.parent}) are missing; they were deleted, "
            "or the run was resumed from a checkpoint older than the ones kept"
        )
    return json.loads(path.read_text())


def prune_best_weights(output_dir: str | Path, current: int) -> None:
    """Main process: delete best-weights folders that neither ``current`` nor a kept checkpoint names
    (a resume from that checkpoint needs the best weights it knew)."""
    root = Path(output_dir) / BEST_DIR
    if not root.is_dir():
        return
    keep = {current}
    for checkpoint in list_checkpoints(output_dir):
        marker = _read_marker(checkpoint)
        if marker is not None:
            keep.add(int(marker["state"].get("best_step", 0)))
    for path in root.iterdir():
        match = re.match(r"^(?:\.tmp-)?step_(\d+)$", path.name)
        if match and (path.name.startswith(".tmp-") or int(match.group(1)) not in keep):
            shutil.rmtree(path, ignore_errors=True)
