import torch

from ember_train.encoder import Encoder, pool


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
