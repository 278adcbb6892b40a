"""SetFit pair batches: both sides sorted by length into two slices, loss in pair order, gradient cache."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from ember_train.data.batching import BatchLayout, tokenize_slices
from ember_train.data.setfit_pairs import TargetPairCollator
from ember_train.losses.cosine import CosineMSELoss
from ember_train.models import Encoder
from ember_train.models.heads import LinearHead
from ember_train.models.setfit import SetFitStyleModel
from ember_train.pipelines.setfit import make_pair_loss_step
from ember_train.training.grad_cache import StepContext

SHORT = ["refund", "card lost", "atm fee", "pin"]
LONG = [
    "I was charged twice for the same purchase at the supermarket yesterday and want it back",
    "my card arrived but the app still says it is being delivered, what should I do now",
    "why is there an extra fee on my statement after I took cash out abroad last week",
    "I cannot remember the pin for my new card and the app does not show it anywhere",
]


def _model(tiny_bert_path) -> SetFitStyleModel:
    # float64: the loss tests are about equal formulas, not float32 summation order (AVX2 / AVX-512 / CUDA).
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32).double()
    return SetFitStyleModel(encoder, LinearHead(encoder.dim, ["a", "b"]).double())


def test_slices_are_sorted_by_length_and_pad_less_than_one_slice_per_side(tiny_bert_path):
    encoder = _model(tiny_bert_path).body
    texts = [SHORT[0], LONG[0], SHORT[1], LONG[1], SHORT[2], LONG[2], SHORT[3], LONG[3]]
    chunks, order = tokenize_slices(encoder, texts, num_slices=2)
    lengths = encoder.token_lengths(texts)
    assert sorted(order.tolist()) == list(range(8))
    assert [lengths[i] for i in order] == sorted(lengths)
    # Each slice holds the texts in `order`, padded to its own longest.
    rows = torch.cat([c["attention_mask"].sum(1) for c in chunks]).tolist()
    assert rows == [lengths[i] for i in order]
    sizes = [c["input_ids"].shape[0] for c in chunks]
    assert len(sizes) == 2
    assert [c["input_ids"].shape[1] for c in chunks] == [max(rows[: sizes[0]]), max(rows[sizes[0] :])]

    padded_sorted = sum(c["input_ids"].numel() for c in chunks)
    side_a, side_b = encoder.tokenize(texts[0::2]), encoder.tokenize(texts[1::2])
    assert padded_sorted <= side_a["input_ids"].numel() + side_b["input_ids"].numel()
    # Pairs of one short and one long text: one slice per side pads every short text to the longest.
    mixed = encoder.tokenize(texts[:4]), encoder.tokenize(texts[4:])
    assert padded_sorted < sum(m["input_ids"].numel() for m in mixed)


@pytest.mark.parametrize(("pack", "slices"), [(False, 2), (False, 1), (True, 2)])
def test_pair_loss_is_computed_in_pair_order(tiny_bert_path, pack, slices):
    """The loss on sorted slices (or one packed row) equals the loss on each side embedded separately."""
    model = _model(tiny_bert_path).eval()  # no dropout
    items = [
        {"text1": s, "text2": t, "label": float(i % 2)}
        for i, (s, t) in enumerate(zip(SHORT, LONG, strict=True))
    ]
    batch = TargetPairCollator(model.body, BatchLayout(pack=pack, padded_slices=slices))(items)
    assert len(batch["slices"]) == (1 if pack else slices)
    loss_fn = CosineMSELoss()
    loss, metrics = make_pair_loss_step(loss_fn)(model, batch)
    with torch.no_grad():
        a = model(model.body.tokenize(SHORT))
        b = model(model.body.tokenize(LONG))
    expected = loss_fn(a, b, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-15)
    assert metrics["samples"] == 4
    assert metrics["tokens"] == sum(model.body.token_lengths(SHORT + LONG))
    assert (metrics["padding_tokens"] == 0) == pack


@pytest.mark.parametrize("pack", [False, True])
def test_pair_gradient_cache_equals_plain_gradients(tiny_bert_path, pack):
    model = _model(tiny_bert_path).eval()
    items = [{"text1": s, "text2": t, "label": 1.0} for s, t in zip(SHORT, LONG, strict=True)]
    items += [{"text1": s, "text2": t, "label": 0.0} for s, t in zip(SHORT, reversed(LONG), strict=True)]
    batch = TargetPairCollator(model.body, BatchLayout(pack=pack))(items)
    loss_fn = CosineMSELoss()

    plain_loss, _ = make_pair_loss_step(loss_fn)(model, batch)
    plain_loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    ctx = StepContext(
        backward=lambda t: t.backward(), no_sync=nullcontext, sync=True, may_backward=lambda t: True
    )
    cached_loss, _ = make_pair_loss_step(loss_fn, grad_cache_chunk_size=3)(model, batch, ctx)
    torch.testing.assert_close(cached_loss, plain_loss.detach(), rtol=1e-12, atol=1e-15)
    cached = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert cached.keys() == plain.keys() and len(plain) > 10
    for name, grad in plain.items():
        torch.testing.assert_close(cached[name], grad, rtol=1e-9, atol=1e-12, msg=name)
