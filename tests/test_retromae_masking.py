"""Whole-word masking (WordPiece, byte-level BPE, SentencePiece) and the decoder's attention masks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, minilm_dir
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ember_train.data.masking import (
    IGNORE_INDEX,
    RetroMAECollator,
    WholeWordMasker,
    decoder_attention_mask,
    mask_memory_bytes,
    require_mask_token,
)

CORPUS = FIXTURES / "retromae" / "debian_long.jsonl"


def corpus_texts(n: int | None = None) -> list[str]:
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


def train_wordpiece(vocab_size: int = 2000) -> PreTrainedTokenizerFast:
    """A small uncased BERT-style WordPiece tokenizer trained offline on the fixture corpus."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(
        corpus_texts(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
    )


def train_tokenizer(kind: str, *, with_mask: bool = True) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained offline on the fixture corpus (byte-level or Metaspace)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>"] + (["<mask>"] if with_mask else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials)
    tok.train_from_iterator(corpus_texts(), trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)]
    )
    extra = {"mask_token": "<mask>"} if with_mask else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        **extra,
    )


@pytest.fixture(scope="module")
def wordpiece() -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(str(minilm_dir()))


@pytest.fixture(scope="module")
def bytelevel() -> PreTrainedTokenizerFast:
    return train_tokenizer("bytelevel")


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    return train_tokenizer("metaspace")


def encode(tokenizer, texts: list[str], max_length: int = 128):
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    word_ids = torch.tensor([[-1 if w is None else w for w in enc.word_ids(i)] for i in range(len(texts))])
    return enc["input_ids"], enc["attention_mask"], word_ids


def assert_words_whole(tokenizer, input_ids, word_ids, mask, marker: str, marker_starts: bool) -> int:
    """Check both word views: same ``word_ids`` -> same decision; marker continuation -> same decision."""
    special = set(tokenizer.all_special_ids)
    checked = 0
    for row in range(input_ids.shape[0]):
        tokens = tokenizer.convert_ids_to_tokens(input_ids[row].tolist())
        for j in range(1, input_ids.shape[1]):
            if input_ids[row, j].item() in special or input_ids[row, j - 1].item() in special:
                continue
            same_word_id = word_ids[row, j] == word_ids[row, j - 1]
            continues = not tokens[j].startswith(marker) if marker_starts else tokens[j].startswith(marker)
            if same_word_id or continues:
                assert mask[row, j] == mask[row, j - 1], f"word split at {tokens[j - 1]!r} {tokens[j]!r}"
                checked += 1
    return checked


@pytest.mark.parametrize(
    ("name", "marker", "starts", "scheme"),
    [
        ("wordpiece", "##", False, "wordpiece"),
        ("bytelevel", "\u0120", True, "bpe"),
        ("metaspace", "\u2581", True, "sentencepiece"),
    ],
)
@pytest.mark.parametrize("ratio", [0.15, 0.3, 0.5])
def test_whole_word_mask_never_splits_a_word(request, name, marker, starts, scheme, ratio):
    tokenizer = request.getfixturevalue(name)
    masker = WholeWordMasker(tokenizer)
    assert masker.scheme == scheme
    input_ids, attention_mask, word_ids = encode(tokenizer, corpus_texts(64))
    groups = masker.word_groups(input_ids, attention_mask, word_ids)
    for seed in range(3):
        mask = masker.sample_mask(groups, ratio, torch.Generator().manual_seed(seed))
        checked = assert_words_whole(tokenizer, input_ids, word_ids, mask, marker, starts)
        assert checked > 100  # the corpus really has multi-token words
        assert not mask[attention_mask == 0].any()
        assert not mask[torch.isin(input_ids, torch.tensor(tokenizer.all_special_ids))].any()


@pytest.mark.parametrize("name", ["wordpiece", "bytelevel"])
def test_marker_fallback_without_word_ids_keeps_words_whole(request, name):
    """A slow tokenizer has no word_ids(): the vocabulary's markers alone still give whole words."""
    tokenizer = request.getfixturevalue(name)
    masker = WholeWordMasker(tokenizer)
    input_ids, attention_mask, _ = encode(tokenizer, corpus_texts(32))
    groups = masker.word_groups(input_ids, attention_mask, None)
    mask = masker.sample_mask(groups, 0.3, torch.Generator().manual_seed(0))
    marker, starts = ("##", False) if name == "wordpiece" else ("\u0120", True)
    no_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)  # neighbours never share an id
    assert assert_words_whole(tokenizer, input_ids, no_ids, mask, marker, starts) > 50


def test_word_groups_merge_bpe_punctuation_into_the_marked_word(bytelevel):
    masker = WholeWordMasker(bytelevel)
    input_ids, attention_mask, word_ids = encode(bytelevel, ["He said don't, please."])
    groups = masker.word_groups(input_ids, attention_mask, word_ids)[0]
    tokens = bytelevel.convert_ids_to_tokens(input_ids[0].tolist())
    words: dict[int, str] = {}
    for token, group in zip(tokens, groups.tolist(), strict=True):
        if group >= 0:
            words[group] = words.get(group, "") + token
    assert [w.replace("\u0120", "") for w in words.values()] == ["He", "said", "don't,", "please."]


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_masked_fraction_is_close_to_ratio(wordpiece, ratio):
    masker = WholeWordMasker(wordpiece)
    input_ids, attention_mask, word_ids = encode(wordpiece, corpus_texts(200))
    groups = masker.word_groups(input_ids, attention_mask, word_ids)
    mask = masker.sample_mask(groups, ratio, torch.Generator().manual_seed(1))
    fraction = mask.sum().item() / (groups >= 0).sum().item()
    assert abs(fraction - ratio) < 0.03, fraction
    assert (mask.sum(dim=1) >= 1).all()  # every text gets at least one masked word


def test_bert_replacement_80_10_10(wordpiece):
    masker = WholeWordMasker(wordpiece)
    input_ids, attention_mask, word_ids = encode(wordpiece, corpus_texts(200))
    groups = masker.word_groups(input_ids, attention_mask, word_ids)
    mask = masker.sample_mask(groups, 0.5, torch.Generator().manual_seed(2))
    corrupted, labels = masker.corrupt(input_ids, mask, torch.Generator().manual_seed(3))
    assert torch.equal(labels[mask], input_ids[mask])
    assert (labels[~mask] == IGNORE_INDEX).all()
    assert torch.equal(corrupted[~mask], input_ids[~mask])
    n = mask.sum().item()
    as_mask = (corrupted[mask] == wordpiece.mask_token_id).sum().item() / n
    unchanged = (corrupted[mask] == input_ids[mask]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.02
    # "random" can hit the original token by chance, so unchanged is 10% plus a sliver.
    assert abs(unchanged - 0.1) < 0.02
    replaced = corrupted[mask & (corrupted != wordpiece.mask_token_id) & (corrupted != input_ids)]
    assert not torch.isin(replaced, torch.tensor(wordpiece.all_special_ids)).any()


def test_tokenizer_without_mask_token_is_a_clear_error():
    tokenizer = train_tokenizer("bytelevel", with_mask=False)
    with pytest.raises(ValueError, match="no mask token"):
        require_mask_token(tokenizer)
    with pytest.raises(ValueError, match="no mask token"):
        RetroMAECollator(tokenizer, max_seq_length=64)


# --- decoder attention masks -------------------------------------------------------------


def decoder_batch(tokenizer, n: int = 48, max_length: int = 96):
    masker = WholeWordMasker(tokenizer)
    input_ids, attention_mask, word_ids = encode(tokenizer, corpus_texts(n), max_length)
    return masker.word_groups(input_ids, attention_mask, word_ids), attention_mask


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_decoder_mask_rules(wordpiece, ratio):
    groups, attention_mask = decoder_batch(wordpiece)
    visible = decoder_attention_mask(groups, attention_mask, ratio, torch.Generator().manual_seed(0))
    b, length = attention_mask.shape
    assert visible.dtype == torch.bool and visible.shape == (b, length, length)
    real = attention_mask.bool()
    target = real.clone()
    target[:, 0] = False

    # No target row sees itself.
    diag = visible.diagonal(dim1=1, dim2=2)
    assert not diag[target].any()
    # Position 0 (h) is visible from every row.
    assert visible[:, :, 0].all()
    # Padding is never visible.
    assert not visible.masked_select(~real[:, None, :].expand(b, length, length)).any()
    # Rows without a target (position 0, padding) see position 0 only.
    assert not visible[~target][:, 1:].any()

    # The sampled visible fraction (target rows; columns other than 0 and the row itself) is 1 - ratio.
    candidates = target[:, :, None] & real[:, None, :]
    candidates[:, :, 0] = False
    candidates &= ~torch.eye(length, dtype=torch.bool)[None]
    fraction = visible[candidates].float().mean().item()
    assert abs(fraction - (1 - ratio)) < 0.01, fraction


def test_decoder_mask_rows_differ_and_words_stay_whole(wordpiece):
    groups, attention_mask = decoder_batch(wordpiece, n=8)
    visible = decoder_attention_mask(groups, attention_mask, 0.5, torch.Generator().manual_seed(1))
    row = visible[0]
    n_real = int(attention_mask[0].sum())
    # Independent sampling per row: far from all rows being equal.
    distinct = {tuple(row[i, :n_real].tolist()) for i in range(1, n_real)}
    assert len(distinct) > n_real // 2
    # Tokens of one word are shown or hidden together (except the row's own token).
    g = groups[0]
    for i in range(1, n_real):
        for j in range(2, n_real):
            if g[j] >= 0 and g[j] == g[j - 1] and i not in (j, j - 1):
                assert row[i, j] == row[i, j - 1]


def test_decoder_mask_is_deterministic_given_the_generator(wordpiece):
    groups, attention_mask = decoder_batch(wordpiece, n=4)
    a = decoder_attention_mask(groups, attention_mask, 0.5, torch.Generator().manual_seed(7))
    b = decoder_attention_mask(groups, attention_mask, 0.5, torch.Generator().manual_seed(7))
    c = decoder_attention_mask(groups, attention_mask, 0.5, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_decoder_mask_builds_no_large_non_boolean_tensor():
    """At B×L×L only booleans are allocated: no allocation exceeds B·L·L bytes, and the peak is
    the documented two boolean tensors plus O(B·L) bookkeeping."""
    from torch.profiler import ProfilerActivity, profile

    b, length = 8, 256
    attention_mask = torch.ones(b, length, dtype=torch.long)
    attention_mask[1, 200:] = 0
    groups = torch.arange(length).repeat(b, 1) - 1  # one word per token; -1 at position 0
    groups[attention_mask == 0] = -1
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        decoder_attention_mask(groups, attention_mask, 0.5, torch.Generator().manual_seed(0))
    live, peak, largest = 0, 0, 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
        largest = max(largest, event.self_cpu_memory_usage)
    assert largest <= b * length * length  # nothing bigger than one boolean B×L×L
    assert peak <= mask_memory_bytes(b, length) + 4 * 8 * b * length  # + a few int64 [B, L]


def test_collator_batch_contract_and_seeding(wordpiece):
    collator = RetroMAECollator(wordpiece, max_seq_length=64, seed=3)
    items = [{"text": t, "key": (0, 5)} for t in corpus_texts(6)]
    batch = collator(items)
    again = collator(items)
    other = collator([{"text": t, "key": (1, 5)} for t in corpus_texts(6)])
    for key in batch:
        if key == "token_counts":
            assert batch[key] == again[key]
        else:
            assert torch.equal(batch[key], again[key])
    assert not torch.equal(batch["encoder_input_ids"], other["encoder_input_ids"])
    b, length = batch["input_ids"].shape
    assert length <= 64
    assert batch["decoder_visible"].shape == (b, length, length)
    # Decoder targets: every real token except position 0.
    expected = batch["attention_mask"].bool().clone()
    expected[:, 0] = False
    assert torch.equal(batch["decoder_labels"] != IGNORE_INDEX, expected)
    assert torch.equal(batch["decoder_labels"][expected], batch["input_ids"][expected])
    # Encoder labels only where the input was changed or kept-as-target; never on special tokens.
    scored = batch["encoder_labels"] != IGNORE_INDEX
    assert scored.any(dim=1).all()
    assert not scored[:, 0].any()
    # The scored positions, listed on the host (flat indices), and the token counts for the logs.
    assert torch.equal(batch["encoder_positions"], scored.flatten().nonzero().squeeze(1))
    assert torch.equal(batch["decoder_positions"], expected.flatten().nonzero().squeeze(1))
    real = int(batch["attention_mask"].sum())
    assert batch["token_counts"] == {"tokens": real, "padding_tokens": batch["attention_mask"].numel() - real}


def test_mlm_only_collator_masks_the_encoder_alike_and_builds_no_decoder_tensors(wordpiece):
    """``decoder=False`` (``retromae.objective: mlm``) leaves the encoder's batch exactly as
    RetroMAE's, so the two arms see the same tokens and the same masks."""
    items = [{"text": t, "key": (0, 2)} for t in corpus_texts(6)]
    full = RetroMAECollator(wordpiece, max_seq_length=64, seed=3)(items)
    mlm = RetroMAECollator(wordpiece, max_seq_length=64, seed=3, decoder=False)(items)
    assert not {"decoder_labels", "decoder_visible", "decoder_positions"} & set(mlm)
    assert set(mlm) == set(full) - {"decoder_labels", "decoder_visible", "decoder_positions"}
    for key in mlm:
        if key == "token_counts":
            assert mlm[key] == full[key]
        else:
            assert torch.equal(mlm[key], full[key]), key


def test_mask_memory_at_batch_32_by_512():
    assert mask_memory_bytes(32, 512) == 2 * 32 * 512 * 512  # 16 MiB: the figure in the docs
