import json
from pathlib import Path

import pytest
import torch
from conftest import minilm_dir

from ember_train.models import Encoder, pool
from ember_train.models.sentence_transformers import read_sentence_transformers_settings


def test_mean_pooling_ignores_padding(tiny_bert_path):
    encoder = Encoder.from_pretrained(tiny_bert_path, pooling="mean").eval()
    short, long = "a short text", "a much longer text that forces padding on the short one in a batch"
    alone = encoder.encode([short])
    together = encoder.encode([short, long], batch_size=2)
    # Batch of two pads the short text; its vector must not change.
    assert torch.allclose(alone[0], together[0], atol=1e-5)
    assert (
        encoder.tokenize([short, long])["attention_mask"][0].sum()
        < encoder.tokenize([long])["attention_mask"][0].sum()
    )


def test_pool_modes_on_hand_case():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool(tokens, mask, "mean"), torch.tensor([[2.0, 3.0]]))
    assert torch.allclose(pool(tokens, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    assert torch.allclose(pool(tokens, mask, "max"), torch.tensor([[3.0, 4.0]]))
    assert torch.allclose(pool(tokens, mask, "lasttoken"), torch.tensor([[3.0, 4.0]]))
    # weights 1 and 2 for the two real tokens
    assert torch.allclose(pool(tokens, mask, "weighted_mean"), torch.tensor([[7 / 3, 10 / 3]]))


def test_prefixes_applied(tiny_bert_path):
    encoder = Encoder.from_pretrained(tiny_bert_path, query_prefix="query: ", document_prefix="passage: ")
    q = encoder.tokenize(["hello"], kind="query")["input_ids"][0].tolist()
    d = encoder.tokenize(["hello"], kind="document")["input_ids"][0].tolist()
    plain = encoder.tokenize(["hello"])["input_ids"][0].tolist()
    assert q == encoder.tokenize(["query: hello"])["input_ids"][0].tolist()
    assert d == encoder.tokenize(["passage: hello"])["input_ids"][0].tolist()
    assert len(plain) < len(q)
    assert not torch.equal(
        encoder.encode(["hello"], kind="query"), encoder.encode(["hello"], kind="document")
    )


def test_normalize_gives_unit_vectors(tiny_bert_path):
    encoder = Encoder.from_pretrained(tiny_bert_path, normalize=True)
    norms = encoder.encode(["one", "two words", "three words here"]).norm(dim=-1)
    assert torch.allclose(norms, torch.ones(3), atol=1e-5)


def test_max_seq_length_truncates(tiny_bert_path):
    encoder = Encoder.from_pretrained(tiny_bert_path, max_seq_length=8)
    assert encoder.tokenize(["word " * 50])["input_ids"].shape[1] == 8


def _train_mode_vectors(encoder: Encoder, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return encoder(encoder.tokenize(texts))


def test_attention_dropout_setting_controls_the_dropout_attention_applies(tiny_bert_path):
    texts = ["a first text to embed", "and a second, somewhat longer one"]
    for attention_dropout, same in ((0.0, True), (None, False)):
        encoder = Encoder.from_pretrained(tiny_bert_path, attention_dropout=attention_dropout)
        config = encoder.backbone.config
        assert config.hidden_dropout_prob == 0.1  # only attention dropout changes
        assert config.attention_probs_dropout_prob == (0.1 if attention_dropout is None else 0.0)
        # Silence every other dropout: what remains random in training is attention dropout alone.
        for name, module in encoder.named_modules():
            if isinstance(module, torch.nn.Dropout) and not name.endswith("attention.self.dropout"):
                module.p = 0.0
        encoder.train()
        torch.manual_seed(0)
        first = _train_mode_vectors(encoder, texts)
        second = _train_mode_vectors(encoder, texts)
        assert torch.allclose(first, second, atol=1e-6) is same
        if same:
            assert torch.allclose(first, encoder.eval().encode(texts), atol=1e-5)


def test_attention_dropout_on_a_model_without_one_is_an_error(tmp_path):
    from transformers import GPT2Config

    from ember_train.models.encoder import backbone_config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    assert backbone_config(str(tmp_path)).attn_pdrop == 0.1  # unset: the checkpoint's config as is
    with pytest.raises(ValueError, match="no attention dropout setting"):
        backbone_config(str(tmp_path), attention_dropout=0.0)


def test_attention_dropout_reaches_the_encoder_from_the_config(tiny_bert_path):
    from ember_train.config.schema import ModelConfig

    model = ModelConfig(name_or_path=str(tiny_bert_path), attention_dropout=0.05)
    encoder = Encoder.from_pretrained(model.name_or_path, **model.encoder_kwargs())
    assert encoder.backbone.config.attention_probs_dropout_prob == 0.05
    assert {m.dropout.p for m in encoder.modules() if type(m).__name__ == "BertSelfAttention"} == {0.05}


def test_hub_model_settings_come_from_the_hub_cache(monkeypatch):
    """A Hub id's own pooling (here CLS, like bge) is read through the Hub cache when pooling is null."""
    from huggingface_hub import constants

    minilm = minilm_dir()

    cache = Path(constants.HF_HUB_CACHE) / "models--ember-test--cls-minilm"
    snapshot = cache / "snapshots" / ("0" * 40)
    for file in minilm.rglob("*"):
        if file.is_file():
            target = snapshot / file.relative_to(minilm)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(file)
    pooling = json.loads((minilm / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (snapshot / "1_Pooling" / "config.json").unlink()
    (snapshot / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (cache / "refs").mkdir(parents=True, exist_ok=True)
    (cache / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    encoder = Encoder.from_pretrained("ember-test/cls-minilm")
    assert encoder.pooling == "cls"
    assert encoder.normalize is True  # the Normalize module of all-MiniLM-L6-v2
    assert encoder.max_seq_length == 256
    assert Encoder.from_pretrained("ember-test/cls-minilm", pooling="mean").pooling == "mean"
    assert read_sentence_transformers_settings("ember-test/not-cached") == {}  # the load reports why
