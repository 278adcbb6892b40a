"""RetroMAE model: enhanced decoding, the tied MLM head, the loss, and saving/loading."""

from __future__ import annotations

import pytest
import torch
from test_retromae_masking import corpus_texts, train_tokenizer
from transformers import AutoModelForMaskedLM

from ember_train.data.masking import IGNORE_INDEX, RetroMAECollator
from ember_train.losses.retromae import RetroMAELoss, token_cross_entropy
from ember_train.models import Encoder
from ember_train.models.retromae import DecoderConfig, RetroMAEDecoder, RetroMAEModel, RetroMAEOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def batch_for(model: RetroMAEModel, n: int = 6, seed: int = 0, max_length: int = 48) -> dict:
    collator = RetroMAECollator(model.tokenizer, max_seq_length=max_length, seed=seed)
    return collator([{"text": t, "key": (0, 0)} for t in corpus_texts(n)])


@pytest.fixture
def model(tiny_bert_path) -> RetroMAEModel:
    torch.manual_seed(0)
    return RetroMAEModel.from_pretrained(tiny_bert_path, max_seq_length=64)


def test_forward_scores_the_right_positions_and_trains_every_part(model):
    batch = batch_for(model)
    out = model(batch)
    vocab = model.mlm.config.vocab_size
    n_enc = int((batch["encoder_labels"] != IGNORE_INDEX).sum())
    n_dec = int((batch["decoder_labels"] != IGNORE_INDEX).sum())
    assert out.encoder_logits.shape == (n_enc, vocab) and out.decoder_logits.shape == (n_dec, vocab)
    assert n_dec == int(batch["attention_mask"].sum()) - batch["input_ids"].shape[0]
    assert out.embedding.shape == (batch["input_ids"].shape[0], model.encoder.dim)
    # h is the [CLS] state of the *masked* input.
    model.eval()
    out = model(batch)
    hidden = model.backbone(
        input_ids=batch["encoder_input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    assert torch.allclose(out.embedding, hidden[:, 0], atol=1e-6)
    model.train()
    loss, metrics = RetroMAELoss()(model(batch))
    loss.backward()
    for name, module in (
        ("decoder", model.decoder),
        ("encoder", model.backbone.encoder),
        ("head", model.head.predictions.transform),
    ):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert set(metrics) == {"enc_mlm_loss", "dec_mlm_loss", "enc_mlm_acc", "dec_mlm_acc"}


def test_mlm_head_is_tied_to_the_word_embeddings(model):
    assert model.head.predictions.decoder.weight is model.backbone.embeddings.word_embeddings.weight


def test_decoder_row_never_reads_its_own_token(model):
    """Change the original token at position j: only decoder rows that may see j change."""
    model.eval()
    batch = batch_for(model, n=3)
    with torch.no_grad():
        out = model(batch)
        length = batch["input_ids"].shape[1]

        def decode(input_ids: torch.Tensor) -> torch.Tensor:
            query = model.query_stream_from(out.embedding, length)
            content = model.content_stream_from(out.embedding, input_ids)
            return model.decoder(query, content, batch["decoder_visible"])

        base = decode(batch["input_ids"])
        for j in (1, 5, 9):
            changed = batch["input_ids"].clone()
            changed[:, j] = (changed[:, j] + 17) % model.mlm.config.vocab_size
            moved = (decode(changed) - base).abs().amax(dim=-1) > 1e-6  # [B, L]
            sees_j = batch["decoder_visible"][:, :, j]
            assert not moved[:, j].any()  # the row that predicts token j never reads it
            assert torch.equal(moved & ~sees_j, torch.zeros_like(moved))
            assert moved.any()  # and some rows do read it


def test_query_streams(tiny_bert_path):
    torch.manual_seed(0)
    paper = RetroMAEModel.from_pretrained(tiny_bert_path, max_seq_length=64)
    h = torch.randn(2, paper.encoder.dim)
    positions = paper.backbone.embeddings.position_embeddings.weight[:7]
    assert torch.allclose(paper.query_stream_from(h, 7), h[:, None] + positions[None])

    flag = RetroMAEModel.from_pretrained(
        tiny_bert_path, max_seq_length=64, query_stream="embedding", decoder_layers=2
    )
    flag.eval()
    emb = flag.backbone.embeddings
    expected = emb.LayerNorm(h[:, None] + positions[None] + emb.token_type_embeddings.weight[0])
    assert torch.allclose(flag.query_stream_from(h, 7), expected, atol=1e-6)
    assert len(flag.decoder.layers) == 2
    flag.train()
    loss, _ = RetroMAELoss()(flag(batch_for(flag)))
    loss.backward()
    assert flag.decoder.layers[0].q_proj.weight.grad is not None


def test_decoder_can_start_from_the_encoders_last_layer(tiny_bert_path):
    model = RetroMAEModel.from_pretrained(tiny_bert_path, decoder_init="last_layer")
    last = model.backbone.encoder.layer[-1]
    first = model.decoder.layers[0]
    assert torch.equal(first.q_proj.weight, last.attention.self.query.weight)
    assert torch.equal(first.ffn_out.bias, last.output.dense.bias)
    assert torch.equal(first.attn_norm.weight, last.attention.output.LayerNorm.weight)
    assert first.q_proj.weight.data_ptr() != last.attention.self.query.weight.data_ptr()  # a copy


def test_loss_weights_and_empty_selections():
    torch.manual_seed(0)
    logits = torch.randn(5, 11, requires_grad=True)
    targets = torch.randint(11, (5,))
    enc_loss, _ = token_cross_entropy(logits, targets)
    out = RetroMAEOutput(logits, targets, logits[:0], targets[:0], torch.zeros(1, 2))
    loss, metrics = RetroMAELoss(encoder_weight=2.0, decoder_weight=1.0)(out)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(2 * enc_loss.item())
    assert metrics["dec_mlm_loss"] == 0.0
    loss.backward()
    assert logits.grad is not None
    with pytest.raises(ValueError):
        RetroMAELoss(0.0, 0.0)


def test_accuracy_counts_argmax_hits():
    logits = torch.tensor([[0.0, 3.0], [2.0, 0.0], [0.0, 1.0]])
    _, acc = token_cross_entropy(logits, torch.tensor([1, 1, 1]))
    assert acc.item() == pytest.approx(2 / 3)


def test_save_and_load_keep_tied_head_and_decoder(model, tmp_path):
    # A few updates so the embeddings (and hence the tied output layer) differ from the initial ones.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for seed in range(2):
        loss, _ = RetroMAELoss()(model(batch_for(model, seed=seed)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    out_dir = model.save_pretrained(tmp_path / "pretrained")

    mlm = AutoModelForMaskedLM.from_pretrained(out_dir)
    trained = model.backbone.embeddings.word_embeddings.weight
    assert torch.equal(mlm.get_input_embeddings().weight, trained)
    assert torch.equal(mlm.get_output_embeddings().weight, trained)  # the tie survived safetensors
    assert torch.equal(mlm.cls.predictions.bias, model.head.predictions.bias)

    reloaded = RetroMAEModel.from_pretrained(out_dir, max_seq_length=64, init_decoder_from=out_dir)
    reloaded.eval()
    batch = batch_for(model, seed=5)
    with torch.no_grad():
        a, b = model(batch), reloaded(batch)
    assert torch.allclose(a.decoder_logits, b.decoder_logits, atol=1e-5)
    assert torch.allclose(a.encoder_logits, b.encoder_logits, atol=1e-5)
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(value, reloaded.decoder.state_dict()[key]), key

    # The same directory is a plain encoder checkpoint for the next stage.
    encoder = Encoder.from_pretrained(out_dir, pooling="cls", max_seq_length=64)
    texts = corpus_texts(3)
    assert torch.allclose(encoder.encode(texts), model.encoder.encode(texts), atol=1e-5)


def test_missing_decoder_files_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="init_decoder_from"):
        RetroMAEDecoder.load(tmp_path)


def test_decoder_config_follows_backbone(tiny_bert_path):
    from transformers import AutoConfig

    config = DecoderConfig.from_backbone(AutoConfig.from_pretrained(tiny_bert_path), num_layers=3)
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size, config.num_layers) == (
        32,
        2,
        64,
        3,
    )


def test_roberta_with_byte_level_bpe(tmp_path):
    """A RoBERTa-style model (offset positions, ``lm_head``) with a byte-level BPE tokenizer."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    tokenizer = train_tokenizer("bytelevel")
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    RobertaForMaskedLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = RetroMAEModel.from_pretrained(tmp_path, max_seq_length=64)
    assert model.head is model.mlm.lm_head
    # RoBERTa numbers positions from padding_idx + 1; the query stream must too.
    h = torch.zeros(1, 32)
    start = tokenizer.pad_token_id + 1
    expected = model.backbone.embeddings.position_embeddings.weight[start : start + 5]
    assert torch.equal(model.query_stream_from(h, 5)[0], expected)
    loss, metrics = RetroMAELoss()(model(batch_for(model)))
    loss.backward()
    assert torch.isfinite(loss) and metrics["dec_mlm_loss"] > 0


@pytest.mark.parametrize("query_stream", ["position", "embedding"])
def test_forward_under_bf16_autocast(tiny_bert_path, query_stream):
    model = RetroMAEModel.from_pretrained(tiny_bert_path, max_seq_length=64, query_stream=query_stream)
    batch = batch_for(model, n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, metrics = RetroMAELoss()(model(batch))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_attention_dropout_setting_reaches_encoder_and_new_decoder(tiny_bert_path):
    default = RetroMAEModel.from_pretrained(tiny_bert_path)
    assert default.decoder.config.attention_probs_dropout_prob == 0.1
    model = RetroMAEModel.from_pretrained(tiny_bert_path, attention_dropout=0.0)
    assert model.backbone.config.attention_probs_dropout_prob == 0.0
    assert model.decoder.config.attention_probs_dropout_prob == 0.0
    assert model.backbone.config.hidden_dropout_prob == 0.1
