"""Batch layouts: how a training batch's texts become the encoder's forward inputs.

Two layouts (:class:`BatchLayout`), chosen once per run from ``train.pack_sequences`` and
``train.padded_slices``, and handed to the collators:

* padded slices: the texts sorted by token length and cut into a few slices, each padded to its
  own longest text, where the padded total is least (:func:`padding_optimal_cuts`);
* packed rows: the texts sorted by length and concatenated into one padding-free row
  (:func:`tokenize_packed`); the encoder reads it through :mod:`ember_train.models.packing`.

Either way ``order`` and :func:`restore_order` put the embeddings back in text order. The
gradient cache cuts either into chunks (:func:`split_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import torch

from ember_train.models.encoder import Encoder, TextKind
from ember_train.models.packing import PACKED_KEY, is_packed

if TYPE_CHECKING:
    from ember_train.config.schema import TrainConfig

# The layout's inputs: small, read on the host to build the layout, so the training loop leaves
# them there when it moves a batch to a GPU (reading them back would make the host wait for it).
HOST_KEYS = (PACKED_KEY, "group_sizes")

# Attention blocks per packed row. Attention work grows with a block's texts x width^2, so more
# blocks pad less (Debian pairs, batch 32, not length-grouped: padded attention area 1.57x the
# real one with 2 blocks, 1.27x with 3, 1.18x with 4), but every block is a dozen more operator
# calls forward and backward. One layer's attention, forward and backward (a probe since removed:
# git show 9e4d933:scripts/bench_attention_groups.py): 3 blocks took 0.75x the time of 2 without
# length grouping and 0.94x with it; 4 were no better (0.75x, 1.06x).
ATTENTION_GROUPS = 3


def padding_optimal_cuts(sorted_lengths: Sequence[int], num_slices: int, multiple_of: int = 1) -> list[int]:
    """Where to cut ascending lengths into ``min(num_slices, n)`` non-empty slices, padding least.

    Each slice pads to its last (longest) length, so a slice ``[i, j)`` costs
    ``(j - i) * sorted_lengths[j - 1]`` tokens. Returns the slices' exclusive ends (the last is
    ``n``). The slice count depends only on ``n``, so processes that run one forward per slice
    stay in step. Cuts save padding only where the length changes; a dynamic program over those
    positions (at most one per distinct length, plus the equal-size cuts so that ``k`` slices
    always exist) finds the cheapest set.

    ``multiple_of > 1`` allows only cuts at multiples of it (equal-size cuts when there are too
    few): with the gradient cache's chunk size, no chunk is split by a cut, so every process runs
    ``ceil(n / chunk)`` chunks whatever its texts' lengths (processes with more chunks would make
    the others replay zero-gradient chunks to stay in step, see ``grad_cache_step``).
    """
    n = len(sorted_lengths)
    k = min(num_slices, n)
    if k <= 1:
        return [n] if n else []
    equal = {i * n // k for i in range(1, k)}
    if multiple_of > 1:
        multiples = set(range(multiple_of, n, multiple_of))
        candidates = sorted(multiples if len(multiples) >= k - 1 else equal)
    else:
        changes = {i for i in range(1, n) if sorted_lengths[i - 1] != sorted_lengths[i]}
        candidates = sorted(changes | equal)
    points = torch.tensor([0, *candidates, n], dtype=torch.float64)
    longest = torch.tensor(
        [0, *(sorted_lengths[p - 1] for p in candidates), sorted_lengths[-1]], dtype=torch.float64
    )
    # cost[i, j]: one slice from points[i] to points[j] (i < j); infinite otherwise.
    cost = (points[None, :] - points[:, None]) * longest[None, :]
    cost = cost.masked_fill(~torch.ones_like(cost, dtype=torch.bool).triu(1), float("inf"))
    best = cost[0]  # best[j]: cheapest cover of [0, points[j]) with the slices so far
    choices = []
    for _ in range(k - 1):
        totals = best[:, None] + cost
        best, argbest = totals.min(dim=0)
        choices.append(argbest)
    ends, j = [n], len(candidates) + 1
    for argbest in reversed(choices):
        j = int(argbest[j])
        ends.append(int(points[j]))
    return ends[::-1]


def sort_and_cut(
    lengths: torch.Tensor, num_slices: int, multiple_of: int = 1
) -> tuple[torch.Tensor, list[int]]:
    """``order`` (a stable sort by length) and the ends of the slices of ``lengths[order]``
    (:func:`padding_optimal_cuts`)."""
    order = torch.argsort(lengths, stable=True)
    return order, padding_optimal_cuts(lengths[order].tolist(), num_slices, multiple_of)


def restore_order(sorted_embeddings: Sequence[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """Embeddings of :func:`tokenize_slices` slices (or packed rows), concatenated, back in text order."""
    return torch.cat(list(sorted_embeddings))[torch.argsort(order.to(sorted_embeddings[0].device))]


def tokenize_slices(
    encoder: Encoder,
    texts: Sequence[str],
    kind: TextKind | None = None,
    num_slices: int = 2,
    cut_multiple_of: int = 1,
) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Sort by token length and pad each of ``num_slices`` slices to its own longest text.

    Returns the slices and ``order``: the rows of the slices, concatenated, are
    ``texts[order]``. A batch mixing short and long texts pads far less this way; the slices
    are cut where the padded total is smallest (:func:`padding_optimal_cuts`), so a few long
    texts get a slice of their own instead of padding half the batch (``cut_multiple_of``:
    see :func:`padding_optimal_cuts`). Tokenizes once: each slice is the batch's rows with the
    columns beyond its longest text cut off.
    """
    features = encoder.tokenize(texts, kind)
    lengths = features["attention_mask"].sum(dim=1)
    order, cuts = sort_and_cut(lengths, num_slices, cut_multiple_of)
    left = encoder.tokenizer.padding_side == "left"
    slices, start = [], 0
    for end in cuts:
        rows = order[start:end]
        width = int(lengths[rows].max())
        columns = slice(-width, None) if left else slice(0, width)
        slices.append({k: v[rows][:, columns] for k, v in features.items()})
        start = end
    return slices, order


def tokenize_packed(
    encoder: Encoder,
    texts: Sequence[str],
    kind: TextKind | None = None,
    num_groups: int = ATTENTION_GROUPS,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sort by token length and concatenate into one padding-free row (:mod:`ember_train.models.packing`).

    Returns the packed features and ``order`` as :func:`tokenize_slices` does (rows of the
    output are ``texts[order]``). Attention regroups the texts into ``num_groups`` padded
    blocks cut where that padding is least (:func:`padding_optimal_cuts`).
    """
    prefix = encoder.prefix(kind)
    token_ids = encoder.tokenizer(
        [prefix + t for t in texts], truncation=True, max_length=encoder.max_seq_length
    )["input_ids"]
    order, cuts = sort_and_cut(torch.tensor([len(ids) for ids in token_ids]), num_groups)
    group_sizes = [end - start for start, end in pairwise([0, *cuts])]
    return pack_token_ids([token_ids[i] for i in order.tolist()], group_sizes), order


def pack_token_ids(token_ids: list[list[int]], group_sizes: list[int]) -> dict[str, torch.Tensor]:
    """Packed features from per-text token ids (already in the order they go in) and group sizes."""
    if sum(group_sizes) != len(token_ids):
        raise ValueError(f"group sizes {group_sizes} do not add up to {len(token_ids)} texts")
    return {
        "input_ids": torch.tensor([[t for ids in token_ids for t in ids]], dtype=torch.long),
        PACKED_KEY: torch.tensor([len(ids) for ids in token_ids], dtype=torch.long),
        "group_sizes": torch.tensor(group_sizes, dtype=torch.long),
    }


def split_batch(features: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive batches of at most ``size`` texts each (the gradient cache's chunks).

    Padded features are split by rows; packed ones by texts, each chunk keeping the attention
    groups it overlaps, cut at its own boundaries.
    """
    if not is_packed(features):
        n = features["input_ids"].shape[0]
        return [{k: v[i : i + size] for k, v in features.items()} for i in range(0, n, size)]
    lengths = features[PACKED_KEY].tolist()
    group_ends = torch.cumsum(features["group_sizes"], 0).tolist()
    token_ends = [0, *torch.cumsum(features[PACKED_KEY], 0).tolist()]
    chunks = []
    for start in range(0, len(lengths), size):
        end = min(start + size, len(lengths))
        cuts = sorted({start, end, *(e for e in group_ends if start < e < end)})
        chunks.append(
            {
                "input_ids": features["input_ids"][:, token_ends[start] : token_ends[end]],
                PACKED_KEY: features[PACKED_KEY][start:end],
                "group_sizes": torch.tensor([b - a for a, b in pairwise(cuts)], dtype=torch.long),
            }
        )
    return chunks


@dataclass(frozen=True)
class BatchLayout:
    """How a training batch's texts become forward inputs; one per run, handed to the collators.

    ``padded_slices`` length-sorted padded slices per side (:func:`tokenize_slices`, cut at
    multiples of ``cut_multiple_of``, the gradient cache's chunk size, so no chunk straddles a
    cut), or with ``pack`` one padding-free row per side (:func:`tokenize_packed`).
    """

    pack: bool = False
    padded_slices: int = 2
    cut_multiple_of: int = 1

    @classmethod
    def for_run(cls, train: TrainConfig, encoder: Encoder, device: torch.device) -> BatchLayout:
        """The layout ``train`` asks for, with ``train.pack_sequences`` resolved (:func:`use_packing`)."""
        return cls.from_config(train, use_packing(train.pack_sequences, encoder, device))

    @classmethod
    def from_config(cls, train: TrainConfig, pack: bool) -> BatchLayout:
        """The layout ``train`` asks for, packed or not."""
        return cls(pack, train.padded_slices, max(train.grad_cache_chunk_size, 1))

    def tokenize(
        self, encoder: Encoder, texts: Sequence[str], kind: TextKind | None
    ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        """A training batch's side: the inputs of its forward calls, and ``order``.

        Either way :func:`restore_order` puts the embeddings back in text order.
        ``cut_multiple_of`` applies to the slices only: the gradient cache splits a packed row by
        texts and cuts its attention groups at the chunk boundaries (:func:`split_batch`), so the
        groups need no constraint.
        """
        if self.pack:
            features, order = tokenize_packed(encoder, texts, kind)
            return [features], order
        return tokenize_slices(
            encoder, texts, kind, num_slices=self.padded_slices, cut_multiple_of=self.cut_multiple_of
        )

    def describe(self) -> str:
        """The log line that says which batch layout a run uses."""
        if self.pack:
            return "packed (padding-free, one row per side)"
        slices = self.padded_slices
        return f"padded ({slices} length-sorted slice{'s' if slices > 1 else ''} per side)"


PADDED = BatchLayout()  # the default: two padded slices per side, no cut constraint


def packing_supported(encoder: Encoder) -> bool:
    """Whether ``encoder`` gives the same vectors packed as padded (checked once, on three texts).

    Packing needs a backbone that passes attention keyword arguments to transformers'
    attention functions and takes explicit position ids (BERT- and RoBERTa-style models do);
    anything else is caught here by comparing vectors, not by a list of names.
    """
    cached = getattr(encoder, "_packing_supported", None)
    if cached is not None:
        return cached
    texts = ["packing check", "a somewhat longer text to check packed sequences", "x"]
    device = next(encoder.parameters()).device
    modes = [(module, module.training) for module in encoder.modules()]
    encoder.eval()
    try:
        with torch.no_grad():
            padded = encoder({k: v.to(device) for k, v in encoder.tokenize(texts).items()})
            features, order = tokenize_packed(encoder, texts)
            packed = encoder({k: v.to(device) for k, v in features.items()})[torch.argsort(order).to(device)]
        supported = bool(torch.allclose(padded, packed, atol=1e-4, rtol=1e-3))
    except Exception:  # a backbone that rejects position ids or attention kwargs
        supported = False
    finally:
        for module, training in modes:
            module.training = training
    encoder._packing_supported = supported
    return supported


def use_packing(setting: bool | str, encoder: Encoder, device: torch.device) -> bool:
    """Resolve ``train.pack_sequences`` (``"auto"``, true, false) for this encoder and device.

    ``"auto"`` packs on CPU only: that is where it was measured (faster); on GPUs it is opt-in.
    """
    if setting is False or (setting == "auto" and device.type != "cpu"):
        return False
    supported = packing_supported(encoder)
    if setting is True and not supported:
        raise ValueError(
            "train.pack_sequences=true, but this model does not give the same vectors on packed "
            "(padding-free) batches as on padded ones (it needs BERT/RoBERTa-style absolute positions "
            "and transformers' attention interface); set train.pack_sequences=false or auto"
        )
    return supported


def token_counts(*features: dict[str, torch.Tensor]) -> dict[str, float]:
    """Real and padding token counts of tokenized batches, for throughput and padding logs.

    Packed batches have no padding tokens (attention pads inside its groups, not counted here).
    """
    real = total = 0.0
    for f in features:
        if is_packed(f):
            real += f["input_ids"].shape[1]
            total += f["input_ids"].shape[1]
        else:
            real += float(f["attention_mask"].sum())
            total += f["attention_mask"].numel()
    return {"tokens": real, "padding_tokens": total - real}
