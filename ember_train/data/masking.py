"""Whole-word masking with BERT's 80/10/10 replacement, and RetroMAE's enhanced-decoding attention mask.

Masking single sub-word pieces lets a model fill ``##bly`` in from ``un ##bel ##ie ##va`` without
understanding anything, so RetroMAE masks whole words. A *word* here is the coarser of two
views, so a word is never split under either of them:

* the fast tokenizer's ``word_ids()`` (its pre-tokenizer's words), where available;
* the vocabulary's word markers: WordPiece continues a word with ``##``; byte-level BPE (``Ġ``)
  and SentencePiece (``▁``) mark the *start* of a word, so a piece without the marker continues
  the previous word (``Ġdon`` + ``'t`` is one word even though the GPT-2 pre-tokenizer splits it).

Everything runs on ``[B, L]`` tensors; no per-token Python loops.
"""

from __future__ import annotations

from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from ember_train.data.batching import token_counts

WordScheme = Literal["wordpiece", "bpe", "sentencepiece", "none"]

# Marker -> scheme, and whether the marker starts (True) or continues (False) a word.
_MARKERS: dict[str, tuple[WordScheme, bool]] = {
    "##": ("wordpiece", False),
    "\u0120": ("bpe", True),  # Ġ: byte-level BPE's encoded space
    "\u2581": ("sentencepiece", True),  # ▁: SentencePiece's whitespace marker
}

IGNORE_INDEX = -100  # label of positions that are not scored (cross-entropy's default ignore_index)


def require_mask_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The mask token id, or a clear error: MLM pretraining cannot run without one."""
    if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name!r} has no mask token, so masked-language-model pretraining cannot run. "
            "Use a checkpoint trained with an MLM objective (BERT, RoBERTa, ...), or add one with "
            "tokenizer.add_special_tokens({'mask_token': '[MASK]'}) and resize the model's embeddings."
        )
    return int(tokenizer.mask_token_id)


def detect_word_scheme(tokens: list[str]) -> WordScheme:
    """Which word-marker convention a vocabulary uses: the marker that prefixes most tokens."""
    counts = {marker: 0 for marker in _MARKERS}
    for token in tokens:
        for marker in _MARKERS:
            if token.startswith(marker) and len(token) > len(marker):
                counts[marker] += 1
    marker, count = max(counts.items(), key=lambda kv: kv[1])
    # A handful of stray tokens does not make a convention (e.g. "##" as a literal in a BPE vocab).
    if count < max(10, len(tokens) // 1000):
        return "none"
    return _MARKERS[marker][0]


class WholeWordMasker:
    """Finds words, picks whole words to mask, and applies BERT's 80/10/10 replacement.

    Built once per tokenizer: the per-vocabulary lookup tables (which ids continue a word, which
    are special, which may replace a masked token) are computed here, not per batch.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
    ) -> None:
        if not 0 <= mask_replace_prob <= 1 or not 0 <= random_replace_prob <= 1 - mask_replace_prob:
            raise ValueError("need 0 <= mask_replace_prob and random_replace_prob, with their sum <= 1")
        self.tokenizer = tokenizer
        self.mask_token_id = require_mask_token(tokenizer)
        self.mask_replace_prob = mask_replace_prob
        self.random_replace_prob = random_replace_prob

        size = len(tokenizer)
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
        tokens = [t if isinstance(t, str) else "" for t in tokens]
        self.scheme = detect_word_scheme(tokens)
        self.continues_word = torch.zeros(size, dtype=torch.bool)
        if self.scheme != "none":
            marker = next(m for m, (s, _) in _MARKERS.items() if s == self.scheme)
            starts = _MARKERS[marker][1]
            has_marker = torch.tensor([t.startswith(marker) for t in tokens], dtype=torch.bool)
            self.continues_word = ~has_marker if starts else has_marker
        self.special = torch.zeros(size, dtype=torch.bool)
        self.special[[i for i in tokenizer.all_special_ids if i is not None and 0 <= i < size]] = True
        # Random replacements come from ordinary tokens only (never [CLS], [PAD], [MASK], ...).
        self.replacement_ids = torch.nonzero(~self.special).flatten()

    def word_groups(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, L]`` word index per token (0, 1, ... per row), ``-1`` for special tokens and padding.

        ``word_ids`` is the fast tokenizer's ``word_ids()`` as a tensor (``-1`` for ``None``);
        without it, word boundaries come from the vocabulary's markers alone.
        """
        special = self.special[input_ids] | (attention_mask == 0)
        if word_ids is not None:
            special |= word_ids < 0
        prev_special = torch.ones_like(special)
        prev_special[:, 1:] = special[:, :-1]
        new_by_ids = torch.ones_like(special)  # without word_ids, only the markers join tokens
        if word_ids is not None:
            new_by_ids[:, 1:] = word_ids[:, 1:] != word_ids[:, :-1]
        # A token starts a word after a special token, or where both views agree that it does.
        start = ~special & (prev_special | (new_by_ids & ~self.continues_word[input_ids]))
        groups = torch.cumsum(start.long(), dim=1) - 1
        return groups.masked_fill(special, -1)

    def sample_mask(
        self, groups: torch.Tensor, ratio: float, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pick whole words in random order until ``ratio`` of each row's tokens are covered.

        Like BERT's whole-word masking, the count is in tokens: a word is taken while at least
        half of it fits under ``round(ratio * tokens)``, so the masked count is centred on the
        target; every row with words gets at least one.
        """
        if not 0 <= ratio <= 1:
            raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
        batch, _ = groups.shape
        num_words = int(groups.max().item()) + 1 if groups.numel() else 0
        if num_words <= 0 or ratio == 0:
            return torch.zeros_like(groups, dtype=torch.bool)
        valid = groups >= 0
        word_len = torch.zeros(batch, num_words, dtype=torch.long)
        word_len.scatter_add_(1, groups.clamp(min=0), valid.long())
        n_tokens = valid.sum(dim=1)
        target = torch.clamp(torch.round(n_tokens.double() * ratio).long(), min=1)
        target = torch.where(n_tokens > 0, target, torch.zeros_like(target))
        # Random order of words per row; absent words (length 0) sort last.
        keys = torch.rand(batch, num_words, generator=generator)
        keys = keys.masked_fill(word_len == 0, 2.0)
        order = keys.argsort(dim=1)
        sorted_len = word_len.gather(1, order)
        covered_before = torch.cumsum(sorted_len, dim=1) - sorted_len
        fits = 2 * covered_before + sorted_len <= 2 * target[:, None]
        fits[:, 0] = True  # at least one word
        chosen_sorted = fits & (sorted_len > 0) & (target[:, None] > 0)
        chosen = torch.zeros_like(chosen_sorted).scatter(1, order, chosen_sorted)
        return chosen.gather(1, groups.clamp(min=0)) & valid

    def corrupt(
        self, input_ids: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's replacement on the ``mask``ed positions: [MASK] / random token / unchanged.

        Returns the corrupted ids and the labels (original id where masked, -100 elsewhere).
        """
        labels = input_ids.masked_fill(~mask, IGNORE_INDEX)
        draw = torch.rand(input_ids.shape, generator=generator)
        to_mask = mask & (draw < self.mask_replace_prob)
        to_random = (
            mask
            & (draw >= self.mask_replace_prob)
            & (draw < self.mask_replace_prob + self.random_replace_prob)
        )
        random_ids = self.replacement_ids[
            torch.randint(len(self.replacement_ids), input_ids.shape, generator=generator)
        ]
        corrupted = torch.where(to_mask, torch.full_like(input_ids, self.mask_token_id), input_ids)
        corrupted = torch.where(to_random, random_ids, corrupted)
        return corrupted, labels


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """A 63-bit seed that is a pure function of where a batch sits in training."""
    value = seed
    for part in (epoch, batch, rank):
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return value


class RetroMAECollator:
    """Texts -> one RetroMAE batch: both maskings and the decoder's attention mask.

    Items are strings, or ``{"text": ..., "key": (epoch, batch)}`` dicts; with keys, every random
    choice comes from a generator seeded by ``(seed, epoch, batch, rank)``, so a resumed run (or one
    with any number of loader workers) masks exactly like an uninterrupted one.

    Returned tensors (``[B, L]`` unless noted): ``input_ids`` (original), ``attention_mask``,
    ``encoder_input_ids`` (masked, 80/10/10), ``encoder_labels``, ``decoder_labels`` (every real
    token but position 0) and ``decoder_visible`` (``[B, L, L]`` booleans); ``encoder_positions``
    and ``decoder_positions``, the flat indices of the scored positions of each labels tensor; and
    ``token_counts`` (floats, for the logs). With ``decoder=False`` (MLM only) the decoder's
    tensors are left out: the ``B × L × L`` mask is the costly part of a batch.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_seq_length: int,
        encoder_mask_ratio: float = 0.3,
        decoder_mask_ratio: float = 0.5,
        decoder: bool = True,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.masker = WholeWordMasker(tokenizer)
        self.max_seq_length = max_seq_length
        self.encoder_mask_ratio = encoder_mask_ratio
        self.decoder_mask_ratio = decoder_mask_ratio
        self.decoder = decoder
        self.seed = seed
        self.rank = rank

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        texts = [item["text"] if isinstance(item, dict) else item for item in items]
        key = items[0].get("key") if items and isinstance(items[0], dict) else None
        generator = None
        if key is not None:
            generator = torch.Generator().manual_seed(batch_seed(self.seed, key[0], key[1], self.rank))
        encoded = self.tokenizer(
            texts, truncation=True, max_length=self.max_seq_length, padding=True, return_tensors="pt"
        )
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        word_ids = None
        if encoded.encodings is not None:  # fast tokenizer
            word_ids = torch.tensor(
                [[-1 if w is None else w for w in encoded.word_ids(i)] for i in range(len(texts))],
                dtype=torch.long,
            )
        groups = self.masker.word_groups(input_ids, attention_mask, word_ids)
        mask = self.masker.sample_mask(groups, self.encoder_mask_ratio, generator)
        encoder_input_ids, encoder_labels = self.masker.corrupt(input_ids, mask, generator)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "encoder_input_ids": encoder_input_ids,
            "encoder_labels": encoder_labels,
            # Found here, on the host: boolean selection on a GPU would make the host wait for it.
            "encoder_positions": target_positions(encoder_labels),
            "token_counts": token_counts(encoded),
        }
        if not self.decoder:
            return batch
        decoder_labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        decoder_labels[:, 0] = IGNORE_INDEX
        return {
            **batch,
            "decoder_labels": decoder_labels,
            "decoder_visible": decoder_attention_mask(
                groups, attention_mask, self.decoder_mask_ratio, generator
            ),
            "decoder_positions": target_positions(decoder_labels),
        }


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (into ``labels.flatten()``) of the positions that have a target."""
    return (labels.flatten() != IGNORE_INDEX).nonzero().squeeze(1)


def decoder_attention_mask(
    groups: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The enhanced-decoding mask, ``[B, L, L]`` booleans: ``True`` where row ``i`` may attend to ``j``.

    For every target row ``i`` (a real token other than position 0) each word of the text is
    hidden with probability ``mask_ratio``, independently per row (whole words, as in the
    reference); then the diagonal is hidden and position 0 shown. Rows that predict nothing
    (position 0 and padding) see position 0 only, which keeps every softmax finite.

    ``groups`` is ``[B, L]`` word indices with ``-1`` for special tokens and padding (see
    :meth:`ember_train.data.masking.WholeWordMasker.word_groups`); special tokens inside the
    text (``[SEP]``, packing separators) are sampled as one-token words. Peak memory is two
    boolean ``B × L × L`` tensors (the per-row word draws and the mask): no float or int64
    ``L × L`` tensor is built.
    """
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"decoder mask ratio must be in [0, 1), got {mask_ratio}")
    batch, length = attention_mask.shape
    real = attention_mask.bool()
    special_real = real & (groups < 0)
    special_real[:, 0] = False
    num_words = int(groups.max().item()) + 1 if groups.numel() else 0
    extra = torch.cumsum(special_real.long(), dim=1) - 1 + max(num_words, 0)
    dgroups = torch.where(special_real, extra, groups)  # -1: position 0 and padding
    num_groups = max(int(dgroups.max().item()) + 1, 1)

    keep = torch.empty(batch, length, num_groups, dtype=torch.bool, device=groups.device)
    keep.bernoulli_(1.0 - mask_ratio, generator=generator)
    # Stride-0 expand: gather reads the [B, L] index without materialising a B×L×L index.
    index = dgroups.clamp(min=0)[:, None, :].expand(batch, length, length)
    visible = keep.gather(2, index)
    del keep
    visible.masked_fill_((dgroups < 0)[:, None, :], False)
    visible.diagonal(dim1=1, dim2=2).fill_(False)
    target_rows = real.clone()
    target_rows[:, 0] = False
    visible.masked_fill_(~target_rows[:, :, None], False)
    visible[:, :, 0] = True
    return visible


def mask_memory_bytes(batch_size: int, seq_len: int, num_groups: int | None = None) -> int:
    """Peak bytes of :func:`decoder_attention_mask`'s tensors: the B×L×G word draws and the B×L×L mask."""
    groups = seq_len if num_groups is None else num_groups
    return batch_size * seq_len * groups + batch_size * seq_len * seq_len
