"""Distillation from teacher scores: the KL formula, the score columns, the config checks,
``ember-train mine --teacher``, and training with it (plain, through the gradient cache, alone)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import run_tiny_contrastive

from ember_train.config import ConfigError
from ember_train.data.pairs import PairCollator, PairColumns, PairExample, load_pairs
from ember_train.data.reader import DataError
from ember_train.losses.distill import DistillationLoss
from ember_train.pipelines import load_config

REPO = Path(__file__).resolve().parent.parent


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --- the loss ------------------------------------------------------------------------------------


def test_kl_equals_the_documented_formula_in_float64():
    torch.manual_seed(0)
    b, n, dim = 4, 3, 8
    q, p, negs = torch.randn(b, dim).double(), torch.randn(b, dim).double(), torch.randn(b, n, dim).double()
    teacher = torch.rand(b, 1 + n).double()
    loss = DistillationLoss(temperature=0.1, teacher_temperature=0.5)(q, p, negs, teacher)

    expected = 0.0
    for i in range(b):
        docs = [p[i], *negs[i]]
        student = torch.stack([F.cosine_similarity(q[i], d, dim=0) for d in docs]) / 0.1
        target = torch.softmax(teacher[i] / 0.5, dim=0)
        log_r = torch.log_softmax(student, dim=0)
        expected += float((target * (target.log() - log_r)).sum())
    assert loss.item() == pytest.approx(expected / b, rel=1e-12)


def test_kl_is_zero_when_the_student_ranks_as_the_teacher_and_its_gradient_moves_towards_it():
    torch.manual_seed(1)
    q, p, negs = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 2, 8)
    docs = F.normalize(torch.cat([p[:, None], negs], dim=1), dim=-1)
    own = torch.einsum("bd,bgd->bg", F.normalize(q, dim=-1), docs)
    loss_fn = DistillationLoss(temperature=0.05, teacher_temperature=0.05)
    assert loss_fn(q, p, negs, own).item() == pytest.approx(0.0, abs=1e-6)

    # A teacher that prefers the positive more than the student does: the gradient step raises cos(q, p).
    teacher = own.clone()
    teacher[:, 0] += 0.2
    q = q.clone().requires_grad_()
    loss_fn(q, p, negs, teacher).backward()
    # Directional derivative of cos(q_i, p_i) along -grad: positive for every query.
    q_probe = q.detach().clone().requires_grad_()
    cos_grad = torch.autograd.grad(F.cosine_similarity(q_probe, p).sum(), q_probe)[0]
    assert ((-q.grad * cos_grad).sum(dim=-1) > 0).all()


def test_loss_rejects_bad_temperatures_and_shapes():
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        DistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match="do not match the groups"):
        DistillationLoss()(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 3, 4), torch.rand(2, 3))


# --- data ------------------------------------------------------------------------------------------

SCORED = {"query": "q", "pos": "p", "neg": ["a", "b"], "pos_score": 0.9, "neg_scores": [0.5, 0.4]}


@pytest.mark.parametrize(
    "row,message",
    [
        ({**SCORED, "pos_score": None}, r"row 2: field 'pos_score' is missing \(distillation"),
        ({k: v for k, v in SCORED.items() if k != "neg_scores"}, r"row 2: field 'neg_scores' is missing"),
        ({**SCORED, "neg_scores": [0.5]}, r"row 2: field 'neg_scores' has 1 scores for 2 negatives in 'neg'"),
        ({**SCORED, "neg_scores": 0.5}, r"row 2: field 'neg_scores' has a float for 2 negatives"),
        ({**SCORED, "neg_scores": [0.5, "x"]}, r"row 2: field 'neg_scores\[1\]' must be a finite number"),
        ({**SCORED, "pos_score": True}, r"row 2: field 'pos_score' must be a finite number"),
        ({**SCORED, "pos": ["p1", "p2"]}, r"row 2: field 'pos_score' has 1 scores for 2 positives"),
    ],
)
def test_bad_or_missing_scores_name_file_and_row(tmp_path, row, message):
    path = _jsonl(tmp_path / "scored.jsonl", [SCORED, row, SCORED])
    with pytest.raises(DataError, match=message) as info:
        load_pairs(str(path), num_negatives=2, teacher_scores=True)
    assert str(path) in str(info.value)
    # Distillation off: the score columns are not read.
    examples, _ = load_pairs(str(path), num_negatives=2)
    assert len(examples) >= 3 and all(e.positive_score is None for e in examples)


def test_mapped_score_columns_and_one_score_per_positive(tmp_path):
    path = _jsonl(
        tmp_path / "mapped.jsonl",
        [{"q": "q", "d": ["p1", "p2"], "n": ["a"], "t_pos": [0.9, 0.8], "t_neg": [0.1]}],
    )
    columns = PairColumns(query="q", pos="d", neg="n", pos_score="t_pos", neg_scores="t_neg")
    examples, _ = load_pairs(str(path), columns=columns, num_negatives=1, teacher_scores=True)
    assert [(e.positive, e.positive_score, e.negative_scores) for e in examples] == [
        ("p1", 0.9, [0.1]),
        ("p2", 0.8, [0.1]),
    ]


class _RecordingLayout:
    """A batch layout that records the texts the collator lays out (no tokenizer needed)."""

    def __init__(self):
        self.texts = {}

    def tokenize(self, encoder, texts, kind):
        self.texts[kind] = list(texts)
        return [{"attention_mask": torch.ones(len(texts), 1)}], torch.arange(len(texts))


def test_collator_scores_follow_the_negatives_drawn_for_each_query():
    examples = [
        PairExample(
            f"query {i}",
            f"pos {i}",
            [f"neg {i}.{j}" for j in range(5)],
            positive_score=float(i),
            negative_scores=[i + j / 10 for j in range(5)],
        )
        for i in range(4)
    ]
    examples.append(PairExample("query 4", "pos 4", ["neg 4.0"], 4.0, [4.0]))  # fewer: drawn with replacement
    layout = _RecordingLayout()
    batch = PairCollator(None, num_negatives=2, seed=3, layout=layout, teacher_scores=True)(examples)
    documents = layout.texts["document"]
    scores = batch["teacher_scores"]
    assert scores.shape == (5, 3)
    drawn = set()
    for i in range(5):
        negs = documents[5 + 2 * i : 5 + 2 * i + 2]
        drawn.update(negs)
        expected = [float(i)] + [i + int(t.split(".")[1]) / 10 for t in negs]
        assert scores[i].tolist() == pytest.approx(expected)
    assert len(drawn) > 5  # a sample of the negatives, not always the first ones
    assert "teacher_scores" not in PairCollator(None, num_negatives=2, layout=_RecordingLayout())(examples)


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("loss.distill_weight=-1", "distill_weight must be a finite number >= 0"),
        ("loss.infonce_weight=-0.5", "infonce_weight must be a finite number >= 0"),
        ("loss.distill_weight=nan", "distill_weight must be a finite number >= 0"),
        ("loss.infonce_weight=0", "both 0: nothing to train"),
        ("loss.distill_temperature=0", "distill_temperature must be > 0"),
        ("loss.distill_teacher_temperature=-1", "distill_teacher_temperature must be > 0"),
    ],
)
def test_bad_weights_and_temperatures_stop_the_config(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text(
        "task: contrastive\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\nloss: {num_negatives: 2}\n"
    )
    with pytest.raises(ConfigError, match=message):
        load_config(str(path), [override])


def test_distillation_needs_hard_negatives(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: contrastive\nmodel: {name_or_path: m}\ndata: {train: t.jsonl}\n")
    with pytest.raises(ConfigError, match="distill_weight > 0 needs num_negatives >= 1"):
        load_config(str(path), ["loss.distill_weight=1"])
    cfg = load_config(str(path), ["loss.distill_weight=1", "loss.num_negatives=1", "loss.infonce_weight=0"])
    assert cfg.loss.distill and cfg.loss.infonce_weight == 0


# --- ember-train mine --teacher ----------------------------------------------------------------------


class _TableEncoder:
    def __init__(self, table):
        self.table = table

    def encode(self, texts, batch_size=32, kind=None):
        return torch.stack([self.table[t] for t in texts])


def test_score_pairs_is_the_teachers_cosine_per_positive_and_negative():
    from ember_train.evaluation.mining import score_pairs

    torch.manual_seed(0)
    texts = ["q1", "q2", "p1", "p2a", "p2b", "n1", "n2"]
    table = {t: torch.randn(6) for t in texts}
    rows = [
        {"query": "q1", "pos": "p1", "neg": ["n1", "n2"]},
        {"query": "q2", "pos": ["p2a", "p2b"], "neg": []},
    ]
    scored = score_pairs(_TableEncoder(table), rows, show_progress=False)

    def cos(a, b):
        return float(F.cosine_similarity(table[a], table[b], dim=0))

    assert scored[0][0] == pytest.approx(cos("q1", "p1"), abs=1e-6)
    assert scored[0][1] == pytest.approx([cos("q1", "n1"), cos("q1", "n2")], abs=1e-6)
    assert scored[1][0] == pytest.approx([cos("q2", "p2a"), cos("q2", "p2b")], abs=1e-6)
    assert scored[1][1] == []


def _scored_pairs(tmp_path: Path, count: int = 48, num_negatives: int = 2) -> list[dict]:
    rows = [
        json.loads(line) for line in (REPO / "data/quickstart/train.jsonl").read_text().splitlines()[:count]
    ]
    rng = random.Random(0)
    for i, row in enumerate(rows):
        others = [r["pos"] for j, r in enumerate(rows) if j != i]
        row["neg"] = rng.sample(others, num_negatives + 1)
    return rows


def test_mine_teacher_scores_a_files_own_negatives_and_the_output_trains(tmp_path, tiny_bert_path, capsys):
    from ember_train.cli import main
    from ember_train.evaluation.loading import load_encoder

    rows = _scored_pairs(tmp_path, count=12)
    pairs = _jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert main(["mine", "--teacher", str(tiny_bert_path), "--pairs", str(pairs), "--output", str(out)]) == 0
    assert "scored 12 rows" in capsys.readouterr().out
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["neg"] for s in scored] == [r["neg"] for r in rows]  # not re-mined
    teacher = load_encoder(str(tiny_bert_path))
    q = F.normalize(teacher.encode([rows[3]["query"]], kind="query"), dim=-1)
    d = F.normalize(teacher.encode([rows[3]["pos"], *rows[3]["neg"]], kind="document"), dim=-1)
    expected = (d @ q[0]).tolist()
    assert [scored[3]["pos_score"], *scored[3]["neg_scores"]] == pytest.approx(expected, abs=1e-5)
    examples, _ = load_pairs(str(out), num_negatives=2, teacher_scores=True)
    assert len(examples) == 12

    # Mine and score in one go: the scores match the freshly mined negatives.
    plain = _jsonl(tmp_path / "plain.jsonl", [{"query": r["query"], "pos": r["pos"]} for r in rows])
    both = tmp_path / "both.jsonl"
    rc = main(["mine", "--model", str(tiny_bert_path), "--teacher", str(tiny_bert_path), "--pairs", str(plain),
               "--output", str(both), "--rank-window", "1,8", "--num-negatives", "2", "--max-score-ratio", "0"])  # fmt: skip
    assert rc == 0
    mined = [json.loads(line) for line in both.read_text().splitlines()]
    assert all(len(m["neg_scores"]) == len(m["neg"]) >= 1 for m in mined)


def test_mine_teacher_without_negatives_or_models_names_the_problem(tmp_path, tiny_bert_path):
    from ember_train.cli import main

    pairs = _jsonl(
        tmp_path / "pairs.jsonl", [{"query": "q", "pos": "p", "neg": ["n"]}, {"query": "q2", "pos": "p2"}]
    )
    out = str(tmp_path / "o.jsonl")
    assert main(["mine", "--teacher", str(tiny_bert_path), "--pairs", str(pairs), "--output", out]) == 2
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 2: field 'neg' must be a list of negatives"):
        from ember_train.cli import mine_command

        mine_command(main_args(["mine", "--teacher", "x", "--pairs", str(pairs), "--output", out]))
    assert main(["mine", "--pairs", str(pairs), "--output", out]) == 2


def main_args(argv):
    from ember_train.cli import build_parser

    return build_parser().parse_args(argv)


# --- training --------------------------------------------------------------------------------------


@pytest.fixture
def no_dropout_bert(tmp_path, tiny_bert_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_bert_path, path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _teacher_file(tmp_path: Path) -> Path:
    rows = _scored_pairs(tmp_path)
    rng = random.Random(1)
    for row in rows:
        row["pos_score"] = 0.8 + rng.random() / 10
        row["neg_scores"] = [rng.random() / 2 for _ in row["neg"]]
    return _jsonl(tmp_path / "teacher.jsonl", rows)


def _metrics(tmp_path: Path, name: str) -> list[dict]:
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


DISTILL = ("loss.num_negatives=2", "loss.distill_weight=0.5", "loss.distill_temperature=0.1")


def test_training_with_distillation_through_the_grad_cache_matches_plain(tmp_path, no_dropout_bert):
    data = f"data.train={_teacher_file(tmp_path)}"
    infonce_losses, infonce = run_tiny_contrastive(
        tmp_path, no_dropout_bert, "infonce", data, "loss.num_negatives=2"
    )
    plain_losses, plain = run_tiny_contrastive(tmp_path, no_dropout_bert, "plain", data, *DISTILL)
    cached_losses, cached = run_tiny_contrastive(
        tmp_path, no_dropout_bert, "cached", data, *DISTILL, "train.grad_cache_chunk_size=5"
    )
    assert cached_losses == [pytest.approx(x, rel=1e-5) for x in plain_losses]
    # Chunked vs whole float32 sums after 4 steps: AVX2 kernels left one of ~1M word-embedding
    # weights 1.2e-5 apart (AVX-512: under 1e-5); losses must still agree to 1e-5 relative.
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=1e-4, atol=3e-5)
    # The KL term is in the loss (logged on its own), and it changes what is learnt.
    records = _metrics(tmp_path, "plain")
    assert all(r["distill_loss"] > 0 and "infonce_loss" in r for r in records)
    assert records[0]["loss"] == pytest.approx(
        records[0]["infonce_loss"] + 0.5 * records[0]["distill_loss"], rel=1e-5
    )
    assert plain_losses[0] != pytest.approx(infonce_losses[0])
    assert any(not torch.equal(plain[k], infonce[k]) for k in plain)


def test_distillation_alone_and_missing_scores_stop_the_run(tmp_path, no_dropout_bert):
    data = f"data.train={_teacher_file(tmp_path)}"
    losses, _ = run_tiny_contrastive(
        tmp_path, no_dropout_bert, "alone", data, *DISTILL, "loss.infonce_weight=0"
    )
    records = _metrics(tmp_path, "alone")
    assert "infonce_loss" not in records[0]
    assert losses[0] == pytest.approx(0.5 * records[0]["distill_loss"], rel=1e-6)

    rows = _scored_pairs(tmp_path)  # negatives, no scores
    unscored = _jsonl(tmp_path / "unscored.jsonl", rows)
    with pytest.raises(DataError, match=r"unscored\.jsonl: row 1: field 'pos_score' is missing"):
        run_tiny_contrastive(tmp_path, no_dropout_bert, "unscored", f"data.train={unscored}", *DISTILL)
