"""Release format: a directory that transformers and sentence-transformers both load, and its upload."""

from ember_train.export.sentence_transformers import export_encoder

__all__ = ["export_encoder"]
