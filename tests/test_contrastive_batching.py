"""Contrastive batches: length-sorted slices per side give the same loss as one padded batch, with less padding."""

import itertools
import random
from contextlib import nullcontext

import pytest
import torch

from ember_train.data.batching import (
    BatchLayout,
    padding_optimal_cuts,
    restore_order,
    token_counts,
    tokenize_slices,
)
from ember_train.data.pairs import PairCollator, PairExample
from ember_train.losses.infonce import InfoNCELoss
from ember_train.models import Encoder
from ember_train.pipelines.contrastive import make_loss_step
from ember_train.training.grad_cache import StepContext

EXAMPLES = [
    PairExample(
        query="q " + "word " * (i % 7),
        positive=f"document {i} " + "text " * (3 * i % 17),
        negatives=[f"negative {i} " + "noise " * (i % 5), f"other {i}"],
    )
    for i in range(10)
]


@pytest.mark.parametrize(("pack", "slices"), [(False, 2), (False, 1), (False, 3), (True, 2)])
@pytest.mark.parametrize("num_negatives", [0, 1])
def test_slices_give_the_loss_and_gradients_of_one_padded_batch(tiny_bert_path, num_negatives, pack, slices):
    """Padded slices per side (``train.padded_slices``), or one packed (padding-free) row per side:
    same loss and gradients."""
    # float64: the test is about equal formulas, not about float32 summation order (AVX2 vs AVX-512 vs CUDA).
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32).double().eval()  # no dropout
    batch = PairCollator(
        encoder, num_negatives=num_negatives, layout=BatchLayout(pack=pack, padded_slices=slices)
    )(EXAMPLES)
    assert len(batch["query"]) == len(batch["documents"]) == (1 if pack else slices)
    loss_fn = InfoNCELoss(0.05)

    loss, metrics = make_loss_step(loss_fn)(encoder, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()

    queries = encoder.tokenize([e.query for e in EXAMPLES], kind="query")
    documents = [e.positive for e in EXAMPLES]
    if num_negatives:
        collator = PairCollator(encoder, num_negatives=1)
        documents += [e.negatives[i] for e in EXAMPLES for i in collator._negative_indices(e, 1)]
    document_features = encoder.tokenize(documents, kind="document")
    q, d = encoder(queries), encoder(document_features)
    negatives = d[len(EXAMPLES) :].view(len(EXAMPLES), num_negatives, -1) if num_negatives else None
    reference = loss_fn(q, d[: len(EXAMPLES)], negatives)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-12, atol=0)
    for name, param in encoder.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-9, atol=1e-12)

    # Same real tokens, less padding than one padded batch per side.
    one_batch = token_counts(queries, document_features)
    assert metrics["tokens"] == one_batch["tokens"]
    if slices == 1 and not pack:
        assert metrics["padding_tokens"] == one_batch["padding_tokens"]
    else:
        assert metrics["padding_tokens"] < one_batch["padding_tokens"]
    assert (metrics["padding_tokens"] == 0) == pack
    assert metrics["samples"] == len(EXAMPLES)


def _padded(lengths: list[int], ends: list[int]) -> int:
    return sum((end - start) * lengths[end - 1] for start, end in zip([0, *ends], ends, strict=False))


def test_slices_are_cut_where_padding_is_least():
    """Against every way of cutting, on random sorted lengths; always min(k, n) non-empty slices."""
    rng = random.Random(0)
    for _ in range(300):
        n, k = rng.randint(1, 12), rng.randint(1, 4)
        lengths = sorted(rng.randint(1, 6) for _ in range(n))
        ends = padding_optimal_cuts(lengths, k)
        assert len(ends) == min(k, n) and ends[-1] == n
        assert all(a < b for a, b in zip([0, *ends], ends, strict=False))
        best = min(_padded(lengths, [*cut, n]) for cut in itertools.combinations(range(1, n), min(k, n) - 1))
        assert _padded(lengths, ends) == best
    # With the gradient cache's chunk size c, cuts fall on multiples of c (equal cuts when there
    # are none), so every process runs ceil(n / c) chunks whatever the lengths.
    for _ in range(300):
        n, c = rng.randint(1, 40), rng.randint(2, 8)
        lengths = sorted(rng.randint(1, 30) for _ in range(n))
        ends = padding_optimal_cuts(lengths, 2, multiple_of=c)
        sizes = [b - a for a, b in zip([0, *ends], ends, strict=False)]
        chunks = sum(-(-size // c) for size in sizes)
        assert chunks == (-(-n // c) if n > c else min(2, n))
        if n > c:
            assert ends[0] % c == 0
            options = [[m, n] for m in range(c, n, c)]
            assert _padded(lengths, ends) == min(_padded(lengths, cut) for cut in options)
    # A few long texts get a slice of their own instead of padding half the batch.
    lengths = [8] * 30 + [120, 128]
    assert padding_optimal_cuts(lengths, 2) == [30, 32]
    assert _padded(lengths, [30, 32]) < _padded(lengths, [16, 32])


def test_restore_order_undoes_the_length_sort(tiny_bert_path):
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32)
    texts = [e.positive for e in EXAMPLES]
    slices, order = tokenize_slices(encoder, texts, num_slices=3)
    rows = restore_order([s["attention_mask"].sum(dim=1, keepdim=True) for s in slices], order)
    assert rows.squeeze(1).tolist() == encoder.tokenize(texts)["attention_mask"].sum(dim=1).tolist()


@pytest.mark.parametrize("pack", [False, True])
def test_grad_cache_step_over_slices_matches_the_plain_step(tiny_bert_path, pack):
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32).double().eval()  # float64: see above
    batch = PairCollator(encoder, num_negatives=1, layout=BatchLayout(pack=pack))(EXAMPLES)
    loss_fn = InfoNCELoss(0.05)
    loss, _ = make_loss_step(loss_fn)(encoder, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}
    encoder.zero_grad()
    ctx = StepContext(
        backward=lambda t: t.backward(),
        no_sync=nullcontext,
        sync=True,
        may_backward=lambda t: True,
    )
    cached, _ = make_loss_step(loss_fn, grad_cache_chunk_size=3)(encoder, batch, ctx)
    torch.testing.assert_close(cached, loss.detach(), rtol=1e-12, atol=0)
    for name, param in encoder.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-9, atol=1e-12)


def test_padded_slices_setting_reaches_the_batches(tiny_bert_path):
    """``train.padded_slices`` from the config (with a command-line style override) to the collator."""
    from ember_train.config.parse import apply_overrides, from_dict
    from ember_train.pipelines.contrastive import ContrastiveConfig, make_dataloader

    data = {"model": {"name_or_path": str(tiny_bert_path)}, "data": {"train": "unused.jsonl"}}
    data = apply_overrides(data, ["train.batch_size=8", "train.padded_slices=3"])
    cfg = from_dict(ContrastiveConfig, data)
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32)
    batch = next(iter(make_dataloader(EXAMPLES, encoder, cfg, world_size=1, rank=0, pack=False)))
    assert len(batch["query"]) == len(batch["documents"]) == 3
    with pytest.raises(ValueError, match="padded_slices must be >= 1"):
        from_dict(ContrastiveConfig, apply_overrides(data, ["train.padded_slices=0"]))
