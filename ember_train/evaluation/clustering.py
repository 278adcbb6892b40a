"""Clustering: MiniBatchKMeans with k = number of gold labels, scored by V-measure (MTEB protocol).

MTEB: ``MiniBatchKMeans(n_clusters=len(set(labels)), batch_size=500, n_init="auto")`` seeded
with 42, V-measure per set of texts, mean over sets. A task may hold several sets (MTEB's
clustering datasets are lists of sets); the headline is ``v_measure`` ×100.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from ember_train.evaluation import metrics as M
from ember_train.evaluation.base import EvalResult, Evaluator, SupportsEncode, encode, percent


class ClusteringEvaluator(Evaluator):
    task_type = "Clustering"

    def __init__(
        self,
        texts: Sequence[str] | Sequence[Sequence[str]],
        labels: Sequence[Hashable] | Sequence[Sequence[Hashable]],
        *,
        name: str = "clustering",
        split: str = "test",
        batch_size: int = 64,
        clustering_batch_size: int = 500,
        seed: int = 42,
    ) -> None:
        if texts and isinstance(texts[0], str):
            sets, label_sets = [list(texts)], [list(labels)]
        else:
            sets, label_sets = [list(t) for t in texts], [list(lab) for lab in labels]
        if len(sets) != len(label_sets) or any(
            len(t) != len(lab) for t, lab in zip(sets, label_sets, strict=True)
        ):
            raise ValueError(f"{name}: texts and labels differ in length")
        if not sets or any(len(t) < 2 for t in sets):
            raise ValueError(f"{name}: every set needs at least 2 texts")
        self.sets = sets
        self.label_sets = label_sets
        self.name = name
        self.split = split
        self.batch_size = batch_size
        self.clustering_batch_size = clustering_batch_size
        self.seed = seed

    def __call__(self, encoder: SupportsEncode) -> EvalResult:
        from sklearn.cluster import MiniBatchKMeans

        scores = []
        for texts, labels in zip(self.sets, self.label_sets, strict=True):
            emb = encode(encoder, texts, batch_size=self.batch_size).numpy()
            k = len(set(labels))
            model = MiniBatchKMeans(
                n_clusters=k, batch_size=self.clustering_batch_size, n_init="auto", random_state=self.seed
            )
            assignment = model.fit_predict(emb)
            scores.append(M.v_measure(labels, assignment))
        return EvalResult(
            task_type=self.task_type,
            dataset=self.name,
            split=self.split,
            metrics=percent({"v_measure": float(np.mean(scores))}),
            main_metric="v_measure",
            extra={"v_measure_per_set": [100.0 * s for s in scores], "num_sets": len(self.sets)},
        )
