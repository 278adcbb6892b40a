"""Matryoshka dimensions: the loss on prefixes, its config checks, evaluation at prefix lengths, the export."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from ember_train.config import ConfigError
from ember_train.data.batching import BatchLayout
from ember_train.data.pairs import PairCollator, PairExample
from ember_train.data.setfit_pairs import TargetPairCollator
from ember_train.evaluation.base import EvalResult, Evaluator, encode
from ember_train.evaluation.dims import evaluate_at_dims
from ember_train.evaluation.retrieval import RetrievalEvaluator
from ember_train.losses.cosine import CosineMSELoss
from ember_train.losses.infonce import InfoNCELoss
from ember_train.losses.matryoshka import MatryoshkaLoss
from ember_train.models import Encoder
from ember_train.models.sentence_transformers import export_encoder, read_matryoshka_dims
from ember_train.models.setfit import SetFitStyleModel
from ember_train.pipelines import contrastive, load_config
from ember_train.pipelines.contrastive import EvalConfig, LossConfig, make_loss_step
from ember_train.pipelines.setfit import PairGenerationConfig, make_pair_loss_step
from ember_train.training.grad_cache import StepContext

DIMS, WEIGHTS = [32, 16, 8], [1.0, 0.5, 2.0]
EXAMPLES = [
    PairExample(
        query="q " + "word " * (i % 7),
        positive=f"document {i} " + "text " * (3 * i % 17),
        negatives=[f"negative {i} " + "noise " * (i % 5)],
    )
    for i in range(8)
]


def _ctx() -> StepContext:
    return StepContext(
        backward=lambda t: t.backward(), no_sync=nullcontext, sync=True, may_backward=lambda t: True
    )


def _infonce_by_hand(q, p, n, temperature):
    """InfoNCE written out: cosine = dot of L2-normalised vectors, own positive as the target."""
    q, p = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    candidates = torch.cat([p, F.normalize(n, dim=-1).flatten(0, 1)])
    scores = q @ candidates.T / temperature
    return F.cross_entropy(scores, torch.arange(q.shape[0]))


def test_loss_is_the_weighted_sum_of_infonce_on_truncated_renormalised_vectors():
    torch.manual_seed(0)
    # Normalised full vectors, as an L2-normalising encoder outputs: a prefix of a unit vector is
    # not a unit vector, so the loss must re-normalise after truncating.
    q, p = (
        F.normalize(torch.randn(6, 32, dtype=torch.float64), dim=-1),
        F.normalize(torch.randn(6, 32, dtype=torch.float64), dim=-1),
    )
    n = F.normalize(torch.randn(6, 2, 32, dtype=torch.float64), dim=-1)
    loss = MatryoshkaLoss(InfoNCELoss(0.05), DIMS, WEIGHTS)(q, p, n)
    expected = sum(
        w * _infonce_by_hand(q[:, :d], p[:, :d], n[..., :d], 0.05) for d, w in zip(DIMS, WEIGHTS, strict=True)
    )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # Default weights are all 1; one dimension equal to the full one is plain InfoNCE.
    assert MatryoshkaLoss(InfoNCELoss(0.05), [32, 8])(q, p, n).item() == pytest.approx(
        (_infonce_by_hand(q, p, n, 0.05) + _infonce_by_hand(q[:, :8], p[:, :8], n[..., :8], 0.05)).item(),
        rel=1e-12,
    )
    torch.testing.assert_close(MatryoshkaLoss(InfoNCELoss(0.05), [32])(q, p, n), InfoNCELoss(0.05)(q, p, n))


def test_cosine_pair_loss_on_prefixes_takes_the_target_through():
    torch.manual_seed(1)
    a, b = torch.randn(5, 32, dtype=torch.float64), torch.randn(5, 32, dtype=torch.float64)
    target = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    loss = MatryoshkaLoss(CosineMSELoss(), DIMS, WEIGHTS)(a, b, target=target)
    expected = sum(
        w * ((F.cosine_similarity(a[:, :d], b[:, :d]).float() - target) ** 2).mean()
        for d, w in zip(DIMS, WEIGHTS, strict=True)
    )
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("pack", [False, True])
def test_grad_cache_gives_the_loss_and_gradients_of_the_plain_step(tiny_bert_path, pack):
    encoder = (
        Encoder.from_pretrained(tiny_bert_path, max_seq_length=32).double().eval()
    )  # float64, no dropout
    batch = PairCollator(encoder, num_negatives=1, layout=BatchLayout(pack=pack))(EXAMPLES)
    loss_fn = MatryoshkaLoss(InfoNCELoss(0.05, symmetric=True), DIMS, WEIGHTS)
    loss, _ = make_loss_step(loss_fn)(encoder, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    cached, _ = make_loss_step(loss_fn, grad_cache_chunk_size=3)(encoder, batch, _ctx())
    torch.testing.assert_close(cached, loss.detach(), rtol=1e-12, atol=0)
    assert len(grads) > 10
    for name, param in encoder.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-9, atol=1e-12, msg=name)
    # The prefixes change the gradients: the plain InfoNCE step gives others.
    encoder.zero_grad()
    make_loss_step(InfoNCELoss(0.05, symmetric=True))(encoder, batch)[0].backward()
    assert not torch.allclose(
        encoder.backbone.embeddings.word_embeddings.weight.grad,
        grads["backbone.embeddings.word_embeddings.weight"],
    )


def test_setfit_pair_step_through_the_grad_cache(tiny_bert_path):
    model = SetFitStyleModel(Encoder.from_pretrained(tiny_bert_path, max_seq_length=32).double()).eval()
    items = [
        {"text1": f"text {i}", "text2": f"other text {i} " + "x " * i, "label": float(i % 2)}
        for i in range(6)
    ]
    batch = TargetPairCollator(model.body, BatchLayout(pack=False))(items)
    loss_fn = MatryoshkaLoss(CosineMSELoss(), DIMS, WEIGHTS)
    plain, _ = make_pair_loss_step(loss_fn)(model, batch)
    plain.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        a = model(model.body.tokenize([i["text1"] for i in items]))
        b = model(model.body.tokenize([i["text2"] for i in items]))
    torch.testing.assert_close(plain.detach(), loss_fn(a, b, target=batch["label"]), rtol=1e-12, atol=1e-15)
    cached, _ = make_pair_loss_step(loss_fn, grad_cache_chunk_size=4)(model, batch, _ctx())
    torch.testing.assert_close(cached, plain.detach(), rtol=1e-12, atol=1e-15)
    for name, grad in grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"matryoshka_dims": [64, 128]}, "descending"),
        ({"matryoshka_dims": [128, 128, 64]}, "unique"),
        ({"matryoshka_dims": [128, 0]}, "positive"),
        ({"matryoshka_dims": [128, -64]}, "positive"),
        ({"matryoshka_dims": [128, 64], "matryoshka_weights": [1.0]}, "1 values for 2"),
        ({"matryoshka_dims": [128, 64], "matryoshka_weights": [1.0, 0.0]}, "> 0"),
        ({"matryoshka_weights": [1.0]}, "needs matryoshka_dims"),
    ],
)
def test_bad_dimensions_are_config_errors(kwargs, message):
    for section in (LossConfig, PairGenerationConfig):
        with pytest.raises(ValueError, match=message):
            section(**kwargs)
    with pytest.raises(ValueError, match="unique"):
        EvalConfig(dims=[64, 64])
    with pytest.raises(ValueError, match="positive"):
        EvalConfig(dims=[0])


@pytest.mark.parametrize(
    ("override", "key"),
    [("loss.matryoshka_dims=[64,32]", "loss.matryoshka_dims"), ("eval.dims=[16,48]", "eval.dims")],
)
def test_dims_longer_than_the_model_stop_the_run_before_training(
    tmp_path, tiny_bert_path, monkeypatch, override, key
):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {tiny_bert_path}}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 16}}\n"
    )
    cfg = load_config(str(path), [override])
    monkeypatch.setattr(
        contrastive, "train_loop", lambda *a, **k: pytest.fail("training started with a bad dimension")
    )
    with pytest.raises(ConfigError, match=rf"{key}: \d+ is larger than the model's embedding dimension 32"):
        contrastive.run(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


class _CountingEncoder:
    """A fixed random 'model' over texts that counts how many texts it embeds."""

    normalize = True

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts, batch_size=32, kind=None):
        self.calls += len(texts)
        vectors = [torch.Generator().manual_seed(hash((t, kind)) % 2**31) for t in texts]
        return F.normalize(torch.stack([torch.randn(24, generator=g) for g in vectors]), dim=-1)


class _Truncating:
    def __init__(self, encoder, dim):
        self.encoder, self.dim = encoder, dim

    def encode(self, texts, batch_size=32, kind=None):
        return F.normalize(self.encoder.encode(texts, batch_size, kind)[:, : self.dim], dim=-1)


def test_evaluation_at_dims_names_results_and_embeds_each_text_once():
    queries = [f"query {i}" for i in range(12)]
    positives = [f"doc {i} words" for i in range(12)]
    evaluator = RetrievalEvaluator.from_pairs(queries, positives, name="dev")
    encoder = _CountingEncoder()
    results = evaluate_at_dims([evaluator], encoder, [8, 16])
    assert [r.dataset for r in results] == ["dev", "dev@dim8", "dev@dim16"]
    assert [r.extra.get("dim") for r in results] == [None, 8, 16]
    assert encoder.calls == 24  # queries and documents once, not once per length
    assert results[0].metrics == evaluator(_CountingEncoder()).metrics
    for result, dim in zip(results[1:], [8, 16], strict=True):
        assert result.metrics == evaluator(_Truncating(_CountingEncoder(), dim)).metrics
    assert results[1].main_score != results[0].main_score  # a random 8-dim prefix ranks worse


class _Probe(Evaluator):
    """Reports the length and norm of the vectors it is given."""

    name = "probe"

    def __call__(self, encoder):
        vectors = encode(encoder, ["a", "b"], batch_size=2)
        metrics = {"dim": float(vectors.shape[1]), "norm": vectors.norm(dim=-1).mean().item()}
        return EvalResult("Probe", self.name, "test", metrics, "dim")


def test_pipeline_evaluation_reports_each_length_renormalised(tiny_bert_path):
    """A normalising model's prefixes are re-normalised, as its full vectors are (dot = cosine)."""
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=16, normalize=True)
    results = contrastive.run_evaluators([_Probe()], encoder, [8, 16])
    assert [(r.dataset, r.main_score) for r in results] == [
        ("probe", 32),
        ("probe@dim8", 8),
        ("probe@dim16", 16),
    ]
    assert [r.metrics["norm"] for r in results] == pytest.approx([1.0, 1.0, 1.0], rel=1e-6)


def test_export_records_the_dims_and_sentence_transformers_truncates(tmp_path, tiny_bert_path):
    from sentence_transformers import SentenceTransformer

    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32, normalize=True).eval()
    out = export_encoder(encoder, tmp_path / "export", matryoshka_dims=[32, 16, 8])
    config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert config["matryoshka_dims"] == [32, 16, 8] == read_matryoshka_dims(out)
    assert "truncate_dim" not in config  # loaders get the full vectors unless they ask

    texts = ["a short text", "another somewhat longer text about packages"]
    ours = encoder.encode(texts)
    full = SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    assert full.shape == (2, 32)
    cut = SentenceTransformer(str(out), device="cpu", truncate_dim=8).encode(texts, convert_to_tensor=True)
    assert cut.shape == (2, 8)
    torch.testing.assert_close(cut.cpu(), ours[:, :8], rtol=1e-4, atol=1e-5)

    plain = export_encoder(encoder, tmp_path / "plain")
    assert "matryoshka_dims" not in json.loads((plain / "config_sentence_transformers.json").read_text())
    assert read_matryoshka_dims(plain) == []


def test_contrastive_run_from_the_config_key(tmp_path, tiny_bert_path, monkeypatch):
    """``loss.matryoshka_dims`` reaches the loss, ``eval.dims`` the results, and the export records the dims."""
    seen = []
    real = contrastive.make_loss_step

    def spy(loss_fn, *args, **kwargs):
        seen.append(loss_fn)
        return real(loss_fn, *args, **kwargs)

    monkeypatch.setattr(contrastive, "make_loss_step", spy)
    path = tmp_path / "c.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {tiny_bert_path}, max_seq_length: 24}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 16}}\n"
        f"eval: {{data: {REPO / 'data/quickstart/dev.jsonl'}, max_queries: 20, before_training: false}}\n"
        "train: {batch_size: 8, max_steps: 1, checkpoint_every: 0}\n"
    )
    cfg = load_config(
        str(path), ["loss.matryoshka_dims=[32,16]", "loss.matryoshka_weights=[1,2]", "eval.dims=[16]"]
    )
    results = contrastive.run(cfg)
    (loss_fn,) = seen
    assert isinstance(loss_fn, MatryoshkaLoss) and loss_fn.dims == [32, 16] and loss_fn.weights == [1.0, 2.0]
    assert [r["dataset"] for r in results["eval_after"]] == ["dev", "dev@dim16"]
    final = tmp_path / "run" / "final"
    assert read_matryoshka_dims(final) == [32, 16]
    assert "**Matryoshka dimensions:** 32, 16" in (final / "README.md").read_text()


def test_eval_command_at_dims(tmp_path, tiny_bert_path, capsys):
    from conftest import FIXTURES

    from ember_train.cli import main

    out = tmp_path / "results.json"
    task = str(REPO / "configs" / "eval" / "STS12.yaml")
    argv = ["eval", str(tiny_bert_path), "--tasks", task, "--data-root", str(FIXTURES / "eval")]
    assert main([*argv, "--dims", "8,16", "--output", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [(r["dataset"], r["extra"].get("dim")) for r in results] == [
        ("STS12", None),
        ("STS12@dim8", 8),
        ("STS12@dim16", 16),
    ]
    assert main([*argv, "--dims", "8,64"]) != 0
    assert "--dims: 64 is larger than the model's embedding dimension 32" in capsys.readouterr().err
    assert main([*argv, "--dims", "8,8"]) != 0
    assert "unique" in capsys.readouterr().err
