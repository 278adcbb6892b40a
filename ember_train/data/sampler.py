"""Batches that are exact across processes, free of in-batch duplicates, and resumable.

The sampler builds *global* batches (``batch_size × world_size``) and hands each process its
slice. That makes three guarantees easy to state and test:

* every example is seen exactly once per epoch across all processes;
* no text appears twice in a global batch (duplicates are false negatives once negatives are
  gathered across devices);
* the order depends only on ``(seed, epoch)``, so a resumed run skips to the same batch.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterator, Sequence

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
    ) -> None:
        if num_examples < world_size:
            raise ValueError(f"{num_examples} examples cannot be split across {world_size} processes")
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

    def _order(self, rng: random.Random) -> list[int]:
        order = list(range(self.num_examples))
        if self.shuffle:
            rng.shuffle(order)
        if self.lengths is not None:
            bucket = self.global_batch_size * self.bucket_batches
            lengths = self.lengths
            order = [
                i
                for start in range(0, len(order), bucket)
                for i in sorted(order[start : start + bucket], key=lambda j: lengths[j])
            ]
        return order

    def _global_batches(self) -> list[list[int]]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = self._order(rng)
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
        if self.lengths is not None and self.shuffle:
            # Sorting made neighbouring batches similar in length; shuffle the batch order.
            rng.shuffle(batches)
        self._cache = (self.epoch, batches)
        return batches

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
