"""Packed (padding-free) batches give the vectors and gradients of padded ones."""

import pytest
import torch
from conftest import minilm_dir
from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

from ember_train.config import ConfigError
from ember_train.config.parse import from_dict
from ember_train.config.schema import TrainConfig
from ember_train.data.batching import (
    ATTENTION_GROUPS,
    BatchLayout,
    packing_supported,
    split_batch,
    token_counts,
    tokenize_packed,
    use_packing,
)
from ember_train.models import POOLING_MODES, Encoder

TEXTS = [
    "a",
    "how do I install a package on debian",
    "the quick brown fox jumps over the lazy dog " * 3,
    "short text",
    "text editor for programmers with syntax highlighting",
]


def _encoder(kind: str, tmp_path, attention: str = "sdpa") -> Encoder:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=64, **sizes))
    else:  # RoBERTa-style positions start after the padding index
        config = RobertaConfig(
            vocab_size=tokenizer.vocab_size,
            max_position_embeddings=66,
            pad_token_id=tokenizer.pad_token_id,
            **sizes,
        )
        model = RobertaModel(config, add_pooling_layer=False)
    model.save_pretrained(tmp_path / kind)
    tokenizer.save_pretrained(tmp_path / kind)
    # float64: these tests are about equal formulas, not float32 summation order (AVX2 / AVX-512 / CUDA).
    encoder = Encoder.from_pretrained(tmp_path / kind, max_seq_length=24).double()
    if attention != "sdpa":
        encoder.backbone.set_attn_implementation(attention)
    return encoder.eval()


def _packed_and_padded(
    encoder: Encoder, texts: list[str], num_groups: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    features, order = tokenize_packed(encoder, texts, kind="document", num_groups=num_groups)
    packed = encoder(features)[torch.argsort(order)]
    return packed, encoder(encoder.tokenize(texts, kind="document"))


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", POOLING_MODES)
def test_packed_vectors_equal_padded_vectors(tmp_path, kind, pooling):
    encoder = _encoder(kind, tmp_path)
    encoder.pooling = pooling
    with torch.no_grad():
        packed, padded = _packed_and_padded(encoder, TEXTS)
    torch.testing.assert_close(packed, padded, rtol=1e-10, atol=1e-12)
    assert packing_supported(encoder)


@pytest.mark.parametrize("num_groups", [1, 3, 5])
def test_vectors_do_not_depend_on_the_number_of_attention_groups(tmp_path, num_groups):
    encoder = _encoder("bert", tmp_path)
    with torch.no_grad():
        packed, padded = _packed_and_padded(encoder, TEXTS, num_groups)
    torch.testing.assert_close(packed, padded, rtol=1e-10, atol=1e-12)


def test_packed_rows_are_cut_into_the_default_number_of_attention_groups(tmp_path):
    features, _ = tokenize_packed(_encoder("bert", tmp_path), TEXTS)  # five different lengths
    assert len(features["group_sizes"]) == ATTENTION_GROUPS == 3


def test_gradient_cache_chunk_size_does_not_constrain_packed_attention_groups(tmp_path):
    """Chunks re-cut a packed row's groups themselves (split_batch); the groups stay padding-optimal."""
    encoder = _encoder("bert", tmp_path)
    texts = ["x"] * 28 + ["a much longer text " * 4] * 4  # 32 texts: cut before the long ones
    (packed,), _ = BatchLayout(pack=True, cut_multiple_of=16).tokenize(encoder, texts, None)
    assert torch.equal(packed["group_sizes"], tokenize_packed(encoder, texts)[0]["group_sizes"])
    assert int(packed["group_sizes"][-1]) == 4


def test_packed_gradients_equal_padded_gradients(tmp_path):
    encoder = _encoder("bert", tmp_path)  # eval: no dropout, so both see the same function
    packed, padded = _packed_and_padded(encoder, TEXTS)
    target = torch.randn_like(padded)
    grads = []
    for out in (packed, padded):
        encoder.zero_grad()
        ((out - target) ** 2).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-9, atol=1e-12)


def test_packed_row_has_no_padding_and_attention_groups_cover_every_text(tmp_path):
    encoder = _encoder("bert", tmp_path)
    features, order = tokenize_packed(encoder, TEXTS, num_groups=2)
    lengths = features["sequence_lengths"]
    assert lengths.tolist() == sorted(lengths.tolist())
    assert features["input_ids"].shape == (1, int(lengths.sum()))
    assert features["group_sizes"].tolist() != [] and int(features["group_sizes"].sum()) == len(TEXTS)
    padded = encoder.tokenize(TEXTS)
    assert token_counts(features) == {"tokens": float(padded["attention_mask"].sum()), "padding_tokens": 0.0}
    # Each text's tokens are its padded row's real tokens.
    start = 0
    for i, length in zip(order.tolist(), lengths.tolist(), strict=True):
        real = padded["input_ids"][i][padded["attention_mask"][i].bool()]
        assert torch.equal(features["input_ids"][0, start : start + length], real)
        start += length


def test_split_batch_chunks_give_the_whole_rows_vectors(tmp_path):
    encoder = _encoder("bert", tmp_path)
    texts = TEXTS * 3  # 15 texts
    features, _ = tokenize_packed(encoder, texts, num_groups=2)
    chunks = split_batch(features, 4)
    assert [int(c["sequence_lengths"].shape[0]) for c in chunks] == [4, 4, 4, 3]
    assert all(int(c["group_sizes"].sum()) == int(c["sequence_lengths"].shape[0]) for c in chunks)
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks], dim=1), features["input_ids"])
    with torch.no_grad():
        whole = encoder(features)
        pieces = torch.cat([encoder(c) for c in chunks])
    torch.testing.assert_close(pieces, whole, rtol=1e-10, atol=1e-12)


def test_packing_is_refused_where_the_model_ignores_the_packed_layout(tmp_path):
    """Eager attention does not take the packed layout: texts would attend to each other."""
    encoder = _encoder("bert", tmp_path, attention="eager")
    with torch.no_grad():
        packed, padded = _packed_and_padded(encoder, TEXTS)
    assert not torch.allclose(packed, padded, atol=1e-3)
    assert not packing_supported(encoder)
    assert use_packing("auto", encoder, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="pack_sequences=true"):
        use_packing(True, encoder, torch.device("cpu"))


def test_use_packing_is_on_for_cpu_by_default_and_opt_in_elsewhere(tmp_path):
    encoder = _encoder("bert", tmp_path)
    encoder.train()
    assert use_packing("auto", encoder, torch.device("cpu")) is True
    assert use_packing("auto", encoder, torch.device("cuda")) is False  # not measured on GPUs: opt-in
    assert use_packing(True, encoder, torch.device("cuda")) is True
    assert use_packing(False, encoder, torch.device("cpu")) is False
    # The check leaves every module's train/eval mode as it was.
    assert encoder.training and encoder.backbone.training


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (True, True), (False, False)])
def test_pack_sequences_setting(value, expected):
    assert from_dict(TrainConfig, {"pack_sequences": value}).pack_sequences == expected


def test_pack_sequences_rejects_other_values():
    with pytest.raises(ConfigError, match="pack_sequences"):
        from_dict(TrainConfig, {"pack_sequences": "sometimes"})
