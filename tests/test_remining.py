"""Hard negatives re-mined with the model being trained (the contrastive recipe's ``mining:`` section)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, crash_contrastive_run_at_call, two_process_launch
from safetensors.torch import load_file

from ember_train.config import ConfigError
from ember_train.data.pairs import PairExample
from ember_train.evaluation.mining import mine_hard_negatives
from ember_train.models import Encoder
from ember_train.pipelines import contrastive, load_config
from ember_train.pipelines.remining import MiningConfig, NegativeRemining
from ember_train.training.checkpoint import REFRESH_STATE, load_model_weights

HERE = Path(__file__).resolve().parent


class TableEncoder:
    """Embeds from a score table: ``scores[query][doc]`` is the cosine the miner will see.

    A query is one-hot; a document's vector holds its score for each query plus one component
    that gives every document the same norm, so normalising keeps the table's order. Changing
    ``scores`` between passes is "training".
    """

    def __init__(self, queries: list[str], docs: list[str], scores: dict[str, dict[str, float]]):
        self.queries, self.docs, self.scores = queries, docs, scores

    def encode(self, texts, batch_size=64, kind=None):
        n = len(self.queries)
        rows = []
        for text in texts:
            v = torch.zeros(n + 1, dtype=torch.float64)
            if kind == "query":
                v[self.queries.index(text)] = 1.0
            else:
                for i, q in enumerate(self.queries):
                    v[i] = self.scores[q].get(text, 0.0)
                v[n] = math.sqrt(9.0 - float(v[:n].pow(2).sum()))
            rows.append(v / 3.0)
        return torch.stack(rows).float()


QUERIES = ["q0", "q1", "q2", "q3"]
DOCS = ["p0", "p1", "p2", "p3"]


def _examples() -> list[PairExample]:
    return [PairExample(q, p, ["from the data"]) for q, p in zip(QUERIES, DOCS, strict=True)]


def _hook(examples, encoder, num_negatives=1, **settings) -> NegativeRemining:
    cfg = MiningConfig(**{"rank_window": [0, 2], "max_score_ratio": None, **settings})
    return NegativeRemining(examples, encoder, cfg, num_negatives=num_negatives, seed=0, steps_per_epoch=2)


def _ranked(order: list[str]) -> dict[str, float]:
    """Scores falling in ``order``: the first is the positive."""
    return {doc: 0.9 - 0.2 * i for i, doc in enumerate(order)}


def test_remining_moves_negatives_to_the_current_models_hardest_non_positive_docs():
    examples = _examples()
    # "Before training": each query's hardest other document is the next one.
    scores = {
        q: _ranked([DOCS[i], DOCS[(i + 1) % 4], DOCS[(i + 2) % 4], DOCS[(i + 3) % 4]])
        for i, q in enumerate(QUERIES)
    }
    encoder = TableEncoder(QUERIES, DOCS, scores)
    hook = _hook(examples, encoder, before_training=True, every_steps=3)

    assert hook(0) is True
    assert [e.negatives for e in examples] == [["p1"], ["p2"], ["p3"], ["p0"]]
    assert hook(0) is False and hook(2) is False  # never twice at a step; not due at step 2

    # "Training" moved q0 and q2: now the document two ahead is their hardest.
    scores["q0"] = _ranked(["p0", "p2", "p1", "p3"])
    scores["q2"] = _ranked(["p2", "p0", "p3", "p1"])
    assert hook(3) is True
    assert [e.negatives for e in examples] == [["p2"], ["p2"], ["p0"], ["p0"]]
    assert [(p["step"], p["rows_changed"]) for p in hook.passes] == [(0, 4), (3, 2)]
    assert hook.summary()["passes"] == 2 and hook.summary()["cadence_steps"] == 3


def test_the_filters_of_ember_train_mine_apply():
    docs = ["p0", "  P0 ", "near", "far", "farther"]
    queries = [f"q{i}" for i in range(len(docs))]
    examples = [PairExample(q, d) for q, d in zip(queries, docs, strict=True)]
    scores = {q: _ranked([d, *[o for o in docs if o != d]]) for q, d in zip(queries, docs, strict=True)}
    # q0: its positive in another spelling ranks first, then a near-duplicate (>= 0.95 x its positive's score).
    scores["q0"] = {"  P0 ": 0.95, "p0": 0.9, "near": 0.88, "far": 0.5, "farther": 0.25}
    # q1 (positive "  P0 "): "p0" is the same text, so it is a positive too.
    scores["q1"] = {"  P0 ": 0.9, "p0": 0.85, "far": 0.6, "near": 0.4, "farther": 0.2}
    encoder = TableEncoder(queries, docs, scores)
    hook = _hook(examples, encoder, 2, before_training=True, rank_window=[0, 4], max_score_ratio=0.95)
    hook(0)
    assert examples[0].negatives == ["far"]  # all that is left: "farther" is outside the window
    assert sorted(examples[1].negatives) == ["far", "near"]
    assert all(e.positive not in e.negatives for e in examples)


def test_a_query_left_without_candidates_keeps_its_negatives_or_gets_random_ones_before_training():
    examples = [PairExample(q, p) for q, p in zip(QUERIES, DOCS, strict=True)]
    examples.append(PairExample("q0", " P0"))  # a second spelling of q0's positive: never its negative
    scores = {q: _ranked([DOCS[i], *[d for d in DOCS if d != DOCS[i]]]) for i, q in enumerate(QUERIES)}
    scores["q0"][" P0"] = 0.95
    hook = _hook(examples, TableEncoder(QUERIES, DOCS, scores), before_training=True, every_steps=1)
    hook.settings.rank_window = [0, 1]  # only the top document: a positive, so every candidate is filtered
    assert hook(0) is True
    assert hook.passes[-1]["random"] == 5
    for e in examples:
        assert len(e.negatives) == 1 and e.negatives[0].strip().lower() != (
            "p0" if e.query == "q0" else e.positive
        )
    first = [list(e.negatives) for e in examples]
    hook.mined_at = None
    hook(0)
    assert [e.negatives for e in examples] == first  # drawn reproducibly (seeded by the query)
    assert hook(1) is True
    assert [e.negatives for e in examples] == first and hook.passes[-1]["kept_previous"] == 5


def test_state_round_trips_and_epochs_count_in_steps():
    examples = _examples()
    scores = {
        q: _ranked([DOCS[i], DOCS[(i + 3) % 4], DOCS[(i + 1) % 4], DOCS[(i + 2) % 4]])
        for i, q in enumerate(QUERIES)
    }
    hook = _hook(examples, TableEncoder(QUERIES, DOCS, scores), every_epochs=2)
    assert [s for s in range(9) if hook.due(s)] == [4, 8]  # 2 epochs of 2 steps
    hook(4)
    state = json.loads(json.dumps(hook.state_dict()))
    fresh = _examples()
    other = _hook(fresh, TableEncoder(QUERIES, DOCS, scores), every_epochs=2)
    other.load_state_dict(state)
    assert [e.negatives for e in fresh] == [e.negatives for e in examples] == [["p3"], ["p0"], ["p1"], ["p2"]]
    assert other.due(4) is False and other.passes == hook.passes


@pytest.mark.parametrize(
    "override,message",
    [
        ("mining.every_steps=-1", "mining: every_steps must be >= 0"),
        ("mining.every_epochs=-2", "mining: every_epochs must be >= 0"),
        ("mining.rank_window=[5,5]", "mining: rank_window"),
        ("loss.num_negatives=0", "set loss.num_negatives > 0"),
    ],
)
def test_bad_mining_values_stop_before_anything_loads(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text(
        "task: contrastive\nmodel: {name_or_path: /no/such/model}\ndata: {train: /no/such/file.jsonl}\n"
        "loss: {num_negatives: 1}\nmining: {every_steps: 10}\n"
    )
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), [override])


def _config(tmp_path: Path, model: Path, name: str, *overrides: str):
    path = tmp_path / f"{name}.yaml"
    # A random tiny BERT ranks many documents above a positive: the near-duplicate filter is off.
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / name}\nseed: 3\n"
        f"model: {{name_or_path: {model}, max_seq_length: 24}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 48}}\n"
        "loss: {num_negatives: 1}\n"
        "mining: {before_training: true, every_steps: 3, rank_window: [0, 10], margin: -1.0, max_score_ratio: null}\n"
        "train: {batch_size: 12, max_steps: 6, learning_rate: 1.0e-3, log_every: 1, checkpoint_every: 2, "
        "keep_checkpoints: 5}\nexport: {enabled: true}\n"
    )
    return load_config(str(path), list(overrides))


def test_resume_after_a_remining_uses_the_saved_negatives_and_matches_the_uninterrupted_run(
    tmp_path, tiny_bert_path, monkeypatch, one_torch_thread
):
    full = contrastive.run(_config(tmp_path, tiny_bert_path, "full"))
    assert full["mining"]["passes"] == 2 and [p["step"] for p in full["mining"]["log"]] == [0, 3]
    assert full["mining"]["log"][1]["rows_changed"] > 0  # the step-3 model mines other negatives
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["mining"]["passes"] == 2

    # Killed in step 5: the step-4 checkpoint holds weights after the step-3 re-mining.
    real = contrastive.make_loss_step
    crash_contrastive_run_at_call(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        contrastive.run(_config(tmp_path, tiny_bert_path, "crashed"))
    monkeypatch.setattr(contrastive, "make_loss_step", real)
    checkpoint = tmp_path / "crashed" / "checkpoints" / "step_0000004"
    assert json.loads((checkpoint / REFRESH_STATE).read_text())["mined_at"] == 3
    resumed = contrastive.run(_config(tmp_path, tiny_bert_path, "crashed", "train.resume=auto"))
    assert resumed["mining"]["passes"] == 2  # restored, not mined again at the resume

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "crashed" / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_two_processes_mine_the_same_negatives_as_one_process(tmp_path, tiny_bert_path):
    """Each process embeds half the texts; both end with the negatives one process mines from the same weights."""
    cmd, env = two_process_launch(HERE / "distributed" / "remining_check.py", tiny_bert_path, tmp_path)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"negatives_{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # after every pass, the same negatives and weights on both processes
    assert [p["step"] for p in ranks[0]] == [0, 3]

    # One process, the step-3 weights (checkpointed after the step-3 pass): the same negatives.
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000003"
    state = json.loads((checkpoint / REFRESH_STATE).read_text())
    saved = [[state["texts"][i] for i in row] for row in state["negatives"]]
    encoder = Encoder.from_pretrained(str(tiny_bert_path), max_seq_length=24)
    load_model_weights(encoder, checkpoint)
    cfg = load_config(str(tmp_path / "run" / "config.yaml"))
    pairs = [{"query": q, "pos": p} for q, p in ranks[0][1]["pairs"]]
    mined, _ = mine_hard_negatives(
        encoder,
        pairs,
        rank_window=tuple(cfg.mining.rank_window),
        margin=cfg.mining.margin,
        max_score_ratio=cfg.mining.max_score_ratio,
        num_negatives=cfg.loss.num_negatives,
        seed=cfg.seed,
        show_progress=False,
    )
    assert [m["neg"] for m in mined] == saved == ranks[0][1]["negatives"]
    assert ranks[0][1]["weights"] != ranks[0][0]["weights"]  # mined with the step-3 weights, on both
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
