"""Classification: a linear probe on frozen embeddings, few-shot, repeated (MTEB protocol).

MTEB's ``AbsTaskClassification`` (logReg method), reproduced step by step:

* ``n_experiments = 10`` experiments, ``samples_per_label = 8``.
* Undersampling: an index array ``arange(len(train))`` is shuffled *in place* at the start of
  every experiment (so experiment ``i`` sees the array shuffled ``i + 1`` times), and the first
  8 indices of each label in that order are taken. MTEB re-seeds NumPy's global RNG with the
  seed (42) before each shuffle (the task seeds it once, then every evaluator's constructor
  again), so each shuffle applies the same seed-42 permutation; we use a private
  ``np.random.RandomState(seed)`` per shuffle, which draws the same permutation without
  touching global state.
* ``LogisticRegression(random_state=seed, max_iter=100)`` fit on the sampled train embeddings;
  the whole test split (not subsampled) is predicted; accuracy, macro-F1 and weighted-F1.
* Scores are averaged over the experiments; ``accuracy`` is the headline (×100).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from ember_train.evaluation.base import EvalResult, Evaluator, SupportsEncode, encode, percent


def undersample(
    labels: Sequence[Hashable], samples_per_label: int, rng_seed: int, idxs: np.ndarray | None = None
) -> tuple[list[int], np.ndarray]:
    """One experiment's draw: shuffle ``idxs`` in place (seeded) and take ``samples_per_label`` per label.

    Returns the chosen row indices (in shuffled order) and the shuffled index array, which the
    next experiment shuffles again.
    """
    if idxs is None:
        idxs = np.arange(len(labels))
    np.random.RandomState(rng_seed).shuffle(idxs)
    taken: dict[Hashable, int] = defaultdict(int)
    chosen = []
    for i in idxs:
        label = labels[i]
        if taken[label] < samples_per_label:
            chosen.append(int(i))
            taken[label] += 1
    return chosen, idxs


def experiment_samples(
    labels: Sequence[Hashable], *, n_experiments: int = 10, samples_per_label: int = 8, seed: int = 42
) -> list[list[int]]:
    """The training rows of every experiment, reproducible from ``seed`` alone."""
    idxs = None
    draws = []
    for _ in range(n_experiments):
        chosen, idxs = undersample(labels, samples_per_label, seed, idxs)
        draws.append(chosen)
    return draws


class ClassificationEvaluator(Evaluator):
    """Few-shot logistic-regression probe; labels may be strings or ints."""

    task_type = "Classification"

    def __init__(
        self,
        train_texts: Sequence[str],
        train_labels: Sequence[Hashable],
        test_texts: Sequence[str],
        test_labels: Sequence[Hashable],
        *,
        name: str = "classification",
        split: str = "test",
        n_experiments: int = 10,
        samples_per_label: int = 8,
        max_iter: int = 100,
        seed: int = 42,
        batch_size: int = 64,
    ) -> None:
        if len(train_texts) != len(train_labels) or len(test_texts) != len(test_labels):
            raise ValueError(f"{name}: texts and labels differ in length")
        if not train_texts or not test_texts:
            raise ValueError(f"{name}: empty train or test split")
        self.train_texts = list(train_texts)
        self.train_labels = list(train_labels)
        self.test_texts = list(test_texts)
        self.test_labels = list(test_labels)
        self.name = name
        self.split = split
        self.n_experiments = n_experiments
        self.samples_per_label = samples_per_label
        self.max_iter = max_iter
        self.seed = seed
        self.batch_size = batch_size

    def __call__(self, encoder: SupportsEncode) -> EvalResult:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import accuracy_score, f1_score

        draws = experiment_samples(
            self.train_labels,
            n_experiments=self.n_experiments,
            samples_per_label=self.samples_per_label,
            seed=self.seed,
        )
        needed = sorted({i for draw in draws for i in draw})
        train_emb = encode(encoder, [self.train_texts[i] for i in needed], batch_size=self.batch_size).numpy()
        row_of = {i: r for r, i in enumerate(needed)}
        test_emb = encode(encoder, self.test_texts, batch_size=self.batch_size).numpy()
        per_experiment = []
        for draw in draws:
            clf = LogisticRegression(random_state=self.seed, max_iter=self.max_iter)
            with warnings.catch_warnings():
                # max_iter=100 is the protocol; lbfgs often stops there, as it does in MTEB.
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(train_emb[[row_of[i] for i in draw]], [self.train_labels[i] for i in draw])
            pred = clf.predict(test_emb)
            per_experiment.append(
                {
                    "accuracy": accuracy_score(self.test_labels, pred),
                    "f1": f1_score(self.test_labels, pred, average="macro"),
                    "f1_weighted": f1_score(self.test_labels, pred, average="weighted"),
                }
            )
        fractions = {k: float(np.mean([e[k] for e in per_experiment])) for k in per_experiment[0]}
        return EvalResult(
            task_type=self.task_type,
            dataset=self.name,
            split=self.split,
            metrics=percent(fractions),
            main_metric="accuracy",
            extra={
                "accuracy_per_experiment": [100.0 * e["accuracy"] for e in per_experiment],
                "num_labels": len(set(self.train_labels)),
                "num_test": len(self.test_labels),
            },
        )


def classification_scores(y_true: list[Any], y_pred: list[Any], multi_label: bool) -> dict[str, float]:
    """Accuracy (exact match for multi-label) and macro-F1, as fractions."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    if multi_label:
        binarizer = MultiLabelBinarizer().fit(list(y_true) + list(y_pred))
        t, p = binarizer.transform(y_true), binarizer.transform(y_pred)
        return {"accuracy": accuracy_score(t, p), "f1": f1_score(t, p, average="macro", zero_division=0)}
    # Labels are compared as they are; macro-F1 averages over every label seen in truth or prediction.
    return {
        "accuracy": accuracy_score(y_true, y_pred),
        "f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
    }


def evaluate_classifier(
    model: Any, data: Any, *, name: str, batch_size: int, threshold: float = 0.5
) -> EvalResult:
    """Accuracy and macro-F1 (``f1``, MTEB's name) ×100 of a classifier (a ``SetFitStyleModel``)
    on labelled texts ``data`` (``texts``, ``labels``, ``multi_label``)."""
    predictions = model.predict(data.texts, batch_size=batch_size, threshold=threshold)
    fractions = classification_scores(data.labels, predictions, data.multi_label)
    return EvalResult(
        task_type="Classification",
        dataset=name,
        split="test",
        metrics=percent(fractions),
        main_metric="accuracy",
        extra={"num_test": len(data), "num_labels": len(model.labels), "multi_label": data.multi_label},
    )
