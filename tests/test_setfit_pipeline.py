"""The setfit pipeline end to end: tune -> head -> predict above chance -> save/load -> sentence-transformers."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest
from conftest import FIXTURES, REPO

from ember_train.cli import predict_command
from ember_train.config import ConfigError, from_dict
from ember_train.models.setfit import SetFitStyleModel
from ember_train.pipelines import load_config
from ember_train.pipelines.setfit import SetFitConfig, export_checkpoint, run
from ember_train.training.checkpoint import list_checkpoints

# Three topics with disjoint vocabularies plus shared filler words: separable from token identity
# alone, so even a tiny random BERT classifies held-out texts above chance.
TOPICS = {
    "sports": ["football", "tennis", "goal", "match", "team", "player", "coach", "stadium"],
    "food": ["pizza", "bread", "cheese", "soup", "salad", "kitchen", "recipe", "butter"],
    "music": ["guitar", "piano", "song", "concert", "band", "melody", "drum", "singer"],
}
FILLER = ["the", "a", "great", "new", "my", "about", "with", "today"]


def topic_texts(per_label: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        for _ in range(per_label):
            tokens = rng.sample(words, 3) + rng.sample(FILLER, 2)
            rng.shuffle(tokens)
            rows.append({"text": " ".join(tokens), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def make_cfg(model_path, tmp_path, **sections) -> SetFitConfig:
    data = {
        "task": "setfit",
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {"name_or_path": str(model_path), "max_seq_length": 32},
        "data": {
            "train": write_jsonl(tmp_path / "train.jsonl", topic_texts(8, seed=0)),
            "test": write_jsonl(tmp_path / "test.jsonl", topic_texts(10, seed=1)),
        },
        "pairs": {"num_iterations": 4},
        "train": {
            "batch_size": 16,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.0,
            "log_every": 1,
            "keep_checkpoints": 1,
            "resume": "none",
        },
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value) if isinstance(value, dict) else data.__setitem__(key, value)
    return from_dict(SetFitConfig, data)


def test_tiny_run_predicts_above_chance_and_roundtrips(tiny_bert_path, tmp_path):
    cfg = make_cfg(tiny_bert_path, tmp_path)
    results = run(cfg)
    run_dir = tmp_path / "run"

    # 24 texts, 4 positive + 4 negative pairs each = 192 pairs, 12 steps of 16.
    assert results["pairs"]["pairs_per_epoch"] == 192 and results["steps"] == 12
    before = results["eval_before_classification"]["metrics"]
    after = results["eval_after_classification"]["metrics"]
    assert after["accuracy"] > 60.0  # chance is 33.3
    assert set(after) == {"accuracy", "f1"} and set(before) == {"accuracy", "f1"}
    losses = [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])  # the pair loss goes down

    # The exported model predicts exactly what the run evaluated.
    export = run_dir / "final"
    model = SetFitStyleModel.from_pretrained(export)
    test = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    texts, gold = [r["text"] for r in test], [r["label"] for r in test]
    predicted = model.predict(texts)
    assert 100.0 * np.mean(np.array(predicted) == np.array(gold)) == pytest.approx(after["accuracy"])
    proba = model.predict_proba(texts)
    assert proba.shape == (30, 3) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert [model.labels[i] for i in proba.argmax(axis=1)] == predicted

    # save -> load -> same predictions.
    model.save_pretrained(tmp_path / "again")
    reloaded = SetFitStyleModel.from_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(reloaded.predict_proba(texts), proba)
    assert reloaded.predict(texts) == predicted

    # The final checkpoint holds the refitted head: exporting it gives the same classifier.
    checkpoint = list_checkpoints(run_dir)[-1]
    export_checkpoint(cfg, checkpoint, tmp_path / "from_checkpoint")
    from_checkpoint = SetFitStyleModel.from_pretrained(tmp_path / "from_checkpoint")
    np.testing.assert_allclose(from_checkpoint.predict_proba(texts), proba, atol=1e-6)

    # The body still loads in sentence-transformers, with the same vectors.
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(export), device="cpu")
    np.testing.assert_allclose(st.encode(texts[:5]), model.encode(texts[:5]).numpy(), atol=1e-5)

    card = (export / "README.md").read_text(encoding="utf-8")
    assert "before tuning (frozen body + head)" in card and f"{after['accuracy']:.2f}" in card
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["eval_after_classification"]["metrics"] == after


def test_linear_head_end_to_end_with_scored_pairs(tiny_bert_path, tmp_path):
    sts = str(FIXTURES / "setfit" / "sts_pairs.jsonl")
    cfg = make_cfg(
        tiny_bert_path,
        tmp_path,
        data={"pairs": sts, "test_pairs": sts, "score_range": [0, 5]},
        pairs={"num_iterations": 1, "loss": "cosent"},
        head={"type": "linear", "epochs": 30, "learning_rate": 0.05, "end_to_end": True, "batch_size": 8},
    )
    results = run(cfg)
    # 24 texts x 1 x 2 generated pairs + 48 scored pairs.
    assert results["pairs"]["pairs_per_epoch"] == 48 + 48
    assert results["end_to_end"]["steps"] == 3  # 24 texts in batches of 8, one epoch
    assert "cosine_spearman" in results["eval_after_sts"]["metrics"]
    assert results["eval_after_classification"]["metrics"]["accuracy"] > 40.0
    model = SetFitStyleModel.from_pretrained(tmp_path / "run" / "final")
    assert model.head.kind == "linear" and model.labels == ["food", "music", "sports"]


def test_scored_pairs_only_tunes_the_body_without_a_head(tiny_bert_path, tmp_path):
    sts = str(FIXTURES / "setfit" / "sts_pairs.jsonl")
    cfg = make_cfg(
        tiny_bert_path, tmp_path, data={"train": None, "test": None, "pairs": sts, "test_pairs": sts}
    )
    results = run(cfg)
    assert results["pairs"] == {"scored_pairs": 48, "pairs_per_epoch": 48}
    assert "eval_before_sts" in results and "eval_after_sts" in results
    model = SetFitStyleModel.from_pretrained(tmp_path / "run" / "final")
    assert model.head is None
    with pytest.raises(RuntimeError, match="no classification head"):
        model.predict(["a text"])


def test_multi_label_run(tiny_bert_path, tmp_path):
    rows = topic_texts(8, seed=0)
    # Texts mentioning "the" also carry the label "definite": two overlapping label sets.
    multi = [
        {"text": r["text"], "label": [r["label"]] + (["definite"] if "the" in r["text"].split() else [])}
        for r in rows
    ]
    test = [{"text": r["text"], "label": [r["label"]]} for r in topic_texts(5, seed=3)]
    cfg = make_cfg(
        tiny_bert_path,
        tmp_path,
        data={
            "train": write_jsonl(tmp_path / "ml.jsonl", multi),
            "test": write_jsonl(tmp_path / "mlt.jsonl", test),
        },
        pairs={"num_iterations": 1},
    )
    results = run(cfg)
    assert results["eval_after_classification"]["extra"]["multi_label"] is True
    model = SetFitStyleModel.from_pretrained(tmp_path / "run" / "final")
    assert model.head.multi_label and "definite" in model.labels
    assert all(isinstance(p, list) for p in model.predict([t["text"] for t in test]))


def test_predict_command_prints_json_lines(tiny_bert_path, tmp_path, capsys):
    run(make_cfg(tiny_bert_path, tmp_path, pairs={"num_iterations": 1}))
    texts = tmp_path / "texts.txt"
    texts.write_text("football match today\npizza with cheese\n", encoding="utf-8")
    args = argparse.Namespace(
        model=str(tmp_path / "run" / "final"), text=["guitar concert"], input=str(texts),
        proba=True, threshold=0.5, batch_size=8,
    )  # fmt: skip
    assert predict_command(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in lines] == ["guitar concert", "football match today", "pizza with cheese"]
    assert all(r["label"] in TOPICS and set(r["proba"]) == set(TOPICS) for r in lines)


def test_data_loader_workers_change_nothing(tiny_bert_path, tmp_path):
    """Pairs are drawn and batched in the main process; workers only tokenize: the same run."""
    losses = {}
    for workers in (0, 2):
        (tmp_path / f"w{workers}").mkdir()
        cfg = make_cfg(tiny_bert_path, tmp_path / f"w{workers}", train={"num_workers": workers})
        run(cfg)
        metrics = (tmp_path / f"w{workers}" / "run" / "metrics.jsonl").read_text().splitlines()
        losses[workers] = [(r["step"], r["loss"]) for r in map(json.loads, metrics) if "loss" in r]
    assert len(losses[0]) == 12 and losses[2] == losses[0]


def test_config_file_and_validation(tmp_path):
    cfg = load_config(str(REPO / "configs" / "setfit_quick.yaml"))
    assert isinstance(cfg, SetFitConfig) and cfg.pairs.num_iterations == 5
    with pytest.raises(ConfigError, match="end_to_end needs head.type: linear"):
        make_cfg("m", tmp_path, head={"end_to_end": True})
    with pytest.raises(ConfigError, match="data.train"):
        make_cfg("m", tmp_path, data={"train": None, "test": None})
    with pytest.raises(ConfigError, match="data.test needs data.train"):
        make_cfg("m", tmp_path, data={"train": None, "pairs": "p.jsonl"})
    with pytest.raises(ConfigError, match="strategy"):
        make_cfg("m", tmp_path, pairs={"strategy": "random"})


@pytest.mark.slow
def test_minilm_few_shot_debian_sections(minilm_path, tmp_path):
    """Real model, real text: 8 synopses per Debian section, 4 sections, 40 held-out synopses."""
    fixtures = FIXTURES / "setfit"
    cfg = make_cfg(
        minilm_path,
        tmp_path,
        data={"train": str(fixtures / "train.jsonl"), "test": str(fixtures / "test.jsonl")},
        pairs={"num_iterations": 5},
        train={"learning_rate": 2e-5, "warmup_ratio": 0.1},
        model={"name_or_path": str(minilm_path), "max_seq_length": 64},
    )
    results = run(cfg)
    before = results["eval_before_classification"]["metrics"]["accuracy"]
    after = results["eval_after_classification"]["metrics"]["accuracy"]
    assert after > 70.0  # chance is 25
    assert after >= before - 5.0


@pytest.mark.slow
@pytest.mark.parametrize("head", ["logistic_regression", "end_to_end"])
def test_two_processes_with_accelerate_launch(tiny_bert_path, tmp_path, head):
    """DDP on CPU (gloo): pair tuning, the head refit and (optionally) end-to-end tuning in 2 processes."""
    import os
    import subprocess
    import sys

    import yaml

    cfg = {
        "task": "setfit",
        "output_dir": str(tmp_path / "run"),
        "seed": 0,
        "model": {"name_or_path": str(tiny_bert_path), "max_seq_length": 32},
        "data": {
            "train": write_jsonl(tmp_path / "train.jsonl", topic_texts(8, seed=0)),
            "test": write_jsonl(tmp_path / "test.jsonl", topic_texts(10, seed=1)),
        },
        "pairs": {"num_iterations": 2},
        "head": {"type": "linear", "end_to_end": True} if head == "end_to_end" else {},
        "train": {"batch_size": 8, "learning_rate": 1e-3, "checkpoint_every": 2, "resume": "none"},
    }
    config = tmp_path / "setfit.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_cpu_threads_per_process", "1", "--main_process_port", "0",
        str(REPO / "train.py"), "--config", str(config),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # 96 pairs in global batches of 2 x 8 = 6 steps.
    assert results["steps"] == 6
    assert results["eval_after_classification"]["metrics"]["accuracy"] > 40.0
    model = SetFitStyleModel.from_pretrained(tmp_path / "run" / "final")
    assert model.labels == ["food", "music", "sports"]


def test_skipping_the_before_evaluation_changes_nothing_but_work(tiny_bert_path, tmp_path):
    """Without a "before" evaluation the frozen-body head is not fitted (nobody would see it):
    the tuned body, the final head and the final checkpoint's head are exactly those of a run
    that evaluated before training."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = run(make_cfg(tiny_bert_path, tmp_path / "a"))
    lean = run(make_cfg(tiny_bert_path, tmp_path / "b", eval={"before_training": False}))
    assert "eval_before_classification" in full and "eval_before_classification" not in lean
    assert lean["eval_after_classification"] == full["eval_after_classification"]

    test = [json.loads(line)["text"] for line in (tmp_path / "a" / "test.jsonl").read_text().splitlines()]
    a = SetFitStyleModel.from_pretrained(tmp_path / "a" / "run" / "final")
    b = SetFitStyleModel.from_pretrained(tmp_path / "b" / "run" / "final")
    np.testing.assert_array_equal(a.predict_proba(test), b.predict_proba(test))

    # The final checkpoint (written once, after the refit) holds the refitted head, not the zero one.
    checkpoints = list_checkpoints(tmp_path / "b" / "run")
    cfg_b = make_cfg(tiny_bert_path, tmp_path / "b", eval={"before_training": False})
    export_checkpoint(cfg_b, checkpoints[-1], tmp_path / "b_from_checkpoint")
    from_checkpoint = SetFitStyleModel.from_pretrained(tmp_path / "b_from_checkpoint")
    np.testing.assert_allclose(from_checkpoint.predict_proba(test), b.predict_proba(test), atol=1e-6)
