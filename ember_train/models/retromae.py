"""RetroMAE: the shared encoder plus a shallow decoder that must rebuild the text from one vector.

The encoder reads a lightly masked text (MLM loss through its MLM head) and its pooled hidden
state ``h`` is the sentence embedding. The decoder sees a heavily masked view and, through
*enhanced decoding*, has to reconstruct every token from ``h`` plus positions, which forces
``h`` to carry the text's content (RetroMAE, arXiv 2205.12035):

* query stream ``H1``: ``h`` + position embeddings at every position (``query_stream="position"``,
  the paper), or ``h`` pushed through the embedding layer's position/type embeddings and
  LayerNorm (``query_stream="embedding"``, FlagEmbedding's variant);
* content stream ``H2``: ``[h; embeddings of the original tokens 1..L-1]``;
* a position-specific boolean attention mask: row ``i`` sees a random sample of the decoder-masked
  text's positions, never itself; position 0 (``h``) always; padding never (drawn by the
  collator, :func:`ember_train.data.masking.decoder_attention_mask`).

The decoder and the encoder share the (tied) MLM head, so the decoder cannot learn its own
vocabulary shortcut.

Without a decoder (``decoder=None``, ``decoder_layers=0``) the model is plain MLM pretraining with
the same masking: the baseline that RetroMAE's claim is measured against.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from ember_train.models.encoder import (
    Encoder,
    backbone_config,
    load_backbone,
    load_tokenizer,
    weight_loading_kwargs,
)
from ember_train.models.pooling import pool
from ember_train.models.sentence_transformers import find_checkpoint_file

QueryStream = Literal["position", "embedding"]
DECODER_WEIGHTS = "decoder.safetensors"
DECODER_CONFIG = "decoder_config.json"


@dataclass
class DecoderConfig:
    """Shape of the decoder; defaults follow the backbone so ``h`` and the MLM head fit."""

    hidden_size: int
    num_attention_heads: int
    intermediate_size: int
    num_layers: int = 1
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    query_stream: QueryStream = "position"

    @classmethod
    def from_backbone(cls, config, **overrides) -> DecoderConfig:
        """Copy the layer shape of a BERT-like backbone config (BERT, RoBERTa, ELECTRA, ...)."""
        values = {
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
        }
        for name in (
            "hidden_act",
            "layer_norm_eps",
            "hidden_dropout_prob",
            "attention_probs_dropout_prob",
            "initializer_range",
        ):
            if isinstance(getattr(config, name, None), str | int | float):
                values[name] = getattr(config, name)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_dict(cls, data: dict) -> DecoderConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_weight_names(name_or_path: str) -> set[str] | None:
    """The tensor names of a local or Hub checkpoint, read from its index or safetensors headers
    (no weights are loaded); None when they cannot be read (no such files, Hub unreachable)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = find_checkpoint_file(name_or_path, index_name)
        if index is not None:
            return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    weights = find_checkpoint_file(name_or_path, "model.safetensors")
    if weights is None:
        return None
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return set(f.keys())


def checkpoint_has_mlm_head(name_or_path: str, *, trust_remote_code: bool = False) -> bool | None:
    """Whether the checkpoint holds trained MLM-head weights (None: cannot tell).

    sentence-transformers bodies are saved without one, and RetroMAE then starts from a random
    head. The head's names come from the architecture itself (built on the meta device), so this
    works for any ``AutoModelForMaskedLM`` model, not only BERT's ``cls.predictions``.
    """
    names = checkpoint_weight_names(name_or_path)
    if names is None:
        return None
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForMaskedLM.from_config(config, trust_remote_code=trust_remote_code)
    model.tie_weights()  # not done on the meta device by from_config: tied copies are not saved
    prefix = f"{model.base_model_prefix}."
    head = [n for n, _ in model.named_parameters() if not n.startswith(prefix)]  # tied ones listed once
    return bool(head) and all(n in names for n in head)


class DecoderLayer(nn.Module):
    """A post-LN BERT block whose queries come from one stream and keys/values from another.

    Parameter shapes match a BERT layer's, so the first decoder layer can start as a copy of
    the encoder's last layer (:meth:`RetroMAEDecoder.init_from_bert_layer`).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.hidden_size % config.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.attention_dropout = config.attention_probs_dropout_prob
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(d, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.ffn_out = nn.Linear(config.intermediate_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        return x.view(b, length, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, content: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """``query``/``content``: ``[B, L, D]``; ``visible``: ``[B, L, L]`` booleans (True = attend)."""
        b, length, d = query.shape
        attn = F.scaled_dot_product_attention(
            self._heads(self.q_proj(query)),
            self._heads(self.k_proj(content)),
            self._heads(self.v_proj(content)),
            attn_mask=visible[:, None, :, :],
            dropout_p=self.attention_dropout if self.training else 0.0,
        )
        attn = attn.transpose(1, 2).reshape(b, length, d)
        hidden = self.attn_norm(query + self.dropout(self.o_proj(attn)))
        return self.ffn_norm(hidden + self.dropout(self.ffn_out(self.act(self.ffn_in(hidden)))))


class RetroMAEDecoder(nn.Module):
    """A stack of :class:`DecoderLayer`: the query stream is refined, every layer reads the same content.

    One layer is the paper's setting; with more, each layer's queries are the previous layer's
    output and keys/values stay the content stream (the content never sees the targets).
    """

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        if config.num_layers < 1:
            raise ValueError("the decoder needs at least one layer")
        self.config = config
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, query: torch.Tensor, content: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            query = layer(query, content, visible)
        return query

    @torch.no_grad()
    def init_from_bert_layer(self, layer: nn.Module) -> None:
        """Start the first layer as a copy of a BERT-style encoder layer (e.g. the last one)."""
        try:
            pairs = {
                "q_proj": layer.attention.self.query,
                "k_proj": layer.attention.self.key,
                "v_proj": layer.attention.self.value,
                "o_proj": layer.attention.output.dense,
                "attn_norm": layer.attention.output.LayerNorm,
                "ffn_in": layer.intermediate.dense,
                "ffn_out": layer.output.dense,
                "ffn_norm": layer.output.LayerNorm,
            }
        except AttributeError as e:
            raise ValueError(
                f"decoder_init=last_layer needs a BERT-style layer (attention.self.query, ...); "
                f"{type(layer).__name__} is not one ({e}). Use decoder_init=random."
            ) from None
        first = self.layers[0]
        for name, source in pairs.items():
            target = getattr(first, name)
            for pname in ("weight", "bias"):
                src, dst = getattr(source, pname), getattr(target, pname)
                if src.shape != dst.shape:
                    raise ValueError(
                        f"cannot copy {name}.{pname}: shape {tuple(src.shape)} != {tuple(dst.shape)}"
                    )
                dst.copy_(src)

    def save(self, directory: str | Path) -> None:
        """``decoder.safetensors`` + ``decoder_config.json`` (fp32, contiguous)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / DECODER_WEIGHTS), metadata={"format": "pt"})
        (directory / DECODER_CONFIG).write_text(
            json.dumps(asdict(self.config), indent=2) + "\n", encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: str | Path) -> RetroMAEDecoder:
        directory = Path(directory)
        weights, config_file = directory / DECODER_WEIGHTS, directory / DECODER_CONFIG
        if not weights.is_file() or not config_file.is_file():
            raise FileNotFoundError(
                f"{directory} holds no RetroMAE decoder ({DECODER_WEIGHTS} and {DECODER_CONFIG}); "
                "point init_decoder_from at the output directory of a retromae run"
            )
        decoder = cls(DecoderConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8"))))
        decoder.load_state_dict(load_file(str(weights)))
        return decoder


@dataclass
class RetroMAEOutput:
    """What the loss needs: logits and targets at the scored positions of each side, and ``h``."""

    encoder_logits: torch.Tensor  # [N_enc, V], masked positions only
    encoder_targets: torch.Tensor  # [N_enc]
    decoder_logits: torch.Tensor | None  # [N_dec, V], every real token but position 0; None: no decoder
    decoder_targets: torch.Tensor | None  # [N_dec]
    embedding: torch.Tensor  # [B, D], the pooled ``h``


def mlm_head_of(mlm: PreTrainedModel) -> nn.Module:
    """The module mapping hidden states to vocabulary logits (BERT's ``cls``, RoBERTa's ``lm_head``)."""
    for name in ("cls", "lm_head"):
        head = getattr(mlm, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(
        f"{type(mlm).__name__}: no MLM head found (looked for .cls and .lm_head); RetroMAE supports "
        "BERT- and RoBERTa-style masked-LM models"
    )


class RetroMAEModel(nn.Module):
    """Encoder (the shared backbone, through ``AutoModelForMaskedLM``) + tied MLM head + decoder
    (``None``: MLM only).

    ``self.mlm`` holds the backbone and its MLM head exactly as Hugging Face builds them, so the
    word-embedding/output tie is HF's own and ``save_pretrained`` writes a checkpoint that
    ``AutoModelForMaskedLM`` loads. ``self.encoder`` is the shared :class:`Encoder` over the
    same backbone object (not a copy, and not registered twice), for evaluation and export.
    """

    def __init__(
        self,
        mlm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        decoder: RetroMAEDecoder | None,
        *,
        pooling: str = "cls",
        max_seq_length: int = 512,
    ) -> None:
        super().__init__()
        self.mlm = mlm
        self.decoder = decoder
        mlm_head_of(mlm)  # fail early on a model without a known MLM head
        self.pooling = pooling
        self.query_stream = decoder.config.query_stream if decoder is not None else None
        embeddings = self.backbone.embeddings
        if self.query_stream == "position" and not isinstance(
            getattr(embeddings, "position_embeddings", None), nn.Embedding
        ):
            raise ValueError(
                f"{type(self.backbone).__name__} has no absolute position embeddings; "
                "the position query stream needs them"
            )
        if decoder is not None and decoder.config.hidden_size != mlm.config.hidden_size:
            raise ValueError("decoder hidden_size must equal the encoder's")
        self.__dict__["encoder"] = Encoder(
            self.backbone, tokenizer, pooling=pooling, normalize=False, max_seq_length=max_seq_length
        )

    @property
    def backbone(self) -> PreTrainedModel:
        return self.mlm.base_model

    @property
    def head(self) -> nn.Module:
        """The MLM head inside ``self.mlm`` (a property, so its weights are registered once)."""
        return mlm_head_of(self.mlm)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.encoder.tokenizer

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        pooling: str = "cls",
        max_seq_length: int = 512,
        decoder_layers: int = 1,
        query_stream: QueryStream = "position",
        decoder_init: Literal["random", "last_layer"] = "random",
        init_decoder_from: str | Path | None = None,
        trust_remote_code: bool = False,
        allow_pickle_weights: bool = False,
        attention_dropout: float | None = None,
    ) -> RetroMAEModel:
        """Load backbone + MLM head (a missing head, e.g. for a sentence-transformers checkpoint,
        is initialised and tied by transformers), and a new or saved decoder. A new decoder takes
        its dropout from the backbone's config, so ``attention_dropout`` reaches both.
        ``decoder_layers=0`` (and no ``init_decoder_from``) builds no decoder: MLM only."""
        name_or_path = str(name_or_path)
        tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
        mlm = load_backbone(
            AutoModelForMaskedLM,
            name_or_path,
            config=backbone_config(
                name_or_path, trust_remote_code=trust_remote_code, attention_dropout=attention_dropout
            ),
            trust_remote_code=trust_remote_code,
            **weight_loading_kwargs(name_or_path, allow_pickle_weights),
        )
        max_seq_length = min(max_seq_length, getattr(mlm.config, "max_position_embeddings", max_seq_length))
        decoder: RetroMAEDecoder | None = None
        if init_decoder_from is not None:
            decoder = RetroMAEDecoder.load(init_decoder_from)
        elif decoder_layers > 0:
            config = DecoderConfig.from_backbone(
                mlm.config, num_layers=decoder_layers, query_stream=query_stream
            )
            decoder = RetroMAEDecoder(config)
            if decoder_init == "last_layer":
                decoder.init_from_bert_layer(mlm.base_model.encoder.layer[-1])
            elif decoder_init != "random":
                raise ValueError(f"decoder_init must be random or last_layer, got {decoder_init!r}")
        return cls(mlm, tokenizer, decoder, pooling=pooling, max_seq_length=max_seq_length)

    def _position_ids(self, length: int, device: torch.device) -> torch.Tensor:
        # RoBERTa-style embeddings count positions from padding_idx + 1.
        offset = getattr(self.backbone.embeddings, "padding_idx", None)
        start = offset + 1 if isinstance(offset, int) else 0
        return torch.arange(start, start + length, device=device)[None, :]

    def query_stream_from(self, h: torch.Tensor, length: int) -> torch.Tensor:
        """``H1``: ``h`` at every position, made position-aware."""
        embeddings = self.backbone.embeddings
        position_ids = self._position_ids(length, h.device)
        if self.query_stream == "position":
            return h[:, None, :] + embeddings.position_embeddings(position_ids)
        expanded = h[:, None, :].expand(h.shape[0], length, h.shape[1])
        return embeddings(inputs_embeds=expanded, position_ids=position_ids)

    def content_stream_from(self, h: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``H2``: ``h`` in slot 0, then the embeddings of the original (unmasked) tokens."""
        token_embeddings = self.backbone.embeddings(
            input_ids=input_ids, position_ids=self._position_ids(input_ids.shape[1], input_ids.device)
        )
        return torch.cat([h[:, None, :].to(token_embeddings.dtype), token_embeddings[:, 1:]], dim=1)

    def forward(self, batch: dict[str, torch.Tensor]) -> RetroMAEOutput:
        """``batch`` as built by :class:`ember_train.data.masking.RetroMAECollator`."""
        attention_mask = batch["attention_mask"]
        hidden = self.backbone(
            input_ids=batch["encoder_input_ids"], attention_mask=attention_mask
        ).last_hidden_state
        h = pool(hidden, attention_mask, self.pooling)

        # Only the scored positions go through the MLM head; the collator lists them (flat
        # indices), since finding them here would make a GPU wait for the host.
        encoder_at = batch["encoder_positions"]
        encoder_logits = self.head(hidden.flatten(0, 1)[encoder_at])
        encoder_targets = batch["encoder_labels"].flatten()[encoder_at]
        if self.decoder is None:
            return RetroMAEOutput(encoder_logits, encoder_targets, None, None, embedding=h)

        input_ids = batch["input_ids"]
        query = self.query_stream_from(h, input_ids.shape[1])
        content = self.content_stream_from(h, input_ids)
        decoded = self.decoder(query, content, batch["decoder_visible"])
        decoder_at = batch["decoder_positions"]
        decoder_logits = self.head(decoded.flatten(0, 1)[decoder_at])
        return RetroMAEOutput(
            encoder_logits=encoder_logits,
            encoder_targets=encoder_targets,
            decoder_logits=decoder_logits,
            decoder_targets=batch["decoder_labels"].flatten()[decoder_at],
            embedding=h,
        )

    def save_pretrained(self, directory: str | Path) -> Path:
        """Encoder + MLM head as a Hugging Face checkpoint, the tokenizer, and the decoder beside them.

        ``AutoModelForMaskedLM`` (and ``AutoModel``) load the directory; ``init_decoder_from``
        reads the decoder back (none is written without one). Weights are written in fp32 whatever the training precision.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.mlm.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        if self.decoder is not None:
            self.decoder.save(directory)
        return directory
