"""Config sections shared by every pipeline. Each pipeline adds its own sections in its recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ember_train.models.pooling import POOLING_MODES


@dataclass
class ModelConfig:
    """The shared encoder: what to load and how to turn token vectors into one vector."""

    name_or_path: str  # Hub name or local directory
    # Unset (null) values come from the checkpoint's sentence-transformers files when it has
    # them, else: mean pooling, no normalisation, 512 tokens, no prefixes.
    pooling: str | None = None  # mean | cls | max | weighted_mean | lasttoken
    normalize: bool | None = None  # L2-normalise the output vectors
    max_seq_length: int | None = None
    query_prefix: str | None = None  # e.g. "query: " or an instruction
    document_prefix: str | None = None
    trust_remote_code: bool = False  # never run Hub code unless the user asks
    allow_pickle_weights: bool = False  # read pytorch_model.bin (pickle) when there is no safetensors
    # Attention-probability dropout in training; null = the checkpoint's (BERT-style: 0.1). 0 lets
    # CPU attention use SDPA's fused kernel (docs/performance.md).
    attention_dropout: float | None = None

    def __post_init__(self) -> None:
        if self.pooling is not None and self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {list(POOLING_MODES)}, got {self.pooling!r}")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            raise ValueError("max_seq_length must be at least 2")
        if self.attention_dropout is not None and not 0.0 <= self.attention_dropout < 1.0:
            raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")

    def encoder_kwargs(self) -> dict:
        return {
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_seq_length": self.max_seq_length,
            "query_prefix": self.query_prefix,
            "document_prefix": self.document_prefix,
            "trust_remote_code": self.trust_remote_code,
            "allow_pickle_weights": self.allow_pickle_weights,
            "attention_dropout": self.attention_dropout,
        }


@dataclass
class TrainConfig:
    """Optimisation, precision, logging and checkpointing, the same for every pipeline."""

    epochs: int = 1
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 32  # per process, per micro-step
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0 disables clipping
    gradient_accumulation_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    # On CPU: dropout masks hashed from one seed by a small C kernel, several times cheaper than
    # PyTorch's (keep probability rounded to 1/65536); other devices are unaffected. See
    # speedups/dropout.py.
    fast_cpu_dropout: bool = True
    # On CPU (not DeepSpeed): the word-embedding gradient accumulates sparse updates into one
    # buffer kept across steps, instead of a fresh [vocab, dim] tensor per forward call (page
    # faults). Same sums. See speedups/embedding_grad.py.
    fast_cpu_embedding_grad: bool = True
    # Padding-free batches for contrastive and SetFit-style tuning (models/packing.py): "auto" =
    # on CPU when the model gives the same vectors packed (checked at start); true = everywhere
    # (an error if the model cannot); false = padded, length-sorted slices.
    pack_sequences: bool | Literal["auto"] = "auto"
    # Padded (not packed) batches: each side is sorted by length and cut into this many slices
    # where padding is least, one forward call each. More slices pad less; 1 runs the fewest
    # forward calls (kernel launches), for a small model on a large GPU.
    padded_slices: int = 2
    grad_cache_chunk_size: int = (
        0  # > 0: gradient cache, embed in chunks of this size (big batches, small memory)
    )
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int = 0  # optimizer steps between evaluations; 0 = before and after training only
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (newest checkpoint in output_dir) | none | path to a checkpoint
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf steps skipped before the run stops
    num_workers: int = 0
    # Torch threads per process on CPU; 0 = every physical core, divided among the processes on the
    # machine (also under `accelerate launch`, which otherwise leaves one thread). An explicit
    # OMP_NUM_THREADS or --num_cpu_threads_per_process is kept.
    cpu_threads: int = 0
    report_to: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl, wandb
    wandb_project: str = "ember-train"
    wandb_run_name: str | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate}")
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError("gradient_accumulation_steps must be >= 1")
        if self.padded_slices < 1:
            raise ValueError("padded_slices must be >= 1")
        if self.cpu_threads < 0:
            raise ValueError("cpu_threads must be >= 0 (0 = all physical cores)")
        if not 0 <= self.warmup_ratio <= 1:
            raise ValueError("warmup_ratio must be in [0, 1]")
        unknown = set(self.report_to) - {"jsonl", "wandb"}
        if unknown:
            raise ValueError(f"report_to: unknown logger(s) {sorted(unknown)}; use jsonl and/or wandb")


@dataclass
class ExportConfig:
    """Where the release (sentence-transformers) export goes, its name, and where it is published."""

    enabled: bool = True
    dir: str | None = None  # default: <output_dir>/final
    model_name: str | None = None  # name in the model card; default: hub_repo_id, else the directory name
    # Upload the export to this Hugging Face Hub model repository (created if missing) after the
    # run; the token comes from `hf auth login` or HF_TOKEN, never from the config.
    hub_repo_id: str | None = None
    hub_private: bool = True  # visibility of a repository the run creates (an existing one keeps its own)

    def __post_init__(self) -> None:
        if self.hub_repo_id is not None:
            if not self.enabled:
                raise ValueError("hub_repo_id needs enabled: true (the export is what is uploaded)")
            from huggingface_hub.utils import validate_repo_id

            validate_repo_id(self.hub_repo_id)  # an HFValidationError (a ValueError) names the problem
            if "/" not in self.hub_repo_id:
                raise ValueError(f"hub_repo_id {self.hub_repo_id!r}: use 'user-or-org/name'")

    def card_name(self, export_dir: str | Path) -> str:
        """The model's name in its card (and in the card's usage snippets)."""
        return self.model_name or self.hub_repo_id or Path(export_dir).name
