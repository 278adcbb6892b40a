"""Hard negatives mined with the model being trained: before step 0 and/or again every N steps or epochs.

The contrastive recipe's ``mining:`` section. Each pass runs :func:`mine_hard_negatives` (the
miner of ``ember-train mine``, with its filters: positives and the query itself excluded,
near-duplicates of the positive dropped by ``margin``/``max_score_ratio``, candidates taken from
a rank window) over the training pairs with the current weights, and replaces every example's
negatives in place. It is a :class:`~ember_train.training.loop.DataRefresh` hook of the training
loop, so the loop restarts its data iterator after a pass and no batch built earlier is used.

* Every process runs each pass: each embeds 1/N of the texts and all get every vector
  (:func:`~ember_train.training.distributed.map_sharded`), so all mine the same negatives.
* The model is in eval mode without gradients while it embeds (``Encoder.encode``), and back in
  train mode after; no global random number is drawn, so dropout masks are those of a run
  without mining.
* Exact resume: the mined negatives are saved with every checkpoint (``refresh_state.json``:
  the distinct negative texts and each example's indices into them) and restored on resume; a
  resumed run never re-mines what the checkpoint holds, it uses the saved negatives.
* A query whose candidates are all filtered out keeps its previous negatives; before training,
  with none to keep, it gets random training documents that are not its positives (both
  counted in each pass's log), so that every query has ``num_negatives``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from ember_train.data.pairs import PairExample
from ember_train.data.reader import DataError
from ember_train.evaluation.base import SupportsEncode
from ember_train.evaluation.mining import MiningSettings, fold_text
from ember_train.training.distributed import ShardedEncoder

logger = logging.getLogger(__name__)


@dataclass
class MiningConfig(MiningSettings):
    """The contrastive recipe's ``mining:`` section: hard negatives mined with the model being trained."""

    before_training: bool = False  # mine with the starting model before step 0 (the data needs no `neg`)
    every_steps: int = 0  # re-mine after every N optimizer steps (0: not by steps)
    every_epochs: int = 0  # re-mine after every N epochs (0: not by epochs)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.every_steps < 0:
            raise ValueError(f"every_steps must be >= 0 (0: never), got {self.every_steps}")
        if self.every_epochs < 0:
            raise ValueError(f"every_epochs must be >= 0 (0: never), got {self.every_epochs}")
        if self.every_steps and self.every_epochs:
            raise ValueError("set every_steps or every_epochs, not both")

    @property
    def enabled(self) -> bool:
        return self.before_training or self.every_steps > 0 or self.every_epochs > 0


class NegativeRemining:
    """The training loop's hook that re-mines ``examples``' negatives with ``encoder`` when due.

    Due at step 0 with ``before_training``, and at every multiple of the cadence in steps
    (``every_epochs`` counts ``steps_per_epoch`` steps an epoch); never twice at one step.
    """

    def __init__(
        self,
        examples: list[PairExample],
        encoder: SupportsEncode,
        settings: MiningConfig,
        *,
        num_negatives: int,
        seed: int,
        steps_per_epoch: int,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        log: Callable[[str], None] = logger.info,
        show_progress: bool = False,
    ) -> None:
        self.examples = examples
        self.encoder = encoder
        self.settings = settings
        self.num_negatives = num_negatives
        self.seed = seed
        self.every = settings.every_steps or settings.every_epochs * steps_per_epoch
        self.autocast = autocast
        self.log = log
        self.show_progress = show_progress
        self.mined_at: int | None = None  # the step of the last pass
        self.passes: list[dict[str, Any]] = []  # step, rows_changed, kept_previous, random, seconds
        self._corpus: list[str] | None = None  # for random negatives, built when first needed

    def due(self, step: int) -> bool:
        if step == self.mined_at:
            return False
        if step == 0:
            return self.settings.before_training
        return self.every > 0 and step % self.every == 0

    def __call__(self, step: int) -> bool:
        if not self.due(step):
            return False
        start = time.perf_counter()
        s = self.settings
        with self.autocast():
            mined, stats = s.mine(
                ShardedEncoder(self.encoder),
                [{"query": e.query, "pos": e.positive} for e in self.examples],
                num_negatives=self.num_negatives,
                seed=self.seed,
                show_progress=self.show_progress,
            )
        changed = kept = drawn = 0
        for example, row in zip(self.examples, mined, strict=True):
            negatives = row["neg"]
            if not negatives and example.negatives:  # every candidate filtered out: keep what it had
                kept += 1
                continue
            if not negatives:  # nothing to keep (before training): documents drawn at random
                negatives = self._random_negatives(example)
                drawn += 1
            changed += negatives != example.negatives
            example.negatives = negatives
        seconds = time.perf_counter() - start
        self.mined_at = step
        self.passes.append(
            {
                "step": step,
                "rows_changed": changed,
                "kept_previous": kept,
                "random": drawn,
                "seconds": seconds,
            }
        )
        self.log(
            f"step {step}: mined hard negatives in {seconds:.1f}s; {changed} of {len(self.examples)} rows "
            f"changed, {kept} kept their previous negatives, {drawn} got random ones ({stats.summary()})"
        )
        return True

    def _random_negatives(self, example: PairExample) -> list[str]:
        """``num_negatives`` distinct training positives that are not this query's, seeded by the query."""
        if self._corpus is None:
            self._corpus = list(dict.fromkeys(e.positive for e in self.examples))
            self._positives_of: dict[str, set[str]] = {}
            for e in self.examples:
                self._positives_of.setdefault(e.query, set()).add(fold_text(e.positive))
        own = self._positives_of[example.query] | {fold_text(example.query)}
        rng = random.Random(f"{self.seed}:{example.query}:random")
        picked: list[str] = []
        for i in rng.sample(range(len(self._corpus)), len(self._corpus)):
            if fold_text(self._corpus[i]) not in own:
                picked.append(self._corpus[i])
                if len(picked) == self.num_negatives:
                    break
        if not picked:
            raise DataError(
                "mining", None, f"query {example.query!r}: no training document but its own positives"
            )
        return picked

    def summary(self) -> dict[str, Any]:
        """For results.json: how many passes, their total time, and each pass."""
        return {
            "passes": len(self.passes),
            "seconds": sum(p["seconds"] for p in self.passes),
            "cadence_steps": self.every,  # 0: before training only
            "before_training": self.settings.before_training,
            "log": list(self.passes),
        }

    def state_dict(self) -> dict[str, Any]:
        """The negatives (distinct texts + each example's indices) and the passes so far: JSON."""
        texts: dict[str, int] = {}
        negatives = [[texts.setdefault(t, len(texts)) for t in e.negatives] for e in self.examples]
        return {
            "mined_at": self.mined_at,
            "passes": self.passes,
            "texts": list(texts),
            "negatives": negatives,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:  # a checkpoint written without this hook: the data's negatives stand
            logger.warning("the checkpoint holds no mined negatives; training goes on with the data's")
            return
        if len(state["negatives"]) != len(self.examples):
            raise ValueError(
                f"the checkpoint's mined negatives are for {len(state['negatives'])} examples, "
                f"the data has {len(self.examples)}: resume with the run's data"
            )
        texts = state["texts"]
        for example, indices in zip(self.examples, state["negatives"], strict=True):
            example.negatives = [texts[i] for i in indices]
        self.mined_at = state["mined_at"]
        self.passes = list(state["passes"])
