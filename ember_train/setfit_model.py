"""A SetFit-style classifier: the shared encoder (body) plus a linear head, saved as one directory.

The directory is the shared export (``transformers.AutoModel`` and ``SentenceTransformer`` load
the body unchanged) with the head beside it in ``head/`` (``head_config.json`` +
``head.safetensors``), so the same folder serves embedding users and classification users.

    from ember_train.setfit_model import SetFitStyleModel
    model = SetFitStyleModel.from_pretrained("runs/setfit/final")
    model.predict(["my package does not install"])        # -> ["admin"]
    model.predict_proba(["my package does not install"])  # -> array [1, num_labels]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ember_train.encoder import Encoder
from ember_train.encoder.heads import HEAD_DIR, LinearHead


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

    def save_pretrained(self, directory: str | Path, *, model_card: str | None = None) -> Path:
        """Write the body through the shared export and the head into ``<directory>/head``."""
        from ember_train.export import export_encoder

        out = export_encoder(self.body, directory, model_card=model_card)
        if self.head is not None:
            self.head.save(Path(out) / HEAD_DIR)
        return Path(out)


def _read_texts(path: str) -> list[str]:
    """Texts to classify: one per line (``.txt``/``-`` for stdin) or a ``text`` field (JSONL/CSV/...)."""
    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if path.endswith(".txt"):
        return [
            line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    from ember_train.data.reader import check_text, iter_records

    return [
        check_text(rec.get("text"), source=path, row=row, field="text") for row, rec in iter_records(path)
    ]


def predict_command(args: argparse.Namespace) -> int:
    """Print one JSON line per text: the text, its prediction and (``--proba``) the probabilities."""
    model = SetFitStyleModel.from_pretrained(args.model).eval()
    texts = list(args.text or []) + (_read_texts(args.input) if args.input else [])
    if not texts:
        raise SystemExit("ember-train predict: give texts with --text or --input")
    predictions = model.predict(texts, batch_size=args.batch_size, threshold=args.threshold)
    proba = model.predict_proba(texts, batch_size=args.batch_size) if args.proba else None
    for i, (text, label) in enumerate(zip(texts, predictions, strict=True)):
        record: dict[str, Any] = {"text": text, "label": label}
        if proba is not None:
            record["proba"] = {
                str(name): round(float(p), 6) for name, p in zip(model.labels, proba[i], strict=True)
            }
        print(json.dumps(record, ensure_ascii=False))
    return 0


def register(subparsers: Any) -> None:
    """Add ``ember-train predict`` to the CLI."""
    parser = subparsers.add_parser("predict", help="classify texts with an exported SetFit-style model")
    parser.add_argument("model", help="directory written by the setfit pipeline (or save_pretrained)")
    parser.add_argument("--text", action="append", help="a text to classify (repeatable)")
    parser.add_argument(
        "--input", help="a .txt file (one text per line, - for stdin) or a JSONL/CSV file with 'text'"
    )
    parser.add_argument("--proba", action="store_true", help="also print every label's probability")
    parser.add_argument("--threshold", type=float, default=0.5, help="multi-label decision threshold")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.set_defaults(handler=predict_command)
