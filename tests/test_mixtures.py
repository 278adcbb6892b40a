"""Several datasets in one contrastive run: sampling, one-dataset batches, per-dataset prefixes and
negatives, config errors, results per dataset, exact resume across datasets, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import crash_contrastive_run_at_call
from safetensors.torch import load_file

from ember_train.config import ConfigError
from ember_train.data.pairs import PairCollator, PairExample, PairSource
from ember_train.data.reader import DataError
from ember_train.data.sampler import ShardedBatchSampler
from ember_train.pipelines import contrastive, load_config

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "data/quickstart/train.jsonl"


def _sampler(sizes, batch=4, **kw) -> ShardedBatchSampler:
    ids = [d for d, n in enumerate(sizes) for _ in range(n)]
    return ShardedBatchSampler(len(ids), batch, dataset_ids=ids, **kw)


def _datasets_of(sampler, batch):
    return {sampler.dataset_of[i] for i in batch}


# ---------------------------------------------------------------------------------------------
# Sampler


def test_one_dataset_per_batch_and_every_example_once():
    sampler = _sampler([30, 50, 7], batch=4, seed=1)
    batches = list(sampler)
    assert all(len(_datasets_of(sampler, b)) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(87))
    # The datasets' batches are interleaved, not one dataset after the other.
    firsts = [min(_datasets_of(sampler, b)) for b in batches]
    assert firsts != sorted(firsts)


def test_mixed_batches_shuffle_datasets_together():
    sampler = _sampler([40, 40], batch=8, seed=1, same_dataset_batches=False)
    batches = list(sampler)
    assert sum(len(_datasets_of(sampler, b)) == 2 for b in batches) >= len(batches) - 1
    assert sorted(i for b in batches for i in b) == list(range(80))


@pytest.mark.parametrize("same", [True, False])
def test_weighted_sampling_shares_the_epoch_by_weight(same):
    sampler = _sampler(
        [40, 40], batch=4, seed=2, sampling="weighted", weights=[3.0, 1.0], same_dataset_batches=same
    )
    assert sampler.quotas() == [60, 20]
    assert sampler.dataset_counts(0) == [60, 20]
    drawn = Counter(i for b in sampler for i in b)
    assert all(drawn[i] in (1, 2) for i in range(40))  # dataset 0 repeated in a second shuffled pass
    assert sum(1 for i in range(40, 80) if drawn[i]) == 20  # dataset 1 cut to its share
    # Weight 0 leaves a dataset out.
    assert _sampler([10, 10], sampling="weighted", weights=[1.0, 0.0]).dataset_counts(0) == [20, 0]


def test_proportional_sampling_takes_each_dataset_once():
    sampler = _sampler([12, 36], batch=4, seed=0, weights=[5.0, 1.0])  # weights: only for `weighted`
    assert sampler.quotas() == [12, 36] and sampler.dataset_counts(0) == [12, 36]


def test_round_robin_takes_turns_with_equal_shares():
    sampler = _sampler([16, 100, 40], batch=4, seed=3, sampling="round_robin")
    batches = list(sampler)
    assert sampler.dataset_counts(0) == [16, 16, 16]
    assert [min(_datasets_of(sampler, b)) for b in batches] == [0, 1, 2] * 4


def test_mixture_order_depends_on_seed_and_epoch_only_and_resume_skips():
    a, b = _sampler([21, 33], seed=4), _sampler([21, 33], seed=4)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    full = list(b)
    resumed = _sampler([21, 33], seed=4)
    resumed.set_epoch(1, start_batch=5)
    assert list(resumed) == full[5:]


@pytest.mark.parametrize("same", [True, False])
def test_two_ranks_get_disjoint_equal_shards_of_the_same_global_batch(same):
    kw = {"seed": 5, "same_dataset_batches": same}
    ranks = [list(_sampler([26, 40], batch=3, world_size=2, rank=r, **kw)) for r in range(2)]
    one_process = list(_sampler([26, 40], batch=6, **kw))  # the global batches
    assert len(ranks[0]) == len(ranks[1]) == len(one_process)
    for shard0, shard1, global_batch in zip(*ranks, one_process, strict=True):
        assert not set(shard0) & set(shard1)
        assert shard0 + shard1 == global_batch
        # Equal halves of a full batch; a dataset's last, smaller one as even as it splits.
        assert len(shard0) == len(shard1) if len(global_batch) == 6 else abs(len(shard0) - len(shard1)) <= 1
    assert sum(len(b) == 6 for b in one_process) >= len(one_process) - 2


def test_no_text_twice_in_a_global_batch_across_datasets():
    # The same queries in both datasets: in mixed batches a text never meets its copy.
    keys = [(f"q{i % 20}",) for i in range(40)]
    sampler = ShardedBatchSampler(
        40,
        4,
        world_size=2,
        seed=0,
        dedup_keys=keys,
        dataset_ids=[0] * 20 + [1] * 20,
        same_dataset_batches=False,
    )
    for batch in sampler._global_batches():
        texts = [keys[i][0] for i in batch]
        assert len(texts) == len(set(texts))
    assert sorted(i for b in sampler._global_batches() for i in b) == list(range(40))


def test_bad_sampler_settings_are_errors():
    with pytest.raises(ValueError, match="sampling must be one of"):
        _sampler([4, 4], sampling="random")
    with pytest.raises(ValueError, match="weights must be"):
        _sampler([4, 4], sampling="weighted", weights=[1.0, -1.0])


# ---------------------------------------------------------------------------------------------
# Collator: per-dataset prefixes and negatives


def _texts(encoder, slices) -> list[str]:
    rows = [row for s in slices for row in s["input_ids"]]
    return sorted(encoder.tokenizer.decode(row, skip_special_tokens=True) for row in rows)


def test_collator_applies_each_datasets_prefixes_over_the_models(tiny_bert_path):
    from ember_train.models import Encoder

    encoder = Encoder.from_pretrained(
        str(tiny_bert_path), query_prefix="model query ", document_prefix="model doc "
    )
    sources = [
        PairSource("a", query_prefix="alpha ", document_prefix="beta "),
        PairSource("b"),  # the model's prefixes
        PairSource("c", query_prefix=""),  # no query prefix; the model's document prefix
    ]
    examples = [
        PairExample("first question", "first answer", dataset=0),
        PairExample("second question", "second answer", dataset=1),
        PairExample("third question", "third answer", dataset=2),
    ]
    batch = PairCollator(encoder, sources=sources)(examples)
    assert _texts(encoder, batch["query"]) == sorted(
        ["alpha first question", "model query second question", "third question"]
    )
    assert _texts(encoder, batch["documents"]) == sorted(
        ["beta first answer", "model doc second answer", "model doc third answer"]
    )
    # Without sources: the model's prefixes, as before.
    plain = PairCollator(encoder)(examples)
    assert _texts(encoder, plain["query"]) == sorted(f"model query {e.query}" for e in examples)


def test_collator_takes_hard_negatives_per_dataset(tiny_bert_path):
    from ember_train.models import Encoder

    encoder = Encoder.from_pretrained(str(tiny_bert_path))
    sources = [PairSource("a", num_negatives=2, document_prefix="neg "), PairSource("b", num_negatives=0)]
    a = [PairExample(f"query {i}", f"answer {i}", [f"wrong {i}"], dataset=0) for i in range(3)]
    b = [PairExample(f"other {i}", f"reply {i}", dataset=1) for i in range(3)]
    collate = PairCollator(encoder, num_negatives=0, sources=sources)
    assert len(collate(a)["document_order"]) == 3 * 3  # positives + 2 negatives each
    assert "neg wrong 0" in _texts(encoder, collate(a)["documents"])
    assert len(collate(b)["document_order"]) == 3
    with pytest.raises(ValueError, match="different num_negatives"):
        collate(a + b)


# ---------------------------------------------------------------------------------------------
# Config


def _write(tmp_path: Path, data: str, extra: str = "") -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: /nonexistent/model}}\n"
        f"data:\n{data}\n{extra}"
    )
    return path


def test_a_plain_string_is_one_dataset(tmp_path):
    cfg = load_config(str(_write(tmp_path, f"  train: {QUICKSTART}")))
    assert cfg.data.train == str(QUICKSTART)
    (dataset,) = cfg.data.datasets()
    assert dataset.path == str(QUICKSTART) and dataset.name == "train"


def test_a_list_of_datasets_is_parsed_with_defaults(tmp_path):
    cfg = load_config(
        str(
            _write(
                tmp_path,
                "  train:\n"
                "    - {path: a.jsonl, weight: 2, query_prefix: 'query: ', num_negatives: 1, name: first}\n"
                "    - {path: data/b.jsonl, columns: {query: question}}\n"
                "  sampling: weighted",
            )
        )
    )
    a, b = cfg.data.datasets()
    assert (a.name, a.weight, a.query_prefix, a.num_negatives) == ("first", 2.0, "query: ", 1)
    assert (b.name, b.weight, b.num_negatives, b.columns.query) == ("b", 1.0, None, "question")
    assert [s.num_negatives for s in contrastive.pair_sources(cfg)] == [1, 0]  # b: loss.num_negatives


@pytest.mark.parametrize(
    "data,extra,message",
    [
        ("  train: [{path: a.jsonl, colour: red}]", "", r"unknown key 'data\.train\[0\]\.colour'"),
        (
            "  train: [{path: a.jsonl}, {path: b.jsonl, weight: -1}]",
            "",
            r"data\.train\[1\]: weight must be >= 0",
        ),
        ("  train: [{path: a.jsonl}]\n  sampling: random", "", r"data\.sampling: 'random' is not one of"),
        ("  train: [{weight: 2}]", "", r"missing required key 'data\.train\[0\]\.path'"),
        ("  train: [{path: x/a.jsonl}, {path: y/a.jsonl}]", "", r"two datasets are named 'a'"),
        ("  train: []", "", r"list of datasets is empty"),
        (
            "  train: [{path: a.jsonl, num_negatives: 1}, {path: b.jsonl}]\n  same_dataset_batches: false",
            "",
            r"data\.same_dataset_batches: false .* one num_negatives",
        ),
    ],
)
def test_bad_mixture_values_name_the_key(tmp_path, data, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(_write(tmp_path, data, extra)))


def test_a_missing_file_is_named_before_the_model_is_loaded(tmp_path, fresh_accelerate_state):
    path = _write(tmp_path, f"  train: [{{path: {QUICKSTART}}}, {{path: {tmp_path / 'missing.jsonl'}}}]")
    # The model path does not exist either: the data error must come first.
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        contrastive.run(load_config(str(path)))


# ---------------------------------------------------------------------------------------------
# Runs


def _section_pairs(tmp_path: Path, n: int = 40, negatives: bool = False) -> Path:
    """A second task on rows 100+ of the quickstart (no text shared with its first rows): a synopsis
    -> the next row's description, optionally with a negative."""
    rows = [json.loads(line) for line in QUICKSTART.read_text().splitlines()[100 : 100 + n + 1]]
    path = tmp_path / "second.jsonl"
    out = []
    for i in range(n):
        row = {"query": rows[i]["query"], "pos": rows[i + 1]["pos"]}
        if negatives:
            row["neg"] = [rows[(i + 7) % n]["pos"]]
        out.append(json.dumps(row))
    path.write_text("\n".join(out) + "\n")
    return path


def _mixture_config(tmp_path: Path, model: Path, name: str, second: Path, *overrides: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / name}\nseed: 5\n"
        f"model: {{name_or_path: {model}, max_seq_length: 24}}\n"
        "data:\n"
        f"  train:\n    - {{path: {QUICKSTART}, name: debian}}\n"
        f"    - {{path: {second}, name: second, query_prefix: 'same kind: ', document_prefix: 'same kind: '}}\n"
        "  max_examples: 36\n"
        "train: {batch_size: 6, max_steps: 8, learning_rate: 1.0e-3, log_every: 1, checkpoint_every: 3, "
        "keep_checkpoints: 5}\n"
    )
    return load_config(str(path), list(overrides))


def test_two_dataset_run_counts_examples_per_dataset(
    tmp_path, tiny_bert_path, fresh_accelerate_state, capsys
):
    second = _section_pairs(tmp_path)
    results = contrastive.run(_mixture_config(tmp_path, tiny_bert_path, "run", second, "train.max_steps=0"))
    # 1 epoch of 36 + 36 examples in batches of 6: 12 steps, each dataset seen once.
    assert results["steps"] == 12
    assert results["datasets"] == {
        "debian": {"examples": 36, "skipped_rows": 0, "examples_per_epoch": 36, "trained_examples": 36},
        "second": {"examples": 36, "skipped_rows": 0, "examples_per_epoch": 36, "trained_examples": 36},
    }
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["datasets"] == results["datasets"]
    out = capsys.readouterr().out
    assert (
        "debian: 36 examples in 6 batches" in out
        and "trained examples per dataset: debian 36, second 36" in out
    )


def test_resume_mid_epoch_across_datasets_matches_the_uninterrupted_run(
    tmp_path, tiny_bert_path, fresh_accelerate_state, monkeypatch
):
    second = _section_pairs(tmp_path)
    full = contrastive.run(_mixture_config(tmp_path, tiny_bert_path, "full", second))

    real = contrastive.make_loss_step
    crash_contrastive_run_at_call(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        contrastive.run(_mixture_config(tmp_path, tiny_bert_path, "crashed", second))
    monkeypatch.setattr(contrastive, "make_loss_step", real)
    resumed = contrastive.run(
        _mixture_config(tmp_path, tiny_bert_path, "crashed", second, "train.resume=auto")
    )

    assert resumed["steps"] == full["steps"] == 8
    assert resumed["datasets"] == full["datasets"]
    assert sum(d["trained_examples"] for d in full["datasets"].values()) == 8 * 6
    a, b = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("full", "crashed"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_two_processes_train_a_mixture_with_gathered_negatives(tmp_path, tiny_bert_path):
    from tests.conftest import two_process_launch

    second = _section_pairs(tmp_path, n=24, negatives=True)
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\nseed: 1\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 24}}\n"
        "data:\n"
        f"  train:\n    - {{path: {QUICKSTART}, name: debian}}\n"
        f"    - {{path: {second}, name: second, num_negatives: 1, query_prefix: 'kind: '}}\n"
        "  max_examples: 24\n  sampling: round_robin\n"
        "loss: {gather_across_devices: true, symmetric: true}\n"
        "train: {batch_size: 3, epochs: 2, log_every: 1}\n"
    )
    cmd, env = two_process_launch(REPO / "train.py", "--config", cfg)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # 24 + 24 examples, global batches of 6 taking turns: 8 steps per epoch, 2 epochs; a batch
    # from `second` carries one gathered hard negative per query, one from `debian` none.
    assert results["steps"] == 16, done.stdout[-2000:]
    assert {k: v["trained_examples"] for k, v in results["datasets"].items()} == {"debian": 48, "second": 48}
    assert os.path.isfile(tmp_path / "run" / "final" / "model.safetensors")
