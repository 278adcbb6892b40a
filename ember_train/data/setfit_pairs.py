"""SetFit-style contrastive pairs from labelled texts, generated lazily by index arithmetic.

SetFit turns ``n`` labelled texts into positive pairs (same label, target 1) and negative
pairs (different labels, target 0). The reference implementation materialises every pair
before training, which is ``n²/2`` Python objects: 10k texts already need tens of GB. Here
nothing grows with ``n²``:

* the positive and negative pair *spaces* are indexed by arithmetic on a few ``O(n)`` arrays
  (for single-label data: texts sorted by label, so the ``m``-th positive/negative pair is found
  with one binary search);
* each pass over a space follows a seeded pseudo-random permutation (a small Feistel network
  with cycle walking), so "every pair once, in random order" needs no shuffled list;
* item ``k`` of the dataset is a pure function of ``(seed, k)``: it is a map-style dataset with a
  known length, so the shared :class:`~ember_train.data.sampler.ShardedBatchSampler` shards,
  shuffles and resumes it like any other.

Strategies (counts ``P`` positive and ``N`` negative distinct unordered pairs):

* ``oversampling`` (default): ``max(P, N)`` positives and as many negatives; the smaller kind
  repeats, each repeat in a fresh order.
* ``undersampling``: ``min(P, N)`` of each.
* ``unique``: every pair exactly once (``P + N`` items).
* ``num_iterations = k`` (overrides the strategy): every text is the anchor of ``k`` positive
  and ``k`` negative pairs, the partner drawn at random (``2·k·n`` items).

Items alternate positive/negative while both kinds remain. Self-pairs ``(i, i)`` count as
positives only with ``include_self_pairs=True``. Multi-label texts (a list of labels each) are
positive when they share at least one label.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ember_train.data.batching import PADDED, BatchLayout, token_counts
from ember_train.models.encoder import Encoder

STRATEGIES = ("oversampling", "undersampling", "unique")
_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash of an integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _key(*parts: int) -> int:
    """Combine integers (seed, stream, cycle, ...) into one 64-bit key."""
    h = 0x243F6A8885A308D3
    for part in parts:
        h = _mix64(h ^ (part & _MASK64))
    return h


def _uniform(key: int, m: int) -> int:
    """A deterministic integer in ``[0, m)`` from a 64-bit key (bias below 2^-40 for m < 2^24)."""
    return _mix64(key) % m


class Permutation:
    """A seeded pseudo-random permutation of ``range(size)`` in O(1) memory.

    A 4-round Feistel network permutes ``[0, 4^h)`` (the smallest power of four >= size); values
    that land outside ``[0, size)`` are encrypted again ("cycle walking"), which keeps it a
    bijection on ``[0, size)``. Fewer than four rounds of walking are needed on average.
    """

    def __init__(self, size: int, key: int) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        half = max(1, ((max(size - 1, 1)).bit_length() + 1) // 2)
        self._half = half
        self._mask = (1 << half) - 1
        self._keys = [_key(key, r) for r in range(4)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self._half, x & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << self._half) | right

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.size:
            raise IndexError(f"{i} is outside [0, {self.size})")
        x = self._encrypt(i)
        while x >= self.size:
            x = self._encrypt(x)
        return x


class _SingleLabelIndex:
    """Random access to positive/negative pairs when each text has one label.

    Texts are sorted by label (``order``); in that order a label is one contiguous block
    ``[start, end)``. A pair ``(s, t)``, ``s < t`` in sorted positions, is positive iff
    ``t < end(s)``. Row ``s`` therefore has ``end(s) - s - 1`` positive partners after it and
    ``n - end(s)`` negative ones, and the ``m``-th pair of a kind is found by a binary search
    over the cumulative row counts. Memory: five int64 arrays of length ``n``.
    """

    def __init__(self, label_ids: np.ndarray, include_self: bool) -> None:
        n = len(label_ids)
        self.n = n
        self.include_self = include_self
        self.order = np.argsort(label_ids, kind="stable").astype(np.int64)
        self.rank = np.empty(n, dtype=np.int64)
        self.rank[self.order] = np.arange(n, dtype=np.int64)
        sorted_ids = label_ids[self.order]
        # Block boundaries of each sorted position.
        change = np.flatnonzero(np.diff(sorted_ids)) + 1
        starts = np.concatenate([[0], change]).astype(np.int64)
        ends = np.concatenate([change, [n]]).astype(np.int64)
        block = np.repeat(np.arange(len(starts)), ends - starts)
        self.start = starts[block]
        self.end = ends[block]
        positions = np.arange(n, dtype=np.int64)
        pos_rows = self.end - positions - (0 if include_self else 1)
        neg_rows = n - self.end
        self.cum_pos = np.cumsum(pos_rows)
        self.cum_neg = np.cumsum(neg_rows)
        self.n_pos = int(self.cum_pos[-1]) if n else 0
        self.n_neg = int(self.cum_neg[-1]) if n else 0

    def _row(self, cum: np.ndarray, m: int) -> tuple[int, int]:
        s = int(np.searchsorted(cum, m, side="right"))
        before = int(cum[s - 1]) if s else 0
        return s, m - before

    def positive(self, m: int) -> tuple[int, int]:
        s, offset = self._row(self.cum_pos, m)
        t = s + offset + (0 if self.include_self else 1)
        return int(self.order[s]), int(self.order[t])

    def negative(self, m: int) -> tuple[int, int]:
        s, offset = self._row(self.cum_neg, m)
        t = int(self.end[s]) + offset
        return int(self.order[s]), int(self.order[t])

    def has_positive_partner(self, i: int) -> bool:
        s = self.rank[i]
        return self.include_self or self.end[s] - self.start[s] > 1

    def has_negative_partner(self, i: int) -> bool:
        s = self.rank[i]
        return self.end[s] - self.start[s] < self.n

    def random_positive_partner(self, i: int, key: int) -> int:
        s = int(self.rank[i])
        start, end = int(self.start[s]), int(self.end[s])
        if self.include_self:
            return int(self.order[start + _uniform(key, end - start)])
        u = start + _uniform(key, end - start - 1)
        return int(self.order[u + 1 if u >= s else u])

    def random_negative_partner(self, i: int, key: int) -> int:
        s = int(self.rank[i])
        start, end = int(self.start[s]), int(self.end[s])
        u = _uniform(key, self.n - (end - start))
        return int(self.order[u if u < start else u + (end - start)])


class _MultiLabelIndex:
    """Random access to pairs when texts carry label sets (positive = at least one shared label).

    For text ``s`` the positive partners are the union of the member lists of its labels (CSR
    arrays, memory ``O(total labels)``); row counts over ``t > s`` are computed once, one row at a
    time, so memory stays ``O(n)`` while the one-off time is ``O(sum of union sizes)``.
    """

    def __init__(self, label_sets: Sequence[Sequence[int]], num_labels: int, include_self: bool) -> None:
        n = len(label_sets)
        self.n = n
        self.include_self = include_self
        lengths = np.array([len(s) for s in label_sets], dtype=np.int64)
        self.ex_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.fromiter((lab for s in label_sets for lab in s), dtype=np.int64, count=int(lengths.sum()))
        self.ex_labels = flat
        owners = np.repeat(np.arange(n, dtype=np.int64), lengths)
        by_label = np.argsort(flat, kind="stable")
        self.members = owners[by_label]  # sorted by label, then by text index
        counts = (
            np.bincount(flat, minlength=num_labels) if len(flat) else np.zeros(num_labels, dtype=np.int64)
        )
        self.label_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        pos_rows = np.empty(n, dtype=np.int64)
        for s in range(n):
            partners = self._positives_after(s)
            pos_rows[s] = len(partners)
        after = n - np.arange(n, dtype=np.int64) - 1
        self_pairs = np.array([int(include_self and lengths[s] > 0) for s in range(n)], dtype=np.int64)
        neg_rows = after - (pos_rows - self_pairs)
        self.cum_pos = np.cumsum(pos_rows)
        self.cum_neg = np.cumsum(neg_rows)
        self.n_pos = int(self.cum_pos[-1]) if n else 0
        self.n_neg = int(self.cum_neg[-1]) if n else 0

    def _positives(self, s: int) -> np.ndarray:
        """Sorted indices sharing a label with ``s`` (including ``s`` itself if it has labels)."""
        labels = self.ex_labels[self.ex_ptr[s] : self.ex_ptr[s + 1]]
        if len(labels) == 0:
            return np.empty(0, dtype=np.int64)
        if len(labels) == 1:
            lab = labels[0]
            return self.members[self.label_ptr[lab] : self.label_ptr[lab + 1]]
        return np.unique(
            np.concatenate([self.members[self.label_ptr[lab] : self.label_ptr[lab + 1]] for lab in labels])
        )

    def _positives_after(self, s: int) -> np.ndarray:
        partners = self._positives(s)
        first = np.searchsorted(partners, s, side="left" if self.include_self else "right")
        return partners[first:]

    def _row(self, cum: np.ndarray, m: int) -> tuple[int, int]:
        s = int(np.searchsorted(cum, m, side="right"))
        before = int(cum[s - 1]) if s else 0
        return s, m - before

    def positive(self, m: int) -> tuple[int, int]:
        s, offset = self._row(self.cum_pos, m)
        return s, int(self._positives_after(s)[offset])

    def negative(self, m: int) -> tuple[int, int]:
        s, offset = self._row(self.cum_neg, m)
        # The offset-th index t > s that is not a positive partner ("k-th missing number").
        blocked = self._positives(s)
        blocked = blocked[blocked > s]
        gaps = blocked - (s + 1) - np.arange(len(blocked))
        skipped = int(np.searchsorted(gaps, offset, side="right"))
        return s, s + 1 + offset + skipped

    def has_positive_partner(self, i: int) -> bool:
        partners = self._positives(i)
        return len(partners) > (0 if self.include_self else 1)

    def has_negative_partner(self, i: int) -> bool:
        return len(self._positives(i)) < self.n

    def random_positive_partner(self, i: int, key: int) -> int:
        partners = self._positives(i)
        if not self.include_self:
            partners = partners[partners != i]
        return int(partners[_uniform(key, len(partners))])

    def random_negative_partner(self, i: int, key: int) -> int:
        blocked = np.union1d(self._positives(i), [i])  # never pair a text with itself as a negative
        free = self.n - len(blocked)
        offset = _uniform(key, free)
        gaps = blocked - np.arange(len(blocked))
        return offset + int(np.searchsorted(gaps, offset, side="right"))


class LabelPairs(Dataset):
    """Pairs generated from labelled texts: ``{"text1", "text2", "label"}`` (1.0 same label, 0.0 not).

    Args:
        texts: the labelled texts.
        labels: one hashable label per text, or (multi-label) a list of labels per text.
        strategy: ``oversampling`` | ``undersampling`` | ``unique`` (see the module docstring).
        num_iterations: if set (> 0), ``k`` positive and ``k`` negative pairs per text instead.
        include_self_pairs: let ``(i, i)`` count as a positive pair.
        seed: the whole sequence of pairs is a function of the seed.
        multi_label: force the label kind; by default a list/tuple/set label means multi-label.
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[Any],
        *,
        strategy: str = "oversampling",
        num_iterations: int | None = None,
        include_self_pairs: bool = False,
        seed: int = 0,
        multi_label: bool | None = None,
    ) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if num_iterations is not None and num_iterations < 0:
            raise ValueError("num_iterations must be >= 0 (0 or None: use the strategy)")
        if len(texts) < 2:
            raise ValueError("pair generation needs at least 2 texts")
        self.texts = texts
        self.strategy = strategy
        self.num_iterations = num_iterations or None
        self.include_self_pairs = include_self_pairs
        self.seed = seed
        if multi_label is None:
            multi_label = any(isinstance(lab, list | tuple | set | frozenset) for lab in labels)
        self.multi_label = multi_label
        if multi_label:
            vocab: dict[Hashable, int] = {}
            sets = [sorted({vocab.setdefault(lab, len(vocab)) for lab in _as_set(x)}) for x in labels]
            self._index: _SingleLabelIndex | _MultiLabelIndex = _MultiLabelIndex(
                sets, len(vocab), include_self_pairs
            )
        else:
            vocab = {}
            ids = np.fromiter(
                (vocab.setdefault(lab, len(vocab)) for lab in labels), dtype=np.int64, count=len(labels)
            )
            self._index = _SingleLabelIndex(ids, include_self_pairs)
        self.n_positive = self._index.n_pos
        self.n_negative = self._index.n_neg
        if self.n_positive == 0:
            raise ValueError(
                "no positive pairs: every label has a single text (give at least two texts of some label, "
                "or set pairs.include_self_pairs: true to pair each text with itself)"
            )
        if self.n_negative == 0:
            raise ValueError("no negative pairs: every text shares a label with every other text")
        if self.num_iterations:
            self.n_pos_items = self.n_neg_items = self.num_iterations * len(texts)
        elif strategy == "oversampling":
            self.n_pos_items = self.n_neg_items = max(self.n_positive, self.n_negative)
        elif strategy == "undersampling":
            self.n_pos_items = self.n_neg_items = min(self.n_positive, self.n_negative)
        else:
            self.n_pos_items, self.n_neg_items = self.n_positive, self.n_negative
        # Permutations are created on demand and cached per (kind, cycle); a handful at most.
        self._perms: dict[tuple[int, int], Permutation] = {}

    def __len__(self) -> int:
        return self.n_pos_items + self.n_neg_items

    def _kind_and_rank(self, k: int) -> tuple[int, int]:
        """Item ``k`` -> (kind 1=positive / 0=negative, its rank among items of that kind)."""
        both = min(self.n_pos_items, self.n_neg_items)
        if k < 2 * both:
            return (1 if k % 2 == 0 else 0), k // 2
        rest = k - both  # past the alternating part only the larger kind is left
        return (1 if self.n_pos_items > self.n_neg_items else 0), rest

    def _perm(self, kind: int, cycle: int, size: int) -> Permutation:
        key = (kind, cycle)
        perm = self._perms.get(key)
        if perm is None:
            if len(self._perms) > 64:
                self._perms.clear()
            perm = self._perms[key] = Permutation(size, _key(self.seed, kind, cycle))
        return perm

    def pair(self, k: int) -> tuple[int, int, float]:
        """Indices ``(i, j)`` and the target of item ``k``."""
        if not 0 <= k < len(self):
            raise IndexError(f"pair {k} is outside [0, {len(self)})")
        kind, r = self._kind_and_rank(k)
        if self.num_iterations:
            return self._anchor_pair(kind, r, k)
        size = self.n_positive if kind else self.n_negative
        cycle, pos = divmod(r, size)
        m = self._perm(kind, cycle, size)(pos)
        i, j = self._index.positive(m) if kind else self._index.negative(m)
        return i, j, float(kind)

    def _anchor_pair(self, kind: int, r: int, k: int) -> tuple[int, int, float]:
        n = len(self.texts)
        round_, slot = divmod(r, n)
        anchor = self._perm(2 + kind, round_, n)(slot)
        key = _key(self.seed, 7, k)
        index = self._index
        if kind and index.has_positive_partner(anchor):
            return anchor, index.random_positive_partner(anchor, key), 1.0
        if not kind and index.has_negative_partner(anchor):
            return anchor, index.random_negative_partner(anchor, key), 0.0
        # This anchor has no partner of the needed kind (e.g. the only text of its label):
        # use a random pair of that kind, so the counts and the balance stay exact.
        m = _uniform(key, self.n_positive if kind else self.n_negative)
        i, j = index.positive(m) if kind else index.negative(m)
        return i, j, float(kind)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, j, target = self.pair(int(k))
        return {"text1": self.texts[i], "text2": self.texts[j], "label": target}


def _as_set(label: Any) -> list[Hashable]:
    if isinstance(label, list | tuple | set | frozenset):
        return list(label)
    return [label]


class PairBatchSampler:
    """Global batches over a :class:`LabelPairs` (or any sized dataset) in O(1) memory.

    The shared :class:`~ember_train.data.sampler.ShardedBatchSampler` keeps a shuffled list of
    every index, which is fine for a file of examples but not for ``n²`` generated pairs. This
    one computes batch ``b`` of epoch ``e`` on demand: items are taken in (positive, negative)
    couples ``(2c, 2c + 1)``, the couples in a seeded permutation per epoch (an odd last item
    comes last). So batches stay balanced between positives and negatives, each epoch has its
    own order, and ``set_epoch`` with ``start_batch`` resumes exactly where a checkpoint stopped.
    Each process gets a contiguous, near-equal slice of every global batch (the layout of
    ShardedBatchSampler); a last global batch too small to give every process an item is dropped.
    """

    def __init__(
        self, num_items: int, batch_size: int, *, world_size: int = 1, rank: int = 0, seed: int = 0
    ) -> None:
        if num_items < world_size:
            raise ValueError(f"{num_items} items cannot be split across {world_size} processes")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.num_items = num_items
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def __len__(self) -> int:
        size = self.global_batch_size
        batches = -(-self.num_items // size)
        last = self.num_items - (batches - 1) * size
        return batches - 1 if last < self.world_size else batches

    def global_batch(self, b: int) -> list[int]:
        """Item indices of global batch ``b`` in the current epoch."""
        full = self.num_items // 2
        perm = Permutation(full, _key(self.seed, 0x5EED, self.epoch))
        size = self.global_batch_size
        out = []
        for t in range(b * size, min((b + 1) * size, self.num_items)):
            out.append(2 * perm(t // 2) + t % 2 if t < 2 * full else t)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        w = self.world_size
        for b in range(self.start_batch, len(self)):
            batch = self.global_batch(b)
            n = len(batch)
            yield batch[self.rank * n // w : (self.rank + 1) * n // w]


class TargetPairCollator:
    """Pairs with a cosine target (1/0 or a normalised score) -> two padded slices (or one packed row) + targets.

    Both sides of every pair are tokenized together and sorted by length into the slices, so each
    slice pads to the longest of similar texts: never more padding than one slice per side, and
    much less when lengths vary (Banking77).
    """

    def __init__(self, encoder: Encoder, layout: BatchLayout = PADDED) -> None:
        self.encoder = encoder
        self.layout = layout

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [it["text1"] for it in items] + [it["text2"] for it in items]
        slices, order = self.layout.tokenize(self.encoder, texts, None)
        return {
            "slices": slices,
            "order": order,
            "label": torch.tensor([float(it["label"]) for it in items]),
            "token_counts": token_counts(*slices),  # on the host, before the batch moves to a GPU
        }
