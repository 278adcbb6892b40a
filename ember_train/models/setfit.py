"""A SetFit-style classifier: the shared encoder (body) plus a linear head, saved as one directory.

The directory is the shared export (``transformers.AutoModel`` and ``SentenceTransformer`` load
the body unchanged) with the head beside it in ``head/`` (``head_config.json`` +
``head.safetensors``), so the same folder serves embedding users and classification users.

    from ember_train.models.setfit import SetFitStyleModel
    model = SetFitStyleModel.from_pretrained("runs/setfit/final")
    model.predict(["my package does not install"])        # -> ["admin"]
    model.predict_proba(["my package does not install"])  # -> array [1, num_labels]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ember_train.models import Encoder
from ember_train.models.heads import HEAD_DIR, LinearHead


class SetFitStyleModel(nn.Module):
    """Body (:class:`Encoder`) + head (:class:`LinearHead`).

    ``forward(features, output="embedding")`` returns embeddings (what pair tuning trains);
    ``output="logits"`` runs the head too (end-to-end tuning). Going through ``forward`` in both
    cases keeps DistributedDataParallel's gradient hooks in play.
    """

    def __init__(self, body: Encoder, head: LinearHead | None = None) -> None:
        super().__init__()
        self.body = body
        self.head = head

    @classmethod
    def from_pretrained(cls, path: str | Path, **encoder_kwargs: Any) -> SetFitStyleModel:
        """Load an exported directory; pooling, normalisation and length come from its own files."""
        path = Path(path)
        body = Encoder.from_pretrained(path, **encoder_kwargs)
        head = LinearHead.load(path / HEAD_DIR) if (path / HEAD_DIR).is_dir() else None
        return cls(body, head)

    @property
    def labels(self) -> list[Any]:
        return self._require_head().labels

    def _require_head(self) -> LinearHead:
        if self.head is None:
            raise RuntimeError("this model has no classification head (it was tuned on scored pairs only)")
        return self.head

    def forward(self, features: dict[str, torch.Tensor], output: str = "embedding") -> torch.Tensor:
        embeddings = self.body(features)
        if output == "embedding":
            return embeddings
        if output == "logits":
            return self._require_head()(embeddings)
        raise ValueError(f"output must be 'embedding' or 'logits', got {output!r}")

    def encode(self, texts: Sequence[str], batch_size: int = 32, show_progress: bool = False) -> torch.Tensor:
        return self.body.encode(list(texts), batch_size=batch_size, show_progress=show_progress)

    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """``[N, num_labels]`` probabilities (columns in ``self.labels`` order)."""
        head = self._require_head()
        return head.predict_proba(self.encode(texts, batch_size=batch_size).to(head.linear.weight.device))

    def predict(self, texts: Sequence[str], batch_size: int = 32, threshold: float = 0.5) -> list[Any]:
        """A label per text; for a multi-label head, the labels with probability >= ``threshold``."""
        head = self._require_head()
        return head.predict(
            self.encode(texts, batch_size=batch_size).to(head.linear.weight.device), threshold
        )

    def load_head_weights(self, head: LinearHead) -> None:
        """Copy ``head``'s weights into this model's head in place (an optimizer and DDP keep their references)."""
        with torch.no_grad():
            self.head.linear.weight.copy_(head.linear.weight)
            self.head.linear.bias.copy_(head.linear.bias)
        self.head.kind = head.kind

    def save_pretrained(
        self, directory: str | Path, *, model_card: str | None = None, matryoshka_dims: Sequence[int] = ()
    ) -> Path:
        """Write the body through the shared export and the head into ``<directory>/head``."""
        from ember_train.models.sentence_transformers import export_encoder

        out = export_encoder(self.body, directory, model_card=model_card, matryoshka_dims=matryoshka_dims)
        if self.head is not None:
            self.head.save(Path(out) / HEAD_DIR)
        return Path(out)
