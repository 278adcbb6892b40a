"""Device values read on the host per training step: one per optimizer step in the loop, none in
ember-train's own loss steps.

On a GPU each read (``.item()``, ``float(t)``, ``if t:``, ``.tolist()``, boolean-mask indexing)
makes the host wait for the GPU. A CPU run makes the same calls, so :class:`HostReadCounter`
counts them here. (Reads inside transformers, e.g. its attention-mask check, are not ours and are
not asserted on.)
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from reliability.tiny_loop import run_tiny

import ember_train
from ember_train.data.batching import BatchLayout
from ember_train.data.masking import RetroMAECollator
from ember_train.data.pairs import PairCollator, PairExample
from ember_train.data.setfit_pairs import TargetPairCollator
from ember_train.losses.cosine import CosineMSELoss
from ember_train.losses.infonce import InfoNCELoss
from ember_train.losses.retromae import RetroMAELoss
from ember_train.models import Encoder
from ember_train.models.heads import LinearHead
from ember_train.models.retromae import RetroMAEModel
from ember_train.models.setfit import SetFitStyleModel
from ember_train.pipelines import contrastive, retromae, setfit
from ember_train.training.grad_cache import StepContext
from ember_train.training.host_reads import HostReadCounter
from ember_train.training.loop import batch_to_device

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PACKAGE = Path(ember_train.__file__).parent
EXAMPLES = [
    PairExample(query=f"query {i} " + "word " * (i % 4), positive=f"document {i} " + "text " * (3 * i % 11))
    for i in range(6)
]


def test_counter_sees_the_reads_a_gpu_waits_for():
    t = torch.randn(4, 3)
    with HostReadCounter() as reads:
        t.sum().item()
        float(t.max())
        bool(t.sum() > 0)
        t.tolist()
        t[t > 0]  # boolean-mask indexing: the result's size comes from the values
        t[torch.tensor([0, 2])]  # integer indexing: no read
        t * 2
    assert reads.total == 5
    assert reads.under(Path(__file__).parent) == 5 and reads.under(PACKAGE) == 0


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_loop_reads_the_device_once_per_optimizer_step(tmp_path, accumulation):
    """Loss, finiteness, gradient norm and metrics come back in one transfer at the step's end.

    (Before: a finiteness check and ``loss.item()`` per micro-batch, and the gradient norm: 3
    reads per step without accumulation, 5 with 2 micro-batches.)
    """
    steps = 6
    with HostReadCounter() as reads:
        result = run_tiny(tmp_path / "run", max_steps=steps, gradient_accumulation_steps=accumulation)
    assert result["step"] == steps
    epochs = -(-steps * accumulation // 6)  # the tiny loader has 6 batches
    # Plus one per epoch: the DataLoader's iterator draws its base seed from torch's CPU
    # generator (a host value, not a device read, but the counter cannot tell on a CPU).
    assert sum(n for (file, _, _), n in reads.reads.items() if file.endswith("loop.py")) == steps + epochs, (
        reads.by_line
    )


def _ember_reads(step, *args) -> int:
    with HostReadCounter() as reads:
        loss, _ = step(*args)
        if loss.requires_grad:
            loss.backward()
    return reads.under(PACKAGE)


@pytest.mark.parametrize("cached", [False, True])
def test_contrastive_loss_step_reads_nothing_itself(tiny_bert_path, cached):
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32).train()
    batch = PairCollator(encoder)(EXAMPLES)  # padded slices: the GPU default
    loss_step = contrastive.make_loss_step(InfoNCELoss(), grad_cache_chunk_size=2 if cached else 0)
    args = (encoder, batch)
    if cached:
        ctx = StepContext(
            backward=lambda t: t.backward(), no_sync=nullcontext, sync=True, may_backward=lambda t: True
        )
        args = (*args, ctx)
    assert _ember_reads(loss_step, *args) == 0


def test_setfit_pair_loss_step_reads_nothing_itself(tiny_bert_path):
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32)
    model = SetFitStyleModel(encoder, LinearHead(encoder.dim, ["a", "b"])).train()
    items = [{"text1": e.query, "text2": e.positive, "label": float(i % 2)} for i, e in enumerate(EXAMPLES)]
    batch = TargetPairCollator(encoder)(items)
    assert _ember_reads(setfit.make_pair_loss_step(CosineMSELoss()), model, batch) == 0


def test_retromae_loss_step_reads_nothing_itself(tiny_bert_path):
    model = RetroMAEModel.from_pretrained(tiny_bert_path, max_seq_length=32).train()
    batch = RetroMAECollator(model.tokenizer, max_seq_length=32)([e.positive for e in EXAMPLES])
    assert _ember_reads(retromae.make_loss_step(RetroMAELoss()), model, batch) == 0


# PyTorch's meta device has shapes but no values: any read of a value on it raises. A step run
# there (model and batch moved as the training loop moves them) reads no device value at all.
@pytest.mark.parametrize("cached", [False, True])
def test_packed_contrastive_step_runs_on_a_device_without_values(tiny_bert_path, cached):
    """Packed batches: even transformers reads nothing (no attention mask), and the packing
    layout is built from metadata the loop leaves on the host (before, it read 7 values per side)."""
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32)
    batch = batch_to_device(PairCollator(encoder, layout=BatchLayout(pack=True))(EXAMPLES), "meta")
    assert batch["query"][0]["input_ids"].is_meta and not batch["query"][0]["sequence_lengths"].is_meta
    encoder = encoder.train().to("meta")
    loss_step = contrastive.make_loss_step(InfoNCELoss(), grad_cache_chunk_size=2 if cached else 0)
    if cached:
        ctx = StepContext(
            backward=lambda t: t.backward(), no_sync=nullcontext, sync=True, may_backward=lambda t: True
        )
        loss, _ = loss_step(encoder, batch, ctx)
    else:
        loss, _ = loss_step(encoder, batch)
        loss.backward()
    assert loss.is_meta
    assert all(p.grad is not None and p.grad.is_meta for p in encoder.parameters() if p.requires_grad)


def test_packed_setfit_pair_step_runs_on_a_device_without_values(tiny_bert_path):
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=32)
    items = [{"text1": e.query, "text2": e.positive, "label": float(i % 2)} for i, e in enumerate(EXAMPLES)]
    batch = batch_to_device(TargetPairCollator(encoder, BatchLayout(pack=True))(items), "meta")
    model = SetFitStyleModel(encoder, LinearHead(encoder.dim, ["a", "b"])).train().to("meta")
    loss, _ = setfit.make_pair_loss_step(CosineMSELoss())(model, batch)
    loss.backward()
    assert loss.is_meta
