"""DeepSpeed ZeRO-2 and ZeRO-3 on two real CPU processes (DeepSpeed's CPU accelerator, gloo).

Each run trains the same tiny contrastive job; in fp32 the trained weights must equal those of
plain DDP up to summation order. This is what catches an engine that steps the optimizer inside
every backward of the gradient cache, a schedule stepped once per process, a ZeRO-3 export of
empty shards, or a resume that loses the schedule.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, two_process_launch

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

# fp32, 10 steps: DDP and ZeRO reduce in different orders; measured differences are < 3e-8.
ATOL = 1e-6


def _config(tmp: Path, name: str, model: Path, **train: object) -> Path:
    train_cfg = {"batch_size": 4, "epochs": 2, "log_every": 1, "checkpoint_every": 5, "keep_checkpoints": 2}
    train_cfg.update(train)
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp / name}\n"
        f"model: {{name_or_path: {model}, max_seq_length: 24}}\n"
        f"data: {{train: {REPO}/data/quickstart/train.jsonl, max_examples: 40}}\n"
        "loss: {gather_across_devices: true, symmetric: true}\n"
        f"train: {json.dumps(train_cfg)}\n"
    )
    return path


def _launch(config: Path, zero_stage: int | None, *overrides: str) -> subprocess.CompletedProcess:
    cmd, env = two_process_launch(REPO / "train.py", "--config", config, *overrides)
    if zero_stage is not None:  # same launch, DeepSpeed instead of DDP
        at = cmd.index("--multi_gpu")
        cmd[at : at + 1] = [
            "--use_deepspeed",
            "--deepspeed_config_file",
            str(REPO / "configs" / "deepspeed" / f"zero{zero_stage}.json"),
        ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _train(config: Path, zero_stage: int | None, *overrides: str) -> None:
    done = _launch(config, zero_stage, *overrides)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _losses_and_lrs(run: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["lr"]) for r in _records(run)]


def _assert_same_weights(a: dict, b: dict, atol: float = ATOL) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_bert_path):
    """Train each (launcher, gradient cache) combination at most once per module."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    done: dict[tuple[int | None, int], Path] = {}

    def run(zero_stage: int | None, grad_cache_chunk: int = 0) -> Path:
        key = (zero_stage, grad_cache_chunk)
        if key not in done:
            name = f"zero{zero_stage}_gc{grad_cache_chunk}" if zero_stage else f"ddp_gc{grad_cache_chunk}"
            config = _config(tmp, name, tiny_bert_path, grad_cache_chunk_size=grad_cache_chunk)
            _train(config, zero_stage)
            done[key] = tmp / name
        return done[key]

    return run


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_trains_like_ddp(runs, zero_stage):
    ddp, zero = runs(None), runs(zero_stage)
    # DeepSpeed really ran (its checkpoint format), rather than accelerate quietly falling back to DDP.
    assert (zero / "checkpoints" / "step_0000010" / "latest").is_file()
    assert not (zero / "checkpoints" / "step_0000010" / "model.safetensors").exists()
    _assert_same_weights(_weights(ddp / "final"), _weights(zero / "final"))
    ddp_log, zero_log = _losses_and_lrs(ddp), _losses_and_lrs(zero)
    assert len(ddp_log) == len(zero_log) == 10
    for (loss_a, lr_a), (loss_b, lr_b) in zip(ddp_log, zero_log, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-5)
        assert lr_b == pytest.approx(lr_a, rel=1e-9)
    # The logged gradient norm is DeepSpeed's (its gradients are not in .grad).
    ddp_norms = [r["grad_norm"] for r in _records(ddp)]
    assert [r["grad_norm"] for r in _records(zero)] == pytest.approx(ddp_norms, rel=1e-4)
    # The exported body loads in sentence-transformers as usual (ZeRO-3 would export empty shards).
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    vectors = SentenceTransformer(str(zero / "final"), device="cpu").encode(["a Debian package"])
    assert vectors.shape == (1, 32)


def test_schedule_is_stepped_once_per_optimizer_step(runs):
    """accelerate steps a prepared scheduler once per process unless told not to."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    schedule = get_linear_schedule_with_warmup(optimizer, 1, 10)  # warm-up 0.1 x 10 steps
    expected = []
    for _ in range(10):
        optimizer.step()
        schedule.step()
        expected.append(schedule.get_last_lr()[0])
    for run in (runs(None), runs(3)):
        assert [lr for _, lr in _losses_and_lrs(run)] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_gradient_cache_equals_ddp_gradient_cache(runs, zero_stage):
    """Several backward passes make one optimizer step under DeepSpeed too."""
    _assert_same_weights(_weights(runs(None, 2) / "final"), _weights(runs(zero_stage, 2) / "final"))


def test_zero_gradient_cache_with_an_uneven_last_batch(tmp_path, tiny_bert_path):
    """43 pairs, global batch 8: the last batch gives the processes 1 and 2 pairs, so they embed
    different numbers of chunks; the one with fewer replays a zero-gradient chunk (DeepSpeed
    reduces at every backward, so a count mismatch hung), and the weights equal DDP's."""
    final = {}
    for name, stage in (("ddp", None), ("zero2", 2)):
        config = _config(tmp_path, name, tiny_bert_path, epochs=1, grad_cache_chunk_size=2)
        config.write_text(config.read_text().replace("max_examples: 40", "max_examples: 43"))
        _train(config, stage)
        final[name] = _weights(tmp_path / name / "final")
        assert len(_records(tmp_path / name)) == 6  # 5 full batches and the uneven last one
    _assert_same_weights(final["ddp"], final["zero2"])


def test_zero3_resume_is_exact_and_checkpoints_export(runs, tmp_path, tiny_bert_path):
    uninterrupted = runs(3)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(uninterrupted / "checkpoints" / "step_0000005", resumed / "checkpoints" / "step_0000005")
    config = _config(tmp_path, "resumed", tiny_bert_path)
    _train(config, 3, "train.resume=auto")
    _assert_same_weights(_weights(uninterrupted / "final"), _weights(resumed / "final"), atol=0.0)
    assert _losses_and_lrs(resumed) == _losses_and_lrs(uninterrupted)[5:]

    # `ember-train export` merges the ZeRO-3 shards of a checkpoint.
    out = tmp_path / "exported"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "ember_train.cli",
        "export",
        str(uninterrupted / "checkpoints" / "step_0000010"),
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_weights(_weights(uninterrupted / "final"), _weights(out), atol=0.0)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_bf16_exports_the_fp32_master_weights(runs, tmp_path, tiny_bert_path, zero_stage):
    """Under bf16 DeepSpeed holds the module in bf16; the export must be the optimizer's fp32 copy."""
    import torch

    config = _config(tmp_path, "bf16", tiny_bert_path, mixed_precision="bf16")
    _train(config, zero_stage)
    exported = _weights(tmp_path / "bf16" / "final")
    assert all(w.dtype == torch.float32 for w in exported.values())
    trained = [w for k, w in exported.items() if "encoder.layer" in k and w.ndim == 2]
    assert any((w.to(torch.bfloat16).float() != w).any() for w in trained), "bf16-rounded weights exported"
    # Same training up to bf16 rounding (measured max difference 2.4e-4 after 10 steps).
    _assert_same_weights(_weights(runs(None) / "final"), exported, atol=5e-3)
    for (loss_bf16, _), (loss_fp32, _) in zip(
        _losses_and_lrs(tmp_path / "bf16"), _losses_and_lrs(runs(None)), strict=True
    ):
        assert loss_bf16 == pytest.approx(loss_fp32, rel=2e-2)


def test_zero3_setfit_with_evaluation_during_training(tmp_path, tiny_bert_path):
    """Mid-training evaluation and the head fit run on one process: ZeRO-3 must not hang there."""
    config = tmp_path / "setfit.yaml"
    config.write_text(
        f"task: setfit\noutput_dir: {tmp_path / 'run'}\nseed: 1\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 24}}\n"
        f"data: {{train: {REPO}/tests/fixtures/setfit/train.jsonl, test: {REPO}/tests/fixtures/setfit/test.jsonl}}\n"
        "pairs: {num_iterations: 1}\n"
        "train: {batch_size: 8, epochs: 1, log_every: 1, eval_every: 3, checkpoint_every: 0}\n"
    )
    _train(config, 3)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(key.startswith("eval/") for r in records for key in r)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["eval_after_classification"]["metrics"]["accuracy"] <= 100.0
    assert (tmp_path / "run" / "final" / "head").is_dir()


def test_setfit_end_to_end_head_is_refused_under_deepspeed(tmp_path, tiny_bert_path):
    """A second training phase would step the first phase's engine: refused before any work."""
    config = tmp_path / "setfit_e2e.yaml"
    config.write_text(
        f"task: setfit\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 24}}\n"
        f"data: {{train: {REPO}/tests/fixtures/setfit/train.jsonl}}\n"
        "head: {type: linear, end_to_end: true}\ntrain: {batch_size: 8}\n"
    )
    done = _launch(config, 2)
    assert done.returncode != 0
    assert "head.end_to_end is not supported under DeepSpeed" in done.stdout + done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_zero_keeps_a_frozen_encoder_group_still(tmp_path, tiny_bert_path, zero_stage):
    """RetroMAE's ``freeze_encoder_steps``: DeepSpeed flattens each optimizer group, and the
    schedule's per-group learning rates must still reach the right parameters (the encoder
    unchanged, the new head moved), with the encoder's ``lr/encoder`` logged as 0."""
    import torch

    config = tmp_path / "retromae.yaml"
    config.write_text(
        f"task: retromae\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 24}}\n"
        f"data: {{train: {REPO}/data/quickstart/train.jsonl, text_field: pos, max_texts: 32, min_tokens: 2}}\n"
        "retromae: {freeze_encoder_steps: 3}\n"
        "train: {batch_size: 4, max_steps: 3, learning_rate: 1.0e-3, log_every: 1}\n"
    )
    _train(config, zero_stage)
    start = _weights(tiny_bert_path)
    final = _weights(tmp_path / "run" / "final")
    assert final and all(torch.equal(final[k], start[f"bert.{k}"]) for k in final if "pooler" not in k)
    head = _weights(tmp_path / "run" / "pretrained")
    key = "cls.predictions.transform.dense.weight"
    assert not torch.equal(head[key], start[key])
    assert [r["lr/encoder"] for r in _records(tmp_path / "run")] == [0.0, 0.0, 0.0]
