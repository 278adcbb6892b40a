"""Atomic checkpoints: interrupted or failed writes are never taken for a checkpoint, and the last
good one survives rotation, a full disk, and a crash while a checkpoint of the same step is replaced.
Loading never unpickles code, and a resume that could not restore the RNG is an error."""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from reliability.tiny_loop import TinyModel, run_tiny
from safetensors.torch import load_file

from ember_train.config import ConfigError
from ember_train.training import checkpoint as ckpt
from ember_train.training.checkpoint import (
    CheckpointError,
    TrainState,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)


@pytest.fixture
def setup(tmp_path, fresh_accelerate_state):
    """An accelerator with a prepared model and optimizer, and a helper that saves at a step.

    The state is reset first: on a GPU machine an earlier test in the same process may have
    fixed accelerate's device to CUDA, and ``cpu=True`` cannot change it afterwards.
    """
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = TinyModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)

    def save(step: int, keep: int = 5) -> Path:
        with torch.no_grad():
            model.outer.bias.fill_(float(step))  # each checkpoint's weights say which step it is
        return save_checkpoint(accelerator, tmp_path, TrainState(step=step, epoch=step), keep)

    return accelerator, model, save


def _names(tmp_path: Path) -> list[str]:
    return [p.name for p in list_checkpoints(tmp_path)]


def test_interrupted_writes_are_never_taken_for_a_checkpoint(tmp_path, setup):
    accelerator, model, save = setup
    save(1)
    good = save(2)
    root = tmp_path / "checkpoints"
    # A kill during save_state: the temporary directory, even with every file and a marker.
    shutil.copytree(good, root / ".tmp-step_0000003")
    # A copy that lost its marker, and one whose optimizer file was cut short after the marker.
    shutil.copytree(good, root / "step_0000004")
    (root / "step_0000004" / ckpt.COMPLETE_MARKER).unlink()
    shutil.copytree(good, root / "step_0000005")
    with open(root / "step_0000005" / "optimizer.bin", "r+b") as f:
        f.truncate(10)

    assert _names(tmp_path) == ["step_0000001", "step_0000002"]
    assert resolve_resume("auto", tmp_path) == good
    with pytest.raises(ConfigError, match="not a complete ember-train checkpoint"):
        resolve_resume(str(root / "step_0000005"), tmp_path)

    with torch.no_grad():
        model.outer.bias.fill_(-1.0)
    state = TrainState()
    load_checkpoint(accelerator, resolve_resume("auto", tmp_path), state)
    assert (state.step, state.epoch) == (2, 2)
    assert model.outer.bias.item() == 2.0
    # The next save cleans up what the kill left; the broken step_4/step_5 are left for a human.
    save(6)
    assert not (root / ".tmp-step_0000003").exists()
    assert _names(tmp_path) == ["step_0000001", "step_0000002", "step_0000006"]


def _partial_then(error: BaseException):
    """A save_state that writes part of a checkpoint and then fails, like a disk filling up."""

    def save_state(output_dir: str, **_: object) -> None:
        Path(output_dir, "model.safetensors").write_bytes(b"\0" * 1000)
        raise error

    return save_state


@pytest.mark.parametrize(
    "error,cause",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "the disk is full"),
        # What torch.save raises when the disk fills up under it.
        (
            RuntimeError(
                "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file"
            ),
            "RuntimeError: .*PytorchStreamWriter failed writing file",
        ),
    ],
)
def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous_checkpoint(
    tmp_path, setup, monkeypatch, error, cause
):
    accelerator, model, save = setup
    previous = save(1)
    monkeypatch.setattr(accelerator, "save_state", _partial_then(error))
    with pytest.raises(CheckpointError) as info:
        save(2)
    message = str(info.value)
    assert "could not write the checkpoint of step 2" in message
    assert re.search(cause, message), message
    assert "GiB free there" in message
    assert f"the previous checkpoint {previous} is kept" in message
    assert "train.resume=auto" in message
    assert _names(tmp_path) == ["step_0000001"]
    assert not (tmp_path / "checkpoints" / ".tmp-step_0000002").exists()  # the partial write is removed
    assert load_file(str(previous / "model.safetensors"))["outer.bias"].item() == 1.0


def test_failure_while_marking_complete_keeps_the_previous_checkpoint(tmp_path, setup, monkeypatch):
    _, _, save = setup
    save(1)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == ckpt.COMPLETE_MARKER:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(CheckpointError, match="the disk is full"):
        save(2)
    assert _names(tmp_path) == ["step_0000001"]


def test_rotation_keeps_the_newest_and_survives_a_failed_save(tmp_path, setup, monkeypatch):
    accelerator, _, save = setup
    for step in (1, 2, 3):
        save(step, keep=1)
    assert _names(tmp_path) == ["step_0000003"]
    monkeypatch.setattr(accelerator, "save_state", _partial_then(OSError(errno.ENOSPC, "full")))
    with pytest.raises(CheckpointError):
        save(4, keep=1)
    assert _names(tmp_path) == ["step_0000003"]


def test_crash_while_replacing_a_checkpoint_of_the_same_step_keeps_one(tmp_path, setup, monkeypatch):
    """The end of training saves again at a step that may already have a checkpoint (keep=1)."""
    _, _, save = setup
    save(3, keep=1)
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # the old step_3 is moved aside; the kill comes before the new one lands
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save(3, keep=1)
    monkeypatch.setattr(os, "replace", real_replace)
    assert calls[0] == ("step_0000003", ".old-step_0000003")
    found = resolve_resume("auto", tmp_path)
    assert found is not None and found.name == ".old-step_0000003"
    # The next save of that step cleans up and leaves exactly one step_3.
    save(3, keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003"]


class _Exploit:
    """Unpickling this writes a file: stands for arbitrary code in a planted checkpoint file."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


def test_resume_never_unpickles_code_from_a_checkpoint(tmp_path):
    """A tampered checkpoint (shared storage) must not run code on resume.

    accelerate reads registered custom state with ``weights_only=False``; the train state is
    therefore kept in the JSON marker and nothing else in the checkpoint is unpickled freely.
    """
    run_tiny(tmp_path / "run", max_steps=2, checkpoint_every=1)
    checkpoint = resolve_resume("auto", tmp_path / "run")
    assert sorted(p.name for p in checkpoint.glob("*.pkl")) == ["random_states_0.pkl"]
    target = tmp_path / "pwned.txt"
    planted = checkpoint / "custom_checkpoint_0.pkl"
    planted.write_bytes(pickle.dumps({"step": _Exploit(target)}))
    with pytest.raises(
        CheckpointError, match="custom_checkpoint_0.pkl, which accelerate can only load by unpickling"
    ):
        run_tiny(tmp_path / "run", max_steps=3, checkpoint_every=1)
    assert not target.exists()
    planted.unlink()  # what the message tells a user who trusts the checkpoint
    assert run_tiny(tmp_path / "run", max_steps=3, checkpoint_every=1)["step"] == 3

    # The optimizer state is read with weights_only=True: a planted pickle is refused, not run.
    checkpoint = resolve_resume("auto", tmp_path / "run")
    torch.save({"state": _Exploit(target)}, checkpoint / "optimizer.bin")
    marker = json.loads((checkpoint / ckpt.COMPLETE_MARKER).read_text())
    marker["files"]["optimizer.bin"] = (checkpoint / "optimizer.bin").stat().st_size
    (checkpoint / ckpt.COMPLETE_MARKER).write_text(json.dumps(marker))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_tiny(tmp_path / "run", max_steps=4, checkpoint_every=1)
    assert not target.exists()


def test_resume_that_cannot_restore_the_rng_is_an_error(tmp_path, setup, monkeypatch):
    """accelerate only logs "Could not load random states"; a silently different run is worse."""
    accelerator, _, save = setup
    path = save(1)
    np.random.rand(3)
    torch.rand(3)  # move the generators away from the saved states

    def broken_set_state(*_: object) -> None:
        raise ValueError("incompatible numpy")

    monkeypatch.setattr(np.random, "set_state", broken_set_state)
    with pytest.raises(CheckpointError, match="could not restore the RNG states"):
        load_checkpoint(accelerator, path, TrainState())


def test_resume_none_sets_the_previous_run_aside_so_auto_never_continues_it(tmp_path, tiny_bert_path):
    """A run with ``train.resume: none`` in a directory that holds a longer run: that run's
    checkpoints, best weights and metrics go to ``previous/``; a later ``resume: auto`` continues
    the new run (step 2), not the old one's newer step 4."""
    from conftest import run_tiny_contrastive

    run_tiny_contrastive(tmp_path, tiny_bert_path, "run", "train.max_steps=4", "train.checkpoint_every=2")
    run_dir = tmp_path / "run"
    (run_dir / "best").mkdir()
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_0000002", "step_0000004"]

    losses, _ = run_tiny_contrastive(
        tmp_path, tiny_bert_path, "run", "train.max_steps=2", "train.checkpoint_every=2", "train.resume=none"
    )
    assert len(losses) == 2  # the log holds this run's steps alone
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_0000002"]
    previous = run_dir / "previous"
    assert [p.name for p in ckpt.list_checkpoints(previous)] == ["step_0000002", "step_0000004"]
    assert (previous / "best").is_dir() and not (run_dir / "best").exists()
    assert len((previous / "metrics.jsonl").read_text().splitlines()) >= 4
    assert ckpt.resolve_resume("auto", run_dir) == run_dir / "checkpoints" / "step_0000002"

    # A second fresh start replaces the older set-aside run; nothing to set aside is a no-op.
    run_tiny_contrastive(tmp_path, tiny_bert_path, "run", "train.max_steps=1", "train.resume=none")
    assert [p.name for p in ckpt.list_checkpoints(previous)] == ["step_0000002"]
    assert ckpt.set_aside_previous_run(tmp_path / "empty") is None
