"""Classification heads on top of the encoder's embeddings (SetFit's second stage).

Every head, however it was fitted, is stored as one linear layer (``logits = W·x + b``) plus
its label list:

* **logistic regression** (default): fitted by scikit-learn on the embeddings, then its
  coefficients are copied into the layer. A binary problem's single logit ``z`` becomes the
  two rows ``[0, z]``, whose softmax is exactly ``[1 - σ(z), σ(z)]``. Multi-label data gets
  one binary regression per label (one-vs-rest), read with a sigmoid per label.
* **differentiable** head: the same layer trained with cross-entropy (or binary cross-entropy
  for multi-label) on frozen embeddings (:func:`fit_linear_head`), or end to end with the body
  through the shared training loop (see the setfit pipeline).

Because the stored form is weights + JSON, loading a head never unpickles code
(``safetensors``), and the predictions do not depend on the installed scikit-learn.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

HEAD_DIR = "head"
HEAD_CONFIG = "head_config.json"
HEAD_WEIGHTS = "head.safetensors"
# A label that is always on (or off) in the training data gets this constant logit.
_CONSTANT_LOGIT = 20.0


class LinearHead(nn.Module):
    """``logits = W·x + b`` over ``labels``; softmax (single-label) or sigmoid per label (multi-label)."""

    def __init__(
        self, dim: int, labels: Sequence[Hashable], *, multi_label: bool = False, kind: str = "linear"
    ) -> None:
        super().__init__()
        labels = list(labels)
        if len(labels) < (1 if multi_label else 2):
            raise ValueError(f"a classification head needs at least 2 labels, got {labels}")
        if len(set(labels)) != len(labels):
            raise ValueError("labels must be distinct")
        for label in labels:
            if not isinstance(label, str | int) or isinstance(label, bool):
                raise ValueError(f"labels must be strings or integers to be saved, got {label!r}")
        self.linear = nn.Linear(dim, len(labels))
        self.labels = labels
        self.multi_label = multi_label
        self.kind = kind  # "logistic_regression" or "linear": how it was fitted (for the card)
        self._label_index = {label: i for i, label in enumerate(labels)}

    @property
    def dim(self) -> int:
        return self.linear.in_features

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings.to(self.linear.weight.dtype))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)

    @torch.no_grad()
    def predict_proba(self, embeddings: torch.Tensor | np.ndarray) -> np.ndarray:
        """``[N, num_labels]`` probabilities, columns in ``self.labels`` order."""
        x = _float_rows(embeddings, self.linear.weight.device)
        return self.probabilities(self(x)).float().cpu().numpy()

    def predict(self, embeddings: torch.Tensor | np.ndarray, threshold: float = 0.5) -> list[Any]:
        """One label per text, or (multi-label) the list of labels whose probability >= ``threshold``."""
        proba = self.predict_proba(embeddings)
        if self.multi_label:
            return [[self.labels[j] for j in np.flatnonzero(row >= threshold)] for row in proba]
        return [self.labels[j] for j in proba.argmax(axis=1)]

    def targets(self, labels: Sequence[Any]) -> torch.Tensor:
        """Training targets: class ids ``[N]`` (single-label) or a 0/1 matrix ``[N, L]`` (multi-label)."""
        try:
            if not self.multi_label:
                return torch.tensor([self._label_index[label] for label in labels], dtype=torch.long)
            out = torch.zeros(len(labels), len(self.labels))
            for row, label_set in enumerate(labels):
                for label in label_set:
                    out[row, self._label_index[label]] = 1.0
            return out
        except KeyError as e:
            raise ValueError(f"label {e.args[0]!r} is not one of the head's labels {self.labels}") from None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (single-label) or binary cross-entropy per label (multi-label), in fp32."""
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
        return F.cross_entropy(logits.float(), targets)

    def save(self, directory: str | Path) -> Path:
        """Write ``head_config.json`` + ``head.safetensors`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        config = {"dim": self.dim, "labels": self.labels, "multi_label": self.multi_label, "kind": self.kind}
        (out / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        state = {
            k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.linear.state_dict().items()
        }
        save_file(state, str(out / HEAD_WEIGHTS))
        return out

    @classmethod
    def load(cls, directory: str | Path) -> LinearHead:
        root = Path(directory)
        config_file = root / HEAD_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{root}: no classification head here (missing {HEAD_CONFIG})")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        head = cls(
            config["dim"],
            config["labels"],
            multi_label=config["multi_label"],
            kind=config.get("kind", "linear"),
        )
        head.linear.load_state_dict(load_file(str(root / HEAD_WEIGHTS)))
        return head


def label_list(labels: Sequence[Any], multi_label: bool) -> list[Hashable]:
    """The distinct labels, sorted when they are comparable (else in order of first appearance)."""
    seen: dict[Hashable, None] = {}
    for label in labels:
        for one in label if multi_label else [label]:
            seen.setdefault(one, None)
    try:
        return sorted(seen)
    except TypeError:
        return list(seen)


def _float_rows(embeddings: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Embeddings as a float32 tensor on ``device``; a tensor moves directly (a CUDA one has no NumPy view)."""
    x = embeddings if isinstance(embeddings, torch.Tensor) else torch.from_numpy(np.asarray(embeddings))
    return x.to(device=device, dtype=torch.float32)


def fit_logistic_regression(
    embeddings: np.ndarray | torch.Tensor,
    labels: Sequence[Any],
    *,
    multi_label: bool = False,
    classes: Sequence[Hashable] | None = None,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> LinearHead:
    """Fit scikit-learn's ``LogisticRegression`` (one-vs-rest for multi-label) and return it as a LinearHead."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = _float_rows(embeddings, "cpu").numpy()
    classes = list(classes) if classes is not None else label_list(labels, multi_label)
    with torch.random.fork_rng(devices=[]):  # its init is overwritten; leave the training RNG alone
        head = LinearHead(x.shape[1], classes, multi_label=multi_label, kind="logistic_regression")
    weight = np.zeros((len(classes), x.shape[1]), dtype=np.float64)
    bias = np.zeros(len(classes), dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if multi_label:
            y = head.targets(labels).numpy()
            for j in range(len(classes)):
                column = y[:, j]
                if column.min() == column.max():  # always on / always off in the training data
                    bias[j] = _CONSTANT_LOGIT if column[0] else -_CONSTANT_LOGIT
                    continue
                clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(x, column)
                weight[j], bias[j] = clf.coef_[0], clf.intercept_[0]
        else:
            y = head.targets(labels).numpy()
            present = np.unique(y)
            if len(present) < 2:
                raise ValueError(
                    "logistic regression needs at least two different labels in the training data"
                )
            clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit(x, y)
            if len(clf.classes_) == 2:
                # One logit z for classes_[1]: rows [0, z] reproduce sigmoid(z) under softmax.
                weight[clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
            else:
                weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
            # A class the training data lacks can never be predicted.
            missing = np.setdiff1d(np.arange(len(classes)), clf.classes_)
            bias[missing] = -1e4
    with torch.no_grad():
        head.linear.weight.copy_(torch.from_numpy(weight))
        head.linear.bias.copy_(torch.from_numpy(bias))
    return head


def fit_linear_head(
    head: LinearHead,
    embeddings: np.ndarray | torch.Tensor,
    labels: Sequence[Any],
    *,
    epochs: int = 100,
    learning_rate: float = 1e-2,
    weight_decay: float = 0.0,
    batch_size: int = 64,
    seed: int = 0,
) -> list[float]:
    """Train ``head`` in place on frozen embeddings (AdamW, shuffled mini-batches); returns epoch losses.

    The embeddings fit in memory for any realistic labelled set, so this is a few milliseconds
    per epoch and needs none of the training loop's machinery.
    """
    device = head.linear.weight.device
    x = _float_rows(embeddings, device)
    y = head.targets(labels).to(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    was_training = head.training
    head.train()
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = head.loss(head(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
        history.append(total / len(x))
    head.train(was_training)
    return history


def fit_head(encoder: Any, data: Any, cfg: Any, *, seed: int, batch_size: int) -> LinearHead:
    """Fit the head ``cfg`` describes (a SetFit recipe's ``head`` section) on the frozen
    ``encoder``'s embeddings of ``data`` (labelled texts: ``texts``, ``labels``, ``multi_label``)."""
    embeddings = encoder.encode(data.texts, batch_size=batch_size).numpy()
    if cfg.type == "logistic_regression":
        return fit_logistic_regression(
            embeddings, data.labels, multi_label=data.multi_label, C=cfg.C, max_iter=cfg.max_iter, seed=seed
        )
    with torch.random.fork_rng(devices=[]):  # seeded init without moving the training RNG
        torch.manual_seed(seed)
        head = LinearHead(encoder.dim, data.label_names(), multi_label=data.multi_label)
    fit_linear_head(
        head, embeddings, data.labels, epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size, seed=seed,
    )  # fmt: skip
    return head
