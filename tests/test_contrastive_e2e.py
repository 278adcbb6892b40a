"""A tiny contrastive run end to end: train, checkpoint, interrupt, resume, export, evaluate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import crash_contrastive_run_at_call
from safetensors.torch import load_file

from ember_train.pipelines import contrastive, load_config

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path, model, name, *overrides):
    path = tmp_path / "exp.yaml"
    path.write_text(
        f"""
task: contrastive
output_dir: {tmp_path / name}
seed: 7
model: {{name_or_path: {model}, max_seq_length: 32, normalize: true}}
data: {{train: {REPO / "data/quickstart/train.jsonl"}, max_examples: 96}}
loss: {{temperature: 0.05}}
train: {{batch_size: 8, max_steps: 6, learning_rate: 1.0e-3, checkpoint_every: 3, keep_checkpoints: 5, log_every: 2}}
eval: {{data: {REPO / "data/quickstart/dev.jsonl"}, max_queries: 24, tasks: [{REPO / "configs/eval/STSBenchmark.yaml"}], data_root: {REPO / "tests/fixtures/eval"}}}
"""
    )
    return load_config(str(path), list(overrides))


def _weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_train_checkpoint_resume_export_evaluate(tmp_path, tiny_bert_path, monkeypatch):
    # 1. Uninterrupted run.
    results = contrastive.run(_config(tmp_path, tiny_bert_path, "full"))
    full = tmp_path / "full"
    assert results["steps"] == 6
    assert {"eval_before", "eval_after"} <= set(results)
    saved = json.loads((full / "results.json").read_text())
    assert saved["eval_after"][0]["metrics"]["ndcg@10"] == pytest.approx(
        results["eval_after"][0]["metrics"]["ndcg@10"]
    )
    assert [r["dataset"] for r in saved["eval_after"]] == ["dev", "STSBenchmark"]
    card = (full / "final" / "README.md").read_text()
    assert f"{saved['eval_after'][1]['main_score']:.2f}" in card
    metrics = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4, 6]
    assert all(m["samples_per_s"] > 0 and 0 <= m["padding_fraction"] < 1 for m in metrics if "loss" in m)
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_0000003", "step_0000006"]
    assert (full / "config.yaml").is_file() and (full / "final" / "README.md").is_file()

    # 2. The same run, killed after step 4's forward pass, then resumed from the step-3 checkpoint.
    real = contrastive.make_loss_step
    crash_contrastive_run_at_call(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        contrastive.run(_config(tmp_path, tiny_bert_path, "crashed"))
    monkeypatch.setattr(contrastive, "make_loss_step", real)
    assert [p.name for p in (tmp_path / "crashed" / "checkpoints").iterdir()] == ["step_0000003"]
    resumed = contrastive.run(_config(tmp_path, tiny_bert_path, "crashed", "train.resume=auto"))
    assert resumed["steps"] == 6

    a, b = _weights(full), _weights(tmp_path / "crashed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")
    # Training changed the model.
    assert not torch.equal(
        a["embeddings.word_embeddings.weight"],
        load_file(str(tiny_bert_path / "model.safetensors"))["bert.embeddings.word_embeddings.weight"],
    )


def test_cli_train_and_export_checkpoint(tmp_path, tiny_bert_path):
    cfg_path = tmp_path / "cli.yaml"
    cfg_path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {tiny_bert_path}, max_seq_length: 16}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 32}}\n"
        "train: {batch_size: 8, max_steps: 2, report_to: [jsonl]}\n"
    )
    env_run = [sys.executable, str(REPO / "train.py"), "--config", str(cfg_path)]
    done = subprocess.run(env_run + ["train.max_steps=3"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "modules.json").is_file()
    # One log line per checkpoint: accelerate's own INFO lines about each saved file are silenced.
    assert "saved checkpoint" in done.stderr
    assert "Saving current state" not in done.stderr

    out = tmp_path / "exported"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ember_train.cli",
            "export",
            str(tmp_path / "run/checkpoints/step_0000003"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # DeepSpeed's accelerator warning, which a CPU export used to print
    assert "unable to detect" not in done.stdout + done.stderr
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "run/final/model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key])

    bad = subprocess.run(env_run + ["train.batchsize=3"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "unknown key 'train.batchsize'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_data_loader_workers_change_nothing_but_where_batches_are_made(tmp_path, tiny_bert_path):
    """``train.num_workers > 0`` tokenizes in worker processes (on GPUs, alongside the step): the
    same batches in the same order, so the same losses and weights as tokenizing in the main process."""
    runs = {}
    for workers in (0, 2):
        path = tmp_path / f"workers{workers}.yaml"
        path.write_text(
            f"task: contrastive\noutput_dir: {tmp_path / f'w{workers}'}\nseed: 7\n"
            f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 32}}\n"
            f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 64, group_by_length: true}}\n"
            "train: {batch_size: 8, epochs: 2, learning_rate: 1.0e-3, log_every: 1, resume: none,"
            f" num_workers: {workers}}}\n"
        )
        contrastive.run(load_config(str(path)))
        records = [
            json.loads(line) for line in (tmp_path / f"w{workers}" / "metrics.jsonl").read_text().splitlines()
        ]
        runs[workers] = (
            [(r["step"], r["loss"], r["padding_fraction"]) for r in records if "loss" in r],
            _weights(tmp_path / f"w{workers}"),
        )
    (losses0, weights0), (losses2, weights2) = runs[0], runs[2]
    assert len(losses0) == 16 and losses2 == losses0
    assert all(torch.equal(weights0[k], weights2[k]) for k in weights0)
