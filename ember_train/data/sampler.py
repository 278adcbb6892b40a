"""Batches that are exact across processes, free of in-batch duplicates, and resumable.

The sampler builds *global* batches (``batch_size × world_size``) and hands each process its
slice. That makes three guarantees easy to state and test:

* every example is seen exactly once per epoch across all processes;
* no text appears twice in a global batch (duplicates are false negatives once negatives are
  gathered across devices);
* the order depends only on ``(seed, epoch)``, so a resumed run skips to the same batch.

With several datasets (``dataset_ids``) the epoch first draws each dataset's share of examples
(``sampling``), then batches them: by default each global batch from one dataset (in-batch
negatives of the same task), or all of them shuffled together (``same_dataset_batches=False``).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterator, Sequence

SAMPLING_MODES = ("proportional", "weighted", "round_robin")

logger = logging.getLogger(__name__)


class ShardedBatchSampler:
    """Yields this process's list of example indices for each global batch.

    Args:
        num_examples: dataset size.
        batch_size: examples per process per batch.
        world_size, rank: the data-parallel layout (1, 0 on one process).
        seed: base seed; the epoch is mixed in so each epoch has its own order.
        dedup_keys: per example, the texts that must not repeat inside a global batch (e.g. the
            query and the positive). An example whose text is already in the batch is deferred to
            a later batch, never dropped.
        lengths: per example, a length or any integer sort key (the contrastive pipeline combines
            document and query tokens). When given, examples are sorted by
            length inside large random buckets (``bucket_batches`` global batches each), so a
            batch pads little while the order stays random at the bucket level.
        drop_last: drop a final global batch smaller than ``batch_size × world_size``. Otherwise it
            is split across processes as evenly as possible; only a remainder smaller than
            ``world_size`` (which cannot give every process an example) is dropped, and logged.
        dataset_ids: per example, the index (0, 1, ...) of the dataset it came from; None: one.
        sampling: how many examples of each dataset an epoch holds. ``proportional``: all of
            them, once (so batches come from each dataset in proportion to its size);
            ``weighted``: the total of all datasets, shared in proportion to ``weights`` (a
            dataset drawn more than its size is repeated in fresh shuffles, one drawn less is
            cut); ``round_robin``: as many from each as the smallest holds, its batches taking
            turns dataset after dataset.
        weights: per dataset, its weight for ``sampling="weighted"``.
        same_dataset_batches: every global batch from one dataset (the last batch of each may be
            smaller); False shuffles the epoch's examples of all datasets together.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        dedup_keys: Sequence[Sequence[str]] | None = None,
        lengths: Sequence[int] | None = None,
        bucket_batches: int = 64,
        drop_last: bool = False,
        dataset_ids: Sequence[int] | None = None,
        sampling: str = "proportional",
        weights: Sequence[float] | None = None,
        same_dataset_batches: bool = True,
    ) -> None:
        if num_examples < world_size:
            raise ValueError(f"{num_examples} examples cannot be split across {world_size} processes")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if dataset_ids is not None and len(dataset_ids) != num_examples:
            raise ValueError(f"dataset_ids has {len(dataset_ids)} entries for {num_examples} examples")
        self.dataset_of = list(dataset_ids) if dataset_ids is not None else [0] * num_examples
        num_datasets = max(self.dataset_of) + 1
        self.members: list[list[int]] = [[] for _ in range(num_datasets)]
        for i, d in enumerate(self.dataset_of):
            self.members[d].append(i)
        if any(len(m) < (world_size if same_dataset_batches else 1) for m in self.members):
            sizes = [len(m) for m in self.members]
            raise ValueError(f"every dataset needs at least {world_size} examples, got sizes {sizes}")
        weights = list(weights) if weights is not None else [1.0] * num_datasets
        if len(weights) != num_datasets or any(w < 0 for w in weights) or not sum(weights) > 0:
            raise ValueError(f"weights must be {num_datasets} numbers >= 0, not all 0; got {weights}")
        self.sampling = sampling
        self.weights = weights
        self.same_dataset_batches = same_dataset_batches
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.dedup_keys = dedup_keys
        self.lengths = lengths
        self.bucket_batches = bucket_batches
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; ``start_batch`` skips batches already trained (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def num_datasets(self) -> int:
        return len(self.members)

    def quotas(self) -> list[int]:
        """Examples drawn from each dataset per epoch (see ``sampling``)."""
        sizes = [len(m) for m in self.members]
        if self.sampling == "proportional":
            return sizes
        if self.sampling == "round_robin":
            return [min(sizes)] * len(sizes)
        # weighted: the total shared by weight; largest remainders get the leftover examples
        total, weight_sum = sum(sizes), sum(self.weights)
        exact = [total * w / weight_sum for w in self.weights]
        quotas = [int(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda d: (quotas[d] - exact[d], d))
        for d in by_remainder[: total - sum(quotas)]:
            quotas[d] += 1
        return quotas

    def _draw(self, rng: random.Random, members: list[int], quota: int) -> list[int]:
        """``quota`` examples of one dataset: shuffled passes over it, the last one cut."""
        drawn: list[int] = []
        while len(drawn) < quota:
            order = list(members)
            if self.shuffle:
                rng.shuffle(order)
            drawn.extend(order[: quota - len(drawn)])
        return drawn

    def _bucket(self, order: list[int]) -> list[int]:
        if self.lengths is None:
            return order
        bucket = self.global_batch_size * self.bucket_batches
        lengths = self.lengths
        return [
            i
            for start in range(0, len(order), bucket)
            for i in sorted(order[start : start + bucket], key=lambda j: lengths[j])
        ]

    def _fill(self, order: list[int]) -> list[list[int]]:
        """Cut ``order`` into global batches without a repeated text (see ``dedup_keys``)."""
        size = self.global_batch_size
        batches: list[list[int]] = []
        # Greedy fill in order; an example whose text is already in the batch is carried to the
        # front of the next batch (linear time: each batch scans only the carried examples).
        carry: deque[int] = deque()
        pos = 0
        while pos < len(order) or carry:
            batch: list[int] = []
            seen: set[str] = set()
            conflicted: list[int] = []
            while len(batch) < size and (carry or pos < len(order)):
                if carry:
                    idx = carry.popleft()
                else:
                    idx = order[pos]
                    pos += 1
                keys = self.dedup_keys[idx] if self.dedup_keys is not None else ()
                if any(k in seen for k in keys):
                    conflicted.append(idx)
                else:
                    seen.update(keys)
                    batch.append(idx)
            carry.extendleft(reversed(conflicted))
            batches.append(batch)
        if batches and (len(batches[-1]) < self.world_size or self.drop_last and len(batches[-1]) < size):
            logger.warning("dropping %d examples of an incomplete last batch this epoch", len(batches[-1]))
            batches.pop()
        return batches

    def _batches(self, rng: random.Random, order: list[int]) -> list[list[int]]:
        batches = self._fill(self._bucket(order))
        if self.lengths is not None and self.shuffle:
            # Sorting made neighbouring batches similar in length; shuffle the batch order.
            rng.shuffle(batches)
        return batches

    def _global_batches(self, epoch: int | None = None) -> list[list[int]]:
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = random.Random(self.seed * 1_000_003 + epoch)
        drawn = [self._draw(rng, m, q) for m, q in zip(self.members, self.quotas(), strict=True)]
        if len(drawn) == 1 or not self.same_dataset_batches:
            order = [i for d in drawn for i in d]
            if len(drawn) > 1 and self.shuffle:
                rng.shuffle(order)
            batches = self._batches(rng, order)
        else:
            per_dataset = [self._batches(rng, d) for d in drawn]
            if self.sampling == "round_robin":  # take turns: a batch of each dataset in order
                rounds = max(len(b) for b in per_dataset)
                batches = [b[i] for i in range(rounds) for b in per_dataset if i < len(b)]
            else:
                batches = [b for dataset_batches in per_dataset for b in dataset_batches]
                if self.shuffle:
                    rng.shuffle(batches)
        self._cache = (epoch, batches)
        return batches

    def dataset_counts(self, epoch: int, num_batches: int | None = None) -> list[int]:
        """Examples of each dataset in the first ``num_batches`` global batches of ``epoch`` (all
        processes together): what a run trained on, exactly, since the order is fixed."""
        counts = [0] * self.num_datasets
        for batch in self._global_batches(epoch)[:num_batches]:
            for i in batch:
                counts[self.dataset_of[i]] += 1
        return counts

    def dataset_batches(self, epoch: int) -> list[int]:
        """Global batches of ``epoch`` that hold examples of each dataset."""
        counts = [0] * self.num_datasets
        for batch in self._global_batches(epoch):
            for d in {self.dataset_of[i] for i in batch}:
                counts[d] += 1
        return counts

    def size_warnings(self, unit: str = "examples", min_useful: int = 2) -> tuple[list[str], bool]:
        """What a user should know about the global batches before training on them, and whether
        every batch is too small to learn from (in-batch negatives need ``min_useful`` examples)."""
        sizes = [len(b) for b in self._global_batches()]
        if not sizes:
            return [], True
        notes = []
        if self.num_examples < self.global_batch_size:
            notes.append(
                f"only {self.num_examples} {unit}: a batch holds at most {max(sizes)}, not "
                f"{self.global_batch_size} (train.batch_size x processes)"
            )
        small = sum(size < min_useful for size in sizes)
        if small:
            notes.append(
                f"{small} of {len(sizes)} batches hold fewer than {min_useful} {unit} with distinct texts "
                "(a repeated text waits for a later batch, never meeting itself as a negative): with "
                "in-batch negatives alone their loss is 0"
            )
        return notes, small == len(sizes)

    def _shard(self, batch: list[int]) -> list[int]:
        # Contiguous, near-equal slices: rank r gets the r-th slice of the global batch.
        n, w = len(batch), self.world_size
        start = self.rank * n // w
        end = (self.rank + 1) * n // w
        return batch[start:end]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches()[self.start_batch :]:
            yield self._shard(batch)

    def __len__(self) -> int:
        return len(self._global_batches())
