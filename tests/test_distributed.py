"""Two real processes (gloo, CPU) launched with accelerate: gathered negatives and sharding."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import two_process_launch

from ember_train.losses.infonce import InfoNCELoss
from ember_train.models import Encoder

HERE = os.path.dirname(__file__)


def _launch(script, *args, timeout=600):
    cmd, env = two_process_launch(script, *args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


MATRYOSHKA = ([32, 16, 8], [1.0, 0.5, 2.0])  # the tiny BERT's 32 dims and two prefixes


@pytest.mark.slow
@pytest.mark.parametrize(
    "num_negatives,chunk,matryoshka",
    [(0, 0, False), (2, 0, False), (2, 2, False), (2, 0, True), (2, 2, True)],
)
def test_gathered_loss_and_grads_equal_one_process_with_double_batch(
    tmp_path, tiny_bert_path, num_negatives, chunk, matryoshka
):
    """With ``matryoshka``: loss.matryoshka_dims with gather_across_devices (and the gradient cache)."""
    per_rank = 3
    out = tmp_path / "dist.pt"
    dims, weights = MATRYOSHKA
    extra = [",".join(map(str, dims)), ",".join(map(str, weights))] if matryoshka else []
    _launch(
        os.path.join(HERE, "distributed", "gather_check.py"),
        tiny_bert_path,
        out,
        num_negatives,
        per_rank,
        chunk,
        *extra,
    )
    result = torch.load(out, weights_only=False)

    # Reference: one process, the whole global batch (2 x per_rank).
    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=16).double().eval()  # as the script
    n_total = 2 * per_rank
    queries = [f"query number {i} about topic {i % 5}" for i in range(n_total)]
    positives = [f"document {i} describing topic {i % 5} in words" for i in range(n_total)]
    q = encoder(encoder.tokenize(queries))
    p = encoder(encoder.tokenize(positives))
    n = None
    if num_negatives:
        flat = [f"unrelated text {i} {j}" for i in range(n_total) for j in range(num_negatives)]
        n = encoder(encoder.tokenize(flat)).view(n_total, num_negatives, -1)
    loss_fn = InfoNCELoss(0.05, symmetric=True)
    if matryoshka:  # written out: the weighted sum of InfoNCE on each prefix
        loss = sum(
            w * loss_fn(q[:, :d], p[:, :d], None if n is None else n[..., :d])
            for d, w in zip(dims, weights, strict=True)
        )
    else:
        loss = loss_fn(q, p, n)
    loss.backward()

    # float64 on both sides: only summation order differs (all-reduce vs one matmul).
    _assert_same_loss_and_gradients(result, loss, encoder)

    # Host reads in the gathered loss: one per gather (positives, negatives, queries for the
    # symmetric term), not one per process per gather plus a global count (5-7 before).
    if not chunk:  # each Matryoshka prefix gathers its own slice
        assert result["loss_reads"] == (3 if num_negatives else 2) * (len(dims) if matryoshka else 1)

    sharding = result["sharding"]
    assert sharding[0]["steps"] == sharding[1]["steps"]
    seen = sharding[0]["indices"] + sharding[1]["indices"]
    assert sorted(seen) == list(range(37))


@pytest.mark.slow
def test_two_process_training_with_gradient_checkpointing_gathered_negatives_and_length_grouping(
    tmp_path, tiny_bert_path
):
    repo = os.path.dirname(HERE)
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 24}}\n"
        f"data: {{train: {repo}/data/quickstart/train.jsonl, max_examples: 40, group_by_length: true}}\n"
        "loss: {gather_across_devices: true, symmetric: true}\n"
        "train: {batch_size: 4, epochs: 2, gradient_checkpointing: true, log_every: 1, gradient_accumulation_steps: 2}\n"
    )
    done = _launch(os.path.join(repo, "train.py"), "--config", cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # 40 examples / (4 per process x 2 processes) = 5 batches per epoch -> 3 optimizer steps (2+2+1) x 2 epochs
    assert results["steps"] == 6, done.stdout[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    # One schedule step per optimizer step (accelerate would step it once per process).
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert all(0 <= r["padding_fraction"] < 1 for r in records if "lr" in r)  # length grouping reports it
    assert lrs == pytest.approx([2e-5 * (6 - step) / 6 for step in range(1, 7)], rel=1e-9)


def test_token_lengths_for_grouping_are_computed_in_shards_and_shared(tmp_path, tiny_bert_path):
    out = tmp_path / "lengths.json"
    _launch(os.path.join(HERE, "distributed", "map_sharded_check.py"), tiny_bert_path, out)
    result = json.loads(out.read_text())
    assert result["local_count"] == 19  # rank 0 computed items 0, 2, ..., 36 only
    assert result["sharded"] == result["full"]
    assert len(set(result["full"])) > 5  # the lengths differ, so a wrong order would show


def test_map_sharded_on_one_process_is_a_plain_call():
    from ember_train.training.distributed import map_sharded

    assert map_sharded(lambda xs: [x * 2 for x in xs], range(5)) == [0, 2, 4, 6, 8]


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [0, 2])
def test_distillation_on_two_processes_with_uneven_batches_equals_one_process(
    tmp_path, tiny_bert_path, chunk
):
    """InfoNCE (gathered) + KL: the KL needs no gather, but its mean is over the global batch."""
    import sys

    from ember_train.losses.distill import DistillationLoss

    out = tmp_path / "distill.pt"
    _launch(os.path.join(HERE, "distributed", "distill_check.py"), tiny_bert_path, out, chunk)
    result = torch.load(out, weights_only=False)

    sys.path.insert(0, os.path.join(HERE, "distributed"))
    try:
        from distill_groups import SIZES, group
    finally:
        sys.path.pop(0)
    groups = [group(i) for i in range(sum(SIZES))]

    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=16).double().eval()
    q = encoder(encoder.tokenize([g[0] for g in groups]))
    d = encoder(encoder.tokenize([g[1] for g in groups] + [t for g in groups for t in g[2]]))
    n = d[5:].view(5, 2, -1)
    teacher = torch.tensor([g[3] for g in groups], dtype=torch.float64)
    loss = InfoNCELoss(0.05)(q, d[:5], n) + 0.5 * DistillationLoss(0.1, 0.05)(q, d[:5], n, teacher)
    loss.backward()

    # Each process scales its sum by world / global count, so the processes' mean is the global mean.
    _assert_same_loss_and_gradients(result, loss, encoder)


@pytest.mark.slow
def test_two_process_training_with_distillation_through_the_grad_cache(tmp_path, tiny_bert_path):
    repo = os.path.dirname(HERE)
    lines = Path(repo, "data/quickstart/train.jsonl").read_text().splitlines()[:20]
    rows = [json.loads(line) for line in lines]
    for i, row in enumerate(rows):
        row["neg"] = [rows[(i + 1) % 20]["pos"], rows[(i + 7) % 20]["pos"]]
        row["pos_score"], row["neg_scores"] = 0.8, [0.4 + i / 100, 0.3]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        f"task: contrastive\noutput_dir: {tmp_path / 'run'}\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 24}}\n"
        f"data: {{train: {data}}}\n"
        "loss: {num_negatives: 2, gather_across_devices: true, distill_weight: 1.0}\n"
        "train: {batch_size: 3, epochs: 1, grad_cache_chunk_size: 2, log_every: 1}\n"
    )
    done = _launch(os.path.join(repo, "train.py"), "--config", cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["steps"] == 4, done.stdout[-2000:]  # 20 pairs / (3 per process x 2): 3 full batches + 1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["distill_loss"] > 0 for r in records if "loss" in r)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def _assert_same_loss_and_gradients(result: dict, loss: torch.Tensor, encoder: torch.nn.Module) -> None:
    """The 2-process run's loss and every gradient equal the one-process reference (both float64)."""
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-12)
    compared = 0
    for name, param in encoder.named_parameters():
        if param.grad is None:
            continue
        torch.testing.assert_close(result["grads"][name], param.grad, rtol=1e-9, atol=1e-12)
        compared += 1
    assert compared > 10
