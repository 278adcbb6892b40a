"""Numerical guards: a NaN/Inf loss or gradient skips the update with a warning, the run stops
after ``max_nonfinite_steps`` in a row with the step number and a saved checkpoint, and an fp16
loss-scale overflow lowers the scale instead of breaking the run."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from accelerate import Accelerator
from reliability.tiny_loop import TinyModel, run_tiny
from safetensors.torch import load_file

from ember_train import cli
from ember_train.pipelines import contrastive
from ember_train.training.checkpoint import list_checkpoints
from ember_train.training.loop import NonFiniteLossError

NAN = float("nan")


def _nan_from(first_bad_call: int):
    return lambda call, loss: loss * NAN if call >= first_bad_call else loss


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * NAN


def _weights(path):
    return load_file(str(path / "model.safetensors"))


def _loss_steps(run_dir):
    return [
        r["step"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]


def test_nan_loss_is_skipped_with_a_warning_then_the_run_stops_with_a_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    run = tmp_path / "run"
    # Steps 1-2 are fine; from step 3 every loss is NaN; the run must stop at step 5 (3 in a row).
    with pytest.raises(NonFiniteLossError) as info:
        run_tiny(run, poison=_nan_from(3), max_steps=20, max_nonfinite_steps=3, checkpoint_every=2)
    message = str(info.value)
    assert "stopping at step 5: 3 consecutive non-finite" in message
    assert "max_nonfinite_steps=3" in message
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert warnings == [
        f"step {s}: non-finite loss; skipping the update ({n} in a row)" for s, n in ((3, 1), (4, 2), (5, 3))
    ]

    checkpoints = list_checkpoints(run)
    assert [p.name for p in checkpoints] == ["step_0000004", "step_0000005"]
    assert str(checkpoints[-1]) in message
    state = json.loads((checkpoints[-1] / "checkpoint.json").read_text())["state"]
    assert state["step"] == 5 and state["nonfinite_streak"] == 3
    # Skipped steps did not touch the weights, and nothing non-finite was saved.
    saved = _weights(checkpoints[-1])
    for key, value in _weights(checkpoints[0]).items():
        assert torch.equal(value, saved[key]), key
        assert torch.isfinite(value).all()
    assert _loss_steps(run) == [1, 2]  # NaN losses are not averaged into the logs


def test_a_finite_step_resets_the_streak(tmp_path):
    bad = {3, 4, 6, 7}  # never 3 in a row
    result = run_tiny(
        tmp_path / "run",
        poison=lambda call, loss: loss * NAN if call in bad else loss,
        max_steps=8,
        max_nonfinite_steps=3,
    )
    assert result["step"] == 8


def test_nan_in_one_micro_batch_spoils_the_whole_accumulated_step(tmp_path, caplog):
    """With accumulation, a NaN in an early micro-batch must not be dropped while the others update."""
    caplog.set_level(logging.WARNING)
    run = tmp_path / "run"
    # 2 micro-batches per step; every odd call (the first micro-batch of each step) from step 2 on is NaN.
    with pytest.raises(NonFiniteLossError, match="stopping at step 3: 2 consecutive"):
        run_tiny(
            run,
            poison=lambda call, loss: loss * NAN if call >= 3 and call % 2 == 1 else loss,
            max_steps=6,
            gradient_accumulation_steps=2,
            max_nonfinite_steps=2,
        )
    assert "step 2: non-finite loss; skipping the update (1 in a row)" in caplog.text
    assert _weights(list_checkpoints(run)[-1]).keys()


def test_nan_gradient_with_a_finite_loss_is_skipped_then_stops(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with pytest.raises(NonFiniteLossError, match="stopping at step 4: 2 consecutive"):
        run_tiny(
            tmp_path / "run",
            poison=lambda call, loss: _NanGrad.apply(loss) if call >= 3 else loss,
            max_steps=10,
            max_nonfinite_steps=2,
        )
    assert "step 3: non-finite gradient; skipping the update (1 in a row)" in caplog.text
    assert list_checkpoints(tmp_path / "run")[-1].name == "step_0000004"


@pytest.fixture
def fp16_accelerator_on_cpu(fresh_accelerate_state):
    """accelerate's fp16 path (GradScaler, unscale before clipping, skipped steps) on a CPU.

    accelerate enables the scaler on GPUs only; a CPU GradScaler with fp16 autocast exercises the
    same calls in the loop. accelerate's process-wide state is reset before and after.
    """
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    accelerator.native_amp = True
    return accelerator


def test_fp16_overflow_lowers_the_loss_scale_and_training_goes_on(tmp_path, caplog, fp16_accelerator_on_cpu):
    caplog.set_level(logging.WARNING)
    accelerator = fp16_accelerator_on_cpu
    run = tmp_path / "run"
    # Huge losses for the first 3 steps: their scaled gradients overflow fp16.
    result = run_tiny(
        run,
        poison=lambda call, loss: loss * 1e4 if call <= 3 else loss,
        accelerator=accelerator,
        max_steps=6,
        max_nonfinite_steps=2,  # overflows while the scale settles do not count
        checkpoint_every=1,
        keep_checkpoints=10,
    )
    assert result["step"] == 6
    overflows = [r.getMessage() for r in caplog.records if "fp16 gradient overflow" in r.getMessage()]
    assert [m.split(":")[0] for m in overflows] == ["step 1", "step 2", "step 3"], caplog.text
    assert (
        accelerator.scaler.get_scale() == 2.0**16 * 0.5**3
    )  # GradScaler's default backoff, once per overflow
    # Overflowed steps changed neither the weights nor the schedule; later steps trained.
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in TinyModel().state_dict().items()}
    checkpoints = list_checkpoints(run)
    after_overflows, final = _weights(checkpoints[2]), _weights(checkpoints[-1])
    assert all(torch.equal(after_overflows[k], initial[k]) for k in initial)
    assert not all(torch.equal(final[k], initial[k]) for k in initial)
    assert all(torch.isfinite(v).all() for v in final.values())
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    lrs = {step: r["lr"] for step, r in records.items()}
    assert lrs[1] == lrs[2] == lrs[3] == 1e-2 and lrs[4] < 1e-2
    # The logs show the scale falling with each overflow, then holding.
    assert [records[step]["loss_scale"] for step in range(1, 7)] == [2.0**15, 2.0**14] + [2.0**13] * 4


def test_fp16_nan_loss_in_one_micro_batch_skips_the_step_and_keeps_the_scale(
    tmp_path, caplog, fp16_accelerator_on_cpu
):
    """A NaN loss is not an overflow: the step is skipped, the scale stays, and training goes on.

    With accumulation the step's other micro-batch has gradients, so the GradScaler has unscaled
    them before the skip; it must be reset (before the fix the next step raised "unscale_() has
    already been called on this optimizer since the last update()").
    """
    caplog.set_level(logging.WARNING)
    result = run_tiny(
        tmp_path / "run",
        poison=lambda call, loss: loss * NAN if call == 3 else loss,  # step 2's first micro-batch
        accelerator=fp16_accelerator_on_cpu,
        max_steps=3,
        gradient_accumulation_steps=2,
    )
    assert result["step"] == 3
    assert "step 2: non-finite loss; skipping the update (1 in a row)" in caplog.text
    assert "step 2: fp16 gradient overflow" not in caplog.text
    records = {
        r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    }
    assert records[2]["loss_scale"] == records[1]["loss_scale"]  # a NaN loss does not lower the scale


def test_cli_reports_the_stop_in_one_line(tmp_path, tiny_bert_path, monkeypatch, capsys):
    """Through the contrastive pipeline and the CLI: exit code 1, the step, the checkpoint, no traceback."""
    real = contrastive.make_loss_step

    def poisoned(*args, **kwargs):
        step = real(*args, **kwargs)
        return lambda model, batch: (lambda out: (out[0] * NAN, out[1]))(step(model, batch))

    monkeypatch.setattr(contrastive, "make_loss_step", poisoned)
    cfg = tmp_path / "nan.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 16}}\n"
        f"data: {{train: {cli.__file__.rsplit('/ember_train/', 1)[0]}/data/quickstart/train.jsonl, max_examples: 16}}\n"
        "train: {batch_size: 4, max_steps: 4, max_nonfinite_steps: 2}\neval: {before_training: false}\n"
    )
    assert cli.main(["train", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ember-train:")]
    assert len(lines) == 1 and "stopping at step 2: 2 consecutive non-finite" in lines[0], err[-2000:]
    assert "checkpoint saved at" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()  # no export of a broken run
