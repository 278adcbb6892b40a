"""CPU dropout with masks hashed from a seed: the same dropout, in distribution and in the model,
with or without its C kernel."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from conftest import assert_close_at_scale
from reliability.tiny_loop import TinyModel, make_loader, make_loss_step
from torch import nn
from transformers import AutoModel, BertConfig, BertModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ember_train.config import TrainConfig
from ember_train.models.attention import ATTENTION_IMPLEMENTATION, ember_attention
from ember_train.models.encoder import enable_activation_checkpointing
from ember_train.speedups import dropout_kernel
from ember_train.speedups.dropout import (
    FastCPUDropout,
    fast_dropout,
    keep_mask,
    keep_probability,
    numpy_keep_mask,
    use_fast_cpu_dropout,
)
from ember_train.training.loop import build_accelerator, train_loop


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_has_the_keep_probability_in_every_lane_and_independent_neighbours(p):
    torch.manual_seed(0)
    shape = (1001, 999)  # not a multiple of 16 elements: the last block is partly used
    mask = keep_mask(shape, p)
    assert mask.shape == shape and mask.dtype == torch.bool
    flat = mask.flatten().double()
    q = keep_probability(p)
    assert abs(q - (1 - p)) <= 0.5 / 65536
    for part in (flat, *(flat[i::16] for i in range(16))):  # 16 lanes: 8 hashes, two halves each
        sigma = (q * (1 - q) / part.numel()) ** 0.5
        assert abs(part.mean().item() - q) < 5 * sigma
    blocks = flat[: flat.numel() // 16 * 16].view(-1, 16)
    pairs = {
        "neighbours": (flat[:-1], flat[1:]),
        "the two halves of one hash": (blocks[:, :8], blocks[:, 8:]),
        "the same lane in consecutive blocks": (blocks[:-1], blocks[1:]),
    }
    for name, (a, b) in pairs.items():
        both = (a * b).mean().item()
        assert abs(both - q * q) < 5 * (q * q * (1 - q * q) / a.numel()) ** 0.5, name


def _compiler_available() -> bool:
    return shutil.which(os.environ.get("CC") or "cc") is not None


@pytest.mark.skipif(not _compiler_available(), reason="no C compiler")
def test_the_c_kernel_and_numpy_make_the_same_masks():
    lib = dropout_kernel.load()
    assert lib is not None
    for numel in (1, 15, 16, 17, 1000, 2**16 + 3):
        for seed in (0, 123456789012345, 2**63 - 2):
            for threshold in (1, 58982, 65535):
                expected = numpy_keep_mask(numel, seed, threshold)
                got = torch.empty(numel, dtype=torch.bool)
                lib.ember_keep_mask(got.data_ptr(), numel, seed, threshold)
                assert np.array_equal(got.numpy(), expected), (numel, seed, threshold)
                x = torch.randn(numel)
                out = torch.empty(numel)
                lib.ember_dropout_f32(x.data_ptr(), out.data_ptr(), numel, seed, threshold, 1.25)
                assert torch.equal(out, torch.where(torch.from_numpy(expected), x * 1.25, 0.0))


@pytest.mark.skipif(not _compiler_available(), reason="no C compiler")
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "bfloat16"])
def test_fast_dropout_is_the_same_with_and_without_the_kernel(monkeypatch, layout):
    """The kernel (float32) and the boolean-mask path (no compiler, other dtypes) are one dropout."""
    assert dropout_kernel.load() is not None
    base = torch.randn(70, 300)
    base[3, :50] = float("nan")  # dropped or kept, NaN and inf stay NaN (PyTorch's dropout multiplies)
    base[5, :50] = float("inf")
    x = {"contiguous": base, "transposed": base.t(), "bfloat16": base.bfloat16()}[layout]
    results = []
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(dropout_kernel, "load", lambda: None)
        leaf = x.clone().requires_grad_(True)
        torch.manual_seed(4)
        out = fast_dropout(leaf, 0.3)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view(out.shape))
        results.append((out.detach(), leaf.grad))
    for kernel_result, mask_result in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(kernel_result, mask_result, rtol=0, atol=0, equal_nan=True)
    out = results[0][0]
    assert 0 < (out == 0).sum() < x.numel()
    dropped_inf, kept_inf = x.isinf() & out.isnan(), x.isinf() & out.isinf()
    assert dropped_inf.any() and kept_inf.any() and torch.equal(dropped_inf | kept_inf, x.isinf())
    assert torch.equal(out.isnan(), x.isnan() | dropped_inf)


def test_a_compiler_that_fails_gives_a_warning_and_the_numpy_masks(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_TRAIN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    dropout_kernel.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build its CPU dropout kernel"):
            assert dropout_kernel.load() is None
        x = torch.randn(40, 50, requires_grad=True)
        torch.manual_seed(2)
        out = fast_dropout(x, 0.2)
        torch.manual_seed(2)
        assert torch.equal(out, torch.where(keep_mask(x.shape, 0.2), x / keep_probability(0.2), 0.0))
        assert list(tmp_path.iterdir()) == []  # no half-built library left behind
    finally:
        dropout_kernel.load.cache_clear()


@pytest.mark.skipif(not _compiler_available(), reason="no C compiler")
def test_processes_building_the_kernel_at_once_all_load_it(tmp_path):
    """Each build goes to a temporary file renamed into place: no process loads half a library."""
    script = (
        "from ember_train.speedups import dropout_kernel as k; import torch; "
        "lib = k.load(); assert lib is not None; "
        "print(bool(k.dropout_f32(torch.ones(100), 1, 32768, 2.0).sum() > 0))"
    )
    env = {**os.environ, "EMBER_TRAIN_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert [p.communicate(timeout=300)[0].strip() for p in procs] == ["True"] * 3
    assert all(p.returncode == 0 for p in procs)
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]
    # A later process reuses the library instead of building again.
    before = next(tmp_path.iterdir()).stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True)
    assert next(tmp_path.iterdir()).stat().st_mtime_ns == before


def test_keep_mask_follows_the_torch_seed():
    torch.manual_seed(7)
    a = keep_mask((64, 33), 0.1)
    torch.manual_seed(7)
    b = keep_mask((64, 33), 0.1)
    c = keep_mask((64, 33), 0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_fast_dropout_scales_kept_values_and_gradients_by_the_inverse_keep_probability():
    x = torch.randn(50, 70, requires_grad=True)
    torch.manual_seed(1)
    out = fast_dropout(x, 0.2)
    torch.manual_seed(1)
    mask = keep_mask(x.shape, 0.2)
    scale = 1 / keep_probability(0.2)
    torch.testing.assert_close(out, torch.where(mask, x * scale, 0.0), rtol=1e-6, atol=0)
    out.sum().backward()
    torch.testing.assert_close(x.grad, mask.float() * scale, rtol=1e-6, atol=0)


def test_fast_dropout_is_the_identity_when_off():
    x = torch.randn(4, 5)
    assert fast_dropout(x, 0.1, training=False) is x
    assert fast_dropout(x, 0.0) is x
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros_like(x))  # PyTorch's own edge case


class _Attention(nn.Module):
    is_causal = False

    def __init__(self, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.dropout = FastCPUDropout(0.25) if dropout is None else dropout
        if isinstance(self.dropout, FastCPUDropout):
            use_fast_cpu_dropout(self)  # its attention dropout: seeded_dropout_attention


def test_attention_dropout_path_is_softmax_attention_with_the_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))
    attend = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    attend[0, :, :, 3:] = False  # padding keys of the first text
    torch.manual_seed(11)
    out, _ = ember_attention(_Attention(), q, k, v, attend, dropout=0.25, scaling=0.3)
    out.pow(2).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    torch.manual_seed(11)
    mask = keep_mask((2, 3, 5, 5), 0.25)
    assert 0 < mask.sum() < mask.numel()
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~attend, float("-inf"))
    probs = torch.where(mask, scores.softmax(-1) / keep_probability(0.25), 0.0)
    expected = (probs @ v).transpose(1, 2)
    assert_close_at_scale(out, expected)
    expected.pow(2).sum().backward()
    for got, t in zip(grads, (q, k, v), strict=True):
        assert_close_at_scale(got, t.grad)
    # An additive mask (0 / dtype min) is the same mask.
    additive = torch.zeros(attend.shape).masked_fill(~attend, torch.finfo(torch.float32).min)
    torch.manual_seed(11)
    with torch.no_grad():
        out_additive, _ = ember_attention(_Attention(), q, k, v, additive, dropout=0.25, scaling=0.3)
    torch.testing.assert_close(out_additive, out.detach(), rtol=1e-6, atol=0)
    # Without dropout it is transformers' SDPA attention itself.
    with torch.no_grad():
        plain, _ = ember_attention(_Attention(), q, k, v, attend, dropout=0.0, scaling=0.3)
        sdpa, _ = sdpa_attention_forward(_Attention(), q, k, v, attend, dropout=0.0, scaling=0.3)
    assert torch.equal(plain, sdpa)
    # With PyTorch's own dropout module (train.fast_cpu_dropout: false) it is SDPA with dropout.
    torch.manual_seed(5)
    torch_dropout, _ = ember_attention(
        _Attention(nn.Dropout(0.25)), q, k, v, attend, dropout=0.25, scaling=0.3
    )
    torch.manual_seed(5)
    sdpa, _ = sdpa_attention_forward(_Attention(), q, k, v, attend, dropout=0.25, scaling=0.3)
    assert torch.equal(torch_dropout, sdpa)


def _tiny_bert(hidden_dropout: float, attention_dropout: float) -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=hidden_dropout,
        attention_probs_dropout_prob=attention_dropout,
    )
    return BertModel(config)


def _inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_model_swap_keeps_evaluation_outputs_and_the_saved_config(tmp_path):
    model = _tiny_bert(0.1, 0.1).eval()
    before = model(**_inputs()).last_hidden_state
    dropouts = sum(type(m) is nn.Dropout for m in model.modules())
    assert use_fast_cpu_dropout(model) == dropouts == 1 + 3 * 2  # embeddings + 3 per layer
    assert use_fast_cpu_dropout(model) == 0  # idempotent
    assert model.config._attn_implementation == ATTENTION_IMPLEMENTATION
    assert all(type(m) is not nn.Dropout for m in model.modules())
    assert torch.equal(model(**_inputs()).last_hidden_state, before)
    model.save_pretrained(tmp_path)
    assert not any("attn" in key for key in json.loads((tmp_path / "config.json").read_text()))
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "sdpa"
    assert torch.equal(reloaded(**_inputs()).last_hidden_state, before)


@pytest.mark.parametrize(("hidden", "attention"), [(0.3, 0.0), (0.0, 0.3)])
def test_swapped_model_applies_hidden_and_attention_dropout_in_training(hidden, attention):
    model = _tiny_bert(hidden, attention)
    use_fast_cpu_dropout(model)
    model.eval()
    reference = model(**_inputs()).last_hidden_state
    model.train()
    torch.manual_seed(0)
    first = model(**_inputs()).last_hidden_state
    torch.manual_seed(0)
    again = model(**_inputs()).last_hidden_state
    other = model(**_inputs()).last_hidden_state
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.allclose(first, reference, atol=1e-3)


@pytest.mark.parametrize("enabled", [True, False])
def test_train_loop_swaps_dropout_on_cpu_only_when_enabled(tmp_path, enabled):
    cfg = TrainConfig(batch_size=4, max_steps=2, log_every=1, fast_cpu_dropout=enabled)
    accelerator = build_accelerator(cfg, tmp_path, seed=0)
    model = TinyModel()
    train_loop(
        accelerator=accelerator,
        model=model,
        loss_step=make_loss_step(),
        dataloader=make_loader(batch_size=4),
        cfg=cfg,
        output_dir=tmp_path,
    )
    # On a GPU machine the loop trains on CUDA, where PyTorch's own dropout stays.
    assert isinstance(model.drop, FastCPUDropout) is (enabled and accelerator.device.type == "cpu")


def test_gradient_checkpointing_recomputes_the_same_masks():
    """Non-reentrant checkpointing replays the forward with the saved RNG state: same masks, same grads."""
    grads = []
    for checkpointing in (False, True):
        model = _tiny_bert(0.2, 0.2).train()
        use_fast_cpu_dropout(model)
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("error", FutureWarning)  # no deprecated API on the way
                enable_activation_checkpointing(model)
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        torch.manual_seed(3)
        model(**_inputs()).last_hidden_state.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7)
