"""The guard against forgetting: best-step selection (eval.select) and the merge with the base (merge.*)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, two_process_launch

from ember_train.config.parse import ConfigError
from ember_train.models import Encoder
from ember_train.models.merge import interpolate_state_dicts
from ember_train.pipelines import contrastive, load_config
from ember_train.training.checkpoint import load_model_weights
from ember_train.training.merge import MergePoint, choose_alpha, score_alphas
from ember_train.training.select import MetricSelector

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HERE = Path(__file__).resolve().parent
GENERAL = REPO / "configs/eval/general/STSBenchmark-300.yaml"
TEXTS = ["apt package manager front end", "a library for parsing XML files", "GNU image editor"]


def _config(tmp_path, model, name, *overrides):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / name}\nseed: 5\n"
        f"model: {{name_or_path: {model}, max_seq_length: 24, normalize: true}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 72}}\n"
        "train: {batch_size: 12, max_steps: 6, learning_rate: 1.0e-3, log_every: 1, eval_every: 1,"
        " checkpoint_every: 1, keep_checkpoints: 10}\n"
        f"eval: {{data: {REPO / 'data/quickstart/dev.jsonl'}, max_queries: 16, before_training: false}}\n"
    )
    return load_config(str(path), list(overrides))


def _peak_at(monkeypatch, scores):
    """The evaluation during training gains ``dev/peak``: scores[k] at the (k+1)-th evaluation."""
    real, calls = contrastive.flat_metrics, []

    def fake(results):
        calls.append(1)
        return {**real(results), "dev/peak": scores[len(calls) - 1]}

    monkeypatch.setattr(contrastive, "flat_metrics", fake)
    return calls


def _vectors(encoder):
    return encoder.encode(TEXTS, batch_size=8)


def _checkpoint_encoder(model, run_dir, step):
    encoder = Encoder.from_pretrained(model, max_seq_length=24, normalize=True)
    load_model_weights(encoder, run_dir / "checkpoints" / f"step_{step:07d}")
    return encoder


# --- selection ------------------------------------------------------------------------------------


def test_selector_parses_sums_and_names_missing_metrics():
    sel = MetricSelector.parse("0.7*eval/dev/ndcg@10 + 0.3*STSB-300/cosine_spearman")
    assert sel.terms == ((0.7, "dev/ndcg@10"), (0.3, "STSB-300/cosine_spearman"))
    assert sel.score({"dev/ndcg@10": 50.0, "STSB-300/cosine_spearman": 80.0}) == pytest.approx(59.0)
    with pytest.raises(ValueError, match="the evaluation logs \\['dev/mrr@10'\\]"):
        sel.score({"dev/mrr@10": 1.0})
    assert MetricSelector.parse("dev/loss", "min").better(1.0, 2.0)
    assert not MetricSelector.parse("dev/ndcg@10").better(float("nan"), None)
    with pytest.raises(ValueError, match="cannot read"):
        MetricSelector.parse("ndcg")


def test_select_exports_the_best_steps_weights(tmp_path, tiny_bert_path, monkeypatch):
    _peak_at(monkeypatch, [0.1, 0.9, 0.5, 0.3, 0.2, 0.4])
    cfg = _config(tmp_path, tiny_bert_path, "sel", "eval.select=dev/peak")
    results = contrastive.run(cfg)
    run_dir = tmp_path / "sel"
    assert results["selected"]["step"] == 2 and results["selected"]["score"] == 0.9
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["selected"]["step"] == 2 and saved["selected"]["metrics"]["dev/peak"] == 0.9
    card = (run_dir / "final" / "README.md").read_text()
    assert "step 2 of 6, the best by `dev/peak (max)`" in card
    # Domain metrics appear in the log at each evaluation, under eval/<dataset>/<metric>.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval/dev/ndcg@10" in r] == [1, 2, 3, 4, 5, 6]
    # The export holds step 2's weights, not the last step's.
    exported = _vectors(Encoder.from_pretrained(run_dir / "final"))
    torch.testing.assert_close(exported, _vectors(_checkpoint_encoder(tiny_bert_path, run_dir, 2)))
    assert not torch.allclose(exported, _vectors(_checkpoint_encoder(tiny_bert_path, run_dir, 6)))
    # Kept: the best, and step 1's (the kept step-1 checkpoint's best so far, for a resume from it).
    assert sorted(p.name for p in (run_dir / "best").iterdir()) == ["step_0000001", "step_0000002"]


def test_resume_keeps_the_best_so_far(tmp_path, tiny_bert_path, monkeypatch):
    _peak_at(monkeypatch, [0.1, 0.9, 0.5, 0.3, 0.2, 0.4])  # one list over both runs: steps 1..6
    first = contrastive.run(
        _config(
            tmp_path,
            tiny_bert_path,
            "res",
            "eval.select=dev/peak",
            "train.max_steps=3",
            "train.keep_checkpoints=1",
        )
    )
    assert first["selected"]["step"] == 2
    resumed = contrastive.run(
        _config(
            tmp_path,
            tiny_bert_path,
            "res",
            "eval.select=dev/peak",
            "train.resume=auto",
            "train.keep_checkpoints=1",
        )
    )
    assert resumed["steps"] == 6
    assert resumed["selected"]["step"] == 2 and resumed["selected"]["score"] == 0.9  # not step 6's 0.4
    exported = _vectors(Encoder.from_pretrained(tmp_path / "res" / "final"))
    best = Encoder.from_pretrained(tiny_bert_path, max_seq_length=24, normalize=True)
    load_model_weights(best, tmp_path / "res" / "best" / "step_0000002")
    torch.testing.assert_close(exported, _vectors(best))


def test_unknown_select_metric_stops_before_training(tmp_path, tiny_bert_path):
    cfg = _config(tmp_path, tiny_bert_path, "bad", "eval.select=dev/ndcg@11", "eval.before_training=true")
    with pytest.raises(ValueError, match="no metric 'dev/ndcg@11'; the evaluation logs .*'dev/ndcg@10'"):
        contrastive.run(cfg)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_select_naming_an_unknown_set_stops_before_the_model_loads(tmp_path):
    cfg = _config(tmp_path, tmp_path / "no-such-model", "bad", "eval.select=STSB/cosine_spearman")
    with pytest.raises(
        ValueError, match=r"\['STSB'\] that are not configured; the evaluation sets are \['dev'\]"
    ):
        contrastive.run(cfg)


@pytest.mark.parametrize(
    "override,message",
    [
        ("merge.alpha=1.5", "merge.alpha must be in \\[0, 1\\]"),
        ("merge.alphas=[]", "at least one candidate"),
        ("merge.alphas=[0.5, 2]", "merge.alphas must be in \\[0, 1\\], got \\[2.0\\]"),
        ("merge.alpha=sometimes", "merge.alpha"),
        ("merge.max_general_drop=-1", "max_general_drop must be a number >= 0"),
        ("merge.alpha=auto", "auto needs a domain evaluation \\(eval.data\\) and a general one"),
        ("eval.select=dev", "cannot read 'dev'"),
        ("eval.select_mode=best", "select_mode"),
        ("train.eval_every=0", "eval.select needs train.eval_every > 0"),
        ("eval.data=null", "eval.select needs an evaluation"),
    ],
)
def test_bad_guard_settings_fail_at_parse_time(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, tmp_path / "not-loaded", "cfg", "eval.select=dev/ndcg@10", override)


# --- merge ----------------------------------------------------------------------------------------


def test_merge_arithmetic():
    tuned = {"w": torch.tensor([1.0, 3.0]), "ids": torch.tensor([0, 1])}
    base = {"w": torch.tensor([-1.0, 1.0]), "ids": torch.tensor([5, 5])}
    assert torch.equal(interpolate_state_dicts(tuned, base, 0.0)["w"], base["w"])
    assert torch.equal(interpolate_state_dicts(tuned, base, 1.0)["w"], tuned["w"])
    assert torch.equal(interpolate_state_dicts(tuned, base, 0.5)["w"], torch.tensor([0.0, 2.0]))
    assert torch.equal(interpolate_state_dicts(tuned, base, 0.25)["w"], torch.tensor([-0.5, 1.5]))
    assert torch.equal(interpolate_state_dicts(tuned, base, 0.5)["ids"], tuned["ids"])  # not interpolated
    with pytest.raises(ValueError, match="missing \\['ids'\\]"):
        interpolate_state_dicts(tuned, {"w": base["w"]}, 0.5)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        interpolate_state_dicts(tuned, base, 1.1)


def test_auto_alpha_rule():
    # base (alpha 0): domain 50, general 80; the tuned model gains domain and loses general.
    table = {0.0: (50, 80), 0.25: (55, 79.8), 0.5: (58, 79.1), 0.75: (60, 78.0), 1.0: (61, 75)}
    points = [MergePoint(a, d, g, d - 50, 80 - g) for a, (d, g) in table.items()]
    assert choose_alpha(points, list(table), max_general_drop=1.0).alpha == 0.5
    assert choose_alpha(points, list(table), max_general_drop=2.0).alpha == 0.75
    assert choose_alpha(points, list(table), max_general_drop=0.0).alpha == 0.0
    assert choose_alpha(points, list(table), max_general_drop=10).alpha == 1.0
    # No candidate within the budget (the base is not a candidate): the best general score.
    assert choose_alpha(points, [0.75, 1.0], max_general_drop=0.5).alpha == 0.75


def test_score_alphas_scores_each_merge():
    model = torch.nn.Linear(1, 1, bias=False)
    tuned, base = {"weight": torch.tensor([[10.0]])}, {"weight": torch.tensor([[0.0]])}
    # A stub evaluation: domain rises with the weight, general falls.
    points = score_alphas(
        model, tuned, base, [0.5, 1.0], lambda: (model.weight.item(), 80 - model.weight.item() / 5)
    )
    assert [p.alpha for p in points] == [0.0, 0.5, 1.0]  # the base is always scored, as the reference
    assert [p.domain for p in points] == [0.0, 5.0, 10.0]
    assert [p.domain_gain for p in points] == [0.0, 5.0, 10.0]
    assert [p.general_loss for p in points] == pytest.approx([0.0, 1.0, 2.0])
    assert choose_alpha(points, [0.5, 1.0], 1.0).alpha == 0.5


def test_export_of_a_merge_gives_the_merged_vectors(tmp_path, tiny_bert_path):
    cfg = _config(tmp_path, tiny_bert_path, "m", "merge.alpha=0.3", "train.max_steps=3")
    results = contrastive.run(cfg)
    assert results["merge"]["alpha"] == 0.3 and "selected" not in results
    tuned = _checkpoint_encoder(tiny_bert_path, tmp_path / "m", 3)
    base = Encoder.from_pretrained(tiny_bert_path, max_seq_length=24, normalize=True)
    expected = Encoder.from_pretrained(tiny_bert_path, max_seq_length=24, normalize=True)
    expected.load_state_dict(interpolate_state_dicts(tuned.state_dict(), base.state_dict(), 0.3))
    exported = _vectors(Encoder.from_pretrained(tmp_path / "m" / "final"))
    torch.testing.assert_close(exported, _vectors(expected))
    assert not torch.allclose(exported, _vectors(tuned)) and not torch.allclose(exported, _vectors(base))
    assert "weights: 0.3 × tuned + 0.7 × base" in (tmp_path / "m" / "final" / "README.md").read_text()


def test_auto_merge_with_select_and_a_general_slice(tmp_path, tiny_bert_path, capsys):
    cfg = _config(
        tmp_path, tiny_bert_path, "auto", "train.max_steps=3", "eval.select=dev/ndcg@10",
        f"eval.tasks=[{GENERAL}]", "merge.alpha=auto", "merge.alphas=[0.5, 1.0]", "merge.max_general_drop=0.5",
    )  # fmt: skip
    results = contrastive.run(cfg)
    merge = results["merge"]
    points = [MergePoint(**p) for p in merge["points"]]
    assert [p.alpha for p in points] == [0.0, 0.5, 1.0]
    assert merge["alpha"] == choose_alpha(points, [0.5, 1.0], 0.5).alpha
    assert merge["domain"] == "dev ndcg@10" and merge["general"] == "mean of STSB-300 cosine_spearman"
    assert "| alpha | domain | general | domain gain | general loss |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "auto" / "results.json").read_text())
    assert saved["merge"]["table"] == merge["table"]
    # General metrics are logged at each evaluation next to the domain ones.
    records = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    assert all("eval/STSB-300/cosine_spearman" in r for r in records if "eval/dev/ndcg@10" in r)
    # eval_after is the exported (merged) model's evaluation.
    chosen = next(p for p in points if p.alpha == merge["alpha"])
    assert saved["eval_after"][0]["main_score"] == pytest.approx(chosen.domain)


# --- two processes --------------------------------------------------------------------------------


@pytest.mark.slow
def test_select_and_merge_agree_across_two_processes(tmp_path, tiny_bert_path):
    cfg = _config(tmp_path, tiny_bert_path, "dist")  # written for its path; the script overrides
    out = tmp_path / "agree"
    cmd, env = two_process_launch(
        HERE / "distributed" / "select_merge_check.py", tmp_path / "dist.yaml", out,
        f"eval.tasks=[{GENERAL}]", "eval.select=dev/peak", "merge.alpha=auto", "merge.alphas=[0.5, 1.0]",
        "merge.max_general_drop=100",
    )  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["evaluations"] == 6 and ranks[1]["evaluations"] == 0  # only the main process evaluates
    assert ranks[0]["selected_step"] == ranks[1]["selected_step"] == 2
    points = [MergePoint(**p) for p in ranks[0]["points"]]  # scored on the main process only
    assert ranks[1]["points"] is None and len(points) == 3
    assert ranks[0]["alpha"] == ranks[1]["alpha"] == choose_alpha(points, [0.5, 1.0], 100).alpha
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=0, abs=0)
    exported = Encoder.from_pretrained(cfg.output_dir + "/final")
    assert sum(float(t.double().sum()) for t in exported.state_dict().values()) == pytest.approx(
        ranks[0]["weights"], rel=1e-9
    )
    assert os.path.isdir(os.path.join(cfg.output_dir, "best", "step_0000002"))
