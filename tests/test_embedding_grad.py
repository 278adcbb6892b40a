"""The persistent word-embedding gradient (CPU): the same gradients and runs, without a fresh dense tensor."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_close_at_scale, run_tiny_contrastive, two_process_launch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from ember_train.data.batching import tokenize_packed
from ember_train.models import Encoder
from ember_train.speedups import embedding_grad
from ember_train.speedups.embedding_grad import EmbeddingGradBuffer

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["a short one", "a somewhat longer text about debian packages and tools", "x"]


class DenseEmbeddingGrads(TorchDispatchMode):
    """The shapes of the dense embedding gradients built (position and type embeddings have some too)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name() == "aten::embedding_dense_backward":
            self.shapes.append(tuple(out.shape))
        return out


def _backward_twice(
    encoder: Encoder, features: list[dict], buffer: EmbeddingGradBuffer | None
) -> list[tuple[int, ...]]:
    """Two backward passes into one step's gradient (accumulation); the dense embedding gradients built."""
    encoder.zero_grad(set_to_none=True)
    if buffer is not None:
        buffer.attach()
    dense = DenseEmbeddingGrads()
    for f in features:
        loss = encoder(f).pow(2).sum()
        with dense:
            loss.backward()
    return dense.shapes


@pytest.mark.parametrize("packed", [False, True])
def test_buffer_gives_the_dense_gradient_without_a_dense_embedding_backward(tiny_bert_path, packed):
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=16).eval()  # no dropout
    tokenize = (lambda t: tokenize_packed(encoder, t)[0]) if packed else encoder.tokenize
    features = [tokenize(TEXTS), tokenize(TEXTS[::-1] + ["one more"])]
    if not packed:  # the padded side has padding tokens, whose row must get no gradient
        assert (features[0]["attention_mask"] == 0).any()
    weight = encoder.backbone.get_input_embeddings().weight

    word = tuple(weight.shape)
    assert _backward_twice(encoder, features, None).count(word) == 2  # one fresh [vocab, dim] per pass
    reference = weight.grad.clone()

    buffer = EmbeddingGradBuffer.for_model(encoder)
    assert buffer is not None
    for _ in range(2):  # a second step starts from zero again
        shapes = _backward_twice(encoder, features, buffer)
        assert weight.grad is buffer.buffer and weight.grad.layout == torch.strided
        assert word not in shapes
        assert_close_at_scale(weight.grad, reference, rel=1e-6)  # sparse vs dense: another order of sums
    assert reference.abs().sum() > 0

    buffer.release()
    assert not encoder.backbone.get_input_embeddings().sparse
    assert weight.grad is None or weight.grad is not buffer.buffer


def test_no_buffer_for_frozen_or_unknown_embeddings(tiny_bert_path, monkeypatch):
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=16)
    encoder.backbone.get_input_embeddings().weight.requires_grad_(False)
    assert EmbeddingGradBuffer.for_model(encoder) is None

    def not_implemented():
        raise NotImplementedError

    monkeypatch.setattr(encoder.backbone, "get_input_embeddings", not_implemented)
    assert EmbeddingGradBuffer.for_model(encoder) is None
    assert EmbeddingGradBuffer.for_model(torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize("pack", ["true", "false"])
def test_training_with_the_buffer_matches_training_without(tmp_path, tiny_bert_path, monkeypatch, pack):
    """Dropout on, gradient accumulation 2: the same losses and weights (up to summation order)."""
    attached = []
    attach = EmbeddingGradBuffer.attach
    monkeypatch.setattr(
        embedding_grad.EmbeddingGradBuffer, "attach", lambda self: attached.append(1) or attach(self)
    )
    accumulate = ("train.batch_size=6", "train.gradient_accumulation_steps=2", f"train.pack_sequences={pack}")
    with_losses, with_buffer = run_tiny_contrastive(tmp_path, tiny_bert_path, "buffer", *accumulate)
    assert len(attached) == 4  # before training, then after each of the 3 optimizer steps
    without_losses, without = run_tiny_contrastive(
        tmp_path, tiny_bert_path, "plain", *accumulate, "train.fast_cpu_embedding_grad=false"
    )
    assert len(attached) == 4
    assert with_losses == pytest.approx(without_losses, rel=1e-5)
    for key in without:
        torch.testing.assert_close(with_buffer[key], without[key], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_process_training_with_the_buffer_matches_training_without(tmp_path, tiny_bert_path):
    """DDP all-reduces the buffer as it would the dense gradient (it is set up after wrapping)."""
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(
        "task: contrastive\n"
        f"model: {{name_or_path: {tiny_bert_path}, max_seq_length: 24}}\n"
        f"data: {{train: {REPO / 'data/quickstart/train.jsonl'}, max_examples: 32}}\n"
        "train: {batch_size: 4, max_steps: 3, gradient_accumulation_steps: 2, learning_rate: 1.0e-3}\n"
    )
    weights = {}
    for flag in ("true", "false"):
        out = tmp_path / flag
        cmd, env = two_process_launch(
            REPO / "train.py", "--config", cfg, f"output_dir={out}", f"train.fast_cpu_embedding_grad={flag}"
        )
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        weights[flag] = load_file(str(out / "final" / "model.safetensors"))
    initial = load_file(str(tiny_bert_path / "model.safetensors"))
    initial_word = next(v for k, v in initial.items() if k.endswith("word_embeddings.weight"))
    word = next(k for k in weights["false"] if k.endswith("word_embeddings.weight"))
    assert not torch.equal(weights["false"][word], initial_word)  # the embeddings did train
    for key in weights["false"]:
        torch.testing.assert_close(weights["true"][key], weights["false"][key], rtol=1e-4, atol=1e-6)
