"""RetroMAE pretraining recipe: raw text -> masked auto-encoding -> an encoder ready for contrastive tuning.

    accelerate launch train.py --config configs/retromae_quick.yaml [section.key=value ...]

Setup -> evaluate before -> train -> evaluate after -> save, top to bottom. The run writes:

* ``<output_dir>/pretrained``: the encoder + MLM head (``AutoModelForMaskedLM``), tokenizer and
  the decoder (``decoder.safetensors`` + ``decoder_config.json``; none with ``retromae.objective: mlm``). Continue pretraining from it
  with ``model.name_or_path`` and ``retromae.init_decoder_from`` both pointing there.
* ``<output_dir>/final``: the sentence-transformers export of the same encoder (pooling as
  trained, ``cls`` by default); a contrastive config takes either directory as ``model``.
* ``checkpoints/`` (exact resume, decoder included), ``metrics.jsonl``, ``results.json``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import send_to_device
from torch import nn
from torch.utils.data import DataLoader

from ember_train.config import ExportConfig, ModelConfig, TrainConfig, to_dict
from ember_train.data.masking import RetroMAECollator
from ember_train.data.reader import DataError
from ember_train.data.sampler import ShardedBatchSampler
from ember_train.data.text_corpus import (
    CorpusStats,
    KeyedBatches,
    KeyedTexts,
    StreamingBatches,
    filter_and_join,
    iter_texts,
    token_lengths,
)
from ember_train.losses.retromae import RetroMAELoss
from ember_train.models.encoder import resolve_model_path
from ember_train.models.retromae import DECODER_WEIGHTS, RetroMAEModel
from ember_train.models.sentence_transformers import export_encoder
from ember_train.pipelines.recipe import Pipeline, export_command_line, finish_run, model_card, start_run
from ember_train.training.checkpoint import load_model_weights
from ember_train.training.loop import train_loop
from ember_train.training.optimizer import ParamGroup

logger = logging.getLogger(__name__)


@dataclass
class TextDataConfig:
    train: str  # JSONL/JSON/CSV/Parquet file (text column), .txt (one document per line), a folder, or a Hub dataset
    text_field: str = "text"
    split: str = "train"  # Hub split
    streaming: bool = False  # read lazily, pass after pass (needs train.max_steps > 0); for corpora > memory
    shuffle_buffer: int = 10_000  # streaming: texts held for shuffling
    min_tokens: int = 8  # shorter texts are skipped and counted
    join_texts: bool = False  # join consecutive short texts up to max_seq_length (was `pack`)
    join_separator: str = " "  # (was `pack_separator`)
    group_by_length: bool = (
        True  # in memory: batches of similar length (less padding), random at bucket level
    )
    max_texts: int | None = None  # in memory: use only the first N sequences (quick experiments)
    on_bad_rows: Literal["error", "skip"] = "error"


@dataclass
class RetroMAESection:
    # retromae: encoder MLM + enhanced decoding (the paper); mlm: the encoder's MLM loss alone, with
    # the same masking and no decoder built (the baseline RetroMAE is measured against)
    objective: Literal["retromae", "mlm"] = "retromae"
    encoder_mask_ratio: float = 0.3
    decoder_mask_ratio: float = 0.5
    encoder_loss_weight: float = 1.0
    decoder_loss_weight: float = 1.0
    decoder_layers: int = 1
    query_stream: Literal["position", "embedding"] = "position"  # paper | FlagEmbedding's variant
    decoder_init: Literal["random", "last_layer"] = "random"  # last_layer: copy the encoder's last layer
    init_decoder_from: str | None = None  # a previous run's pretrained/ directory
    # Warm-ups for a body whose MLM head is new (a sentence-transformers model): the encoder (the
    # backbone, word embeddings included, so also the tied head's output layer) learns at
    # encoder_lr_scale x train.learning_rate, and not at all for the first freeze_encoder_steps
    # optimizer steps, while the new head and the decoder learn from its unchanged vectors.
    freeze_encoder_steps: int = 0
    encoder_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.objective not in ("retromae", "mlm"):
            raise ValueError(f"objective must be retromae or mlm, got {self.objective!r}")
        if self.objective == "mlm" and self.init_decoder_from is not None:
            raise ValueError("init_decoder_from needs objective: retromae (objective: mlm builds no decoder)")
        if not 0 < self.encoder_mask_ratio < 1:
            raise ValueError("encoder_mask_ratio must be in (0, 1)")
        if not 0 <= self.decoder_mask_ratio < 1:
            raise ValueError("decoder_mask_ratio must be in [0, 1)")
        if self.decoder_layers < 1:
            raise ValueError("decoder_layers must be >= 1")
        if self.freeze_encoder_steps < 0:
            raise ValueError("freeze_encoder_steps must be >= 0")
        if not (math.isfinite(self.encoder_lr_scale) and self.encoder_lr_scale > 0):
            raise ValueError(f"encoder_lr_scale must be a number > 0, got {self.encoder_lr_scale}")


@dataclass
class MLMEvalConfig:
    data: str | None = None  # held-out raw text, same formats as data.train
    text_field: str = "text"
    max_texts: int = 512
    batch_size: int = 32
    before_training: bool = True


@dataclass
class RetroMAEExportConfig(ExportConfig):
    """The encoder's export (``dir``, the one uploaded to the Hub), plus the MLM checkpoint + decoder."""

    pretrained_dir: str | None = None  # MLM checkpoint + decoder; default: <output_dir>/pretrained


@dataclass
class RetroMAEConfig:
    model: ModelConfig
    data: TextDataConfig
    task: str = "retromae"
    output_dir: str = "runs/retromae"
    seed: int = 42
    retromae: RetroMAESection = field(default_factory=RetroMAESection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: MLMEvalConfig = field(default_factory=MLMEvalConfig)
    export: RetroMAEExportConfig = field(default_factory=RetroMAEExportConfig)


def build_model(cfg: RetroMAEConfig) -> RetroMAEModel:
    """Backbone + MLM head from ``model``, decoder new or from ``retromae.init_decoder_from``."""
    name = resolve_model_path(cfg.model.name_or_path)
    r = cfg.retromae
    ignored = [k for k in ("normalize", "query_prefix", "document_prefix") if getattr(cfg.model, k)]
    if ignored:
        logger.warning(
            "RetroMAE reconstructs raw text from an unnormalised vector: model.%s ignored", ignored
        )
    if r.objective == "retromae" and r.init_decoder_from is None and (Path(name) / DECODER_WEIGHTS).is_file():
        logger.warning(
            "%s holds a RetroMAE decoder but retromae.init_decoder_from is unset: starting a new decoder",
            name,
        )
    model = RetroMAEModel.from_pretrained(
        name,
        pooling=cfg.model.pooling or "cls",  # RetroMAE's sentence vector is [CLS] unless asked otherwise
        max_seq_length=cfg.model.max_seq_length or 512,
        decoder_layers=r.decoder_layers if r.objective == "retromae" else 0,
        query_stream=r.query_stream,
        decoder_init=r.decoder_init,
        init_decoder_from=resolve_model_path(r.init_decoder_from) if r.init_decoder_from else None,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_pickle_weights=cfg.model.allow_pickle_weights,
        attention_dropout=cfg.model.attention_dropout,
    )
    if cfg.train.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable()
    return model


def encoder_param_groups(model: RetroMAEModel, r: RetroMAESection) -> list[ParamGroup]:
    """The encoder's own learning rate and frozen steps, when the config departs from the defaults."""
    if r.freeze_encoder_steps == 0 and r.encoder_lr_scale == 1.0:
        return []
    return [
        ParamGroup(
            "encoder",
            list(model.backbone.parameters()),
            lr_scale=r.encoder_lr_scale,
            frozen_steps=r.freeze_encoder_steps,
        )
    ]


def corpus_stream(
    source: str, model: RetroMAEModel, data: TextDataConfig, stats: CorpusStats
) -> Iterator[tuple[str, int]]:
    """Filtered (and joined) ``(text, tokens)`` of ``source``, read lazily."""
    tokenizer = model.tokenizer
    budget = model.encoder.max_seq_length - tokenizer.num_special_tokens_to_add(pair=False)
    texts = iter_texts(
        source,
        text_field=data.text_field,
        split=data.split,
        on_bad_rows=data.on_bad_rows,
        stats=stats,
        streaming=data.streaming,
    )
    return filter_and_join(
        texts,
        token_lengths(tokenizer),
        min_tokens=data.min_tokens,
        join_to=budget if data.join_texts else None,
        separator=data.join_separator,
        stats=stats,
    )


def make_dataloader(
    cfg: RetroMAEConfig, model: RetroMAEModel, collator: RetroMAECollator, world_size: int, rank: int
) -> tuple[Any, CorpusStats | None]:
    """In memory: a keyed, sharded, resumable DataLoader (+ the corpus counts). Streaming: passes
    over the source, each pass logging its own counts."""
    data = cfg.data
    if data.streaming:
        accum = cfg.train.gradient_accumulation_steps

        def texts() -> Iterator[str]:
            stats = CorpusStats()
            for text, _ in corpus_stream(data.train, model, data, stats):
                yield text
            logger.info("corpus pass complete: %s", stats.summary())

        loader = StreamingBatches(
            texts,
            collator,
            batch_size=cfg.train.batch_size,
            num_batches=cfg.train.max_steps * accum if cfg.train.max_steps > 0 else 0,
            world_size=world_size,
            rank=rank,
            seed=cfg.seed,
            shuffle_buffer_size=data.shuffle_buffer,
        )
        return loader, None

    stats = CorpusStats()
    sequences = list(islice(corpus_stream(data.train, model, data, stats), data.max_texts))
    if len(sequences) < world_size:
        raise DataError(
            str(data.train),
            None,
            f"{len(sequences)} usable texts for {world_size} process(es) ({stats.summary()}); check "
            "data.text_field and data.min_tokens",
        )
    sampler = ShardedBatchSampler(
        len(sequences),
        cfg.train.batch_size,
        world_size=world_size,
        rank=rank,
        seed=cfg.seed,
        lengths=[n for _, n in sequences] if data.group_by_length else None,
    )
    loader = DataLoader(
        KeyedTexts([t for t, _ in sequences]),
        batch_sampler=KeyedBatches(sampler),
        collate_fn=collator,
        num_workers=cfg.train.num_workers,
    )
    return loader, stats


def make_loss_step(loss_fn: RetroMAELoss):
    def loss_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = loss_fn(model(batch))
        return loss, {**metrics, "samples": float(batch["input_ids"].shape[0]), **batch["token_counts"]}

    return loss_step


class MLMEvaluator:
    """Encoder and decoder reconstruction accuracy/loss on held-out texts, with fixed masks."""

    def __init__(self, texts: list[str], collator: RetroMAECollator, batch_size: int) -> None:
        self.batches = [
            collator([{"text": t, "key": (0, n)} for t in texts[i : i + batch_size]])
            for n, i in enumerate(range(0, len(texts), batch_size))
        ]

    @torch.no_grad()
    def __call__(self, model: RetroMAEModel) -> dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        sums = {
            "enc_loss": 0.0,
            "enc_correct": 0.0,
            "enc_n": 0,
            "dec_loss": 0.0,
            "dec_correct": 0.0,
            "dec_n": 0,
        }
        sides = ("enc", "dec") if model.decoder is not None else ("enc",)
        for batch in self.batches:
            out = model(send_to_device(batch, device))
            for side, logits, targets in (
                ("enc", out.encoder_logits, out.encoder_targets),
                ("dec", out.decoder_logits, out.decoder_targets),
            )[: len(sides)]:
                sums[f"{side}_loss"] += float(
                    torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
                )
                sums[f"{side}_correct"] += float((logits.argmax(-1) == targets).sum())
                sums[f"{side}_n"] += int(targets.numel())
        model.train(was_training)
        return {
            f"{side}_mlm_{metric}": sums[f"{side}_{key}"] / max(sums[f"{side}_n"], 1)
            for side in sides
            for metric, key in (("acc", "correct"), ("loss", "loss"))
        }


def build_evaluator(
    cfg: RetroMAEConfig, model: RetroMAEModel, collator: RetroMAECollator
) -> MLMEvaluator | None:
    if cfg.eval.data is None:
        return None
    eval_data = TextDataConfig(
        train=cfg.eval.data, text_field=cfg.eval.text_field, min_tokens=cfg.data.min_tokens, join_texts=False
    )
    stats = CorpusStats()
    texts = [t for t, _ in islice(corpus_stream(cfg.eval.data, model, eval_data, stats), cfg.eval.max_texts)]
    logger.info("eval texts: %s", stats.summary())
    eval_collator = RetroMAECollator(
        model.tokenizer,
        max_seq_length=collator.max_seq_length,
        encoder_mask_ratio=collator.encoder_mask_ratio,
        decoder_mask_ratio=collator.decoder_mask_ratio,
        decoder=collator.decoder,
        seed=cfg.seed + 1,
    )
    return MLMEvaluator(texts, eval_collator, cfg.eval.batch_size)


def resolved_training_dict(cfg: RetroMAEConfig, model: RetroMAEModel) -> dict[str, Any]:
    """The config as run, with the encoder settings actually used (for the model card)."""
    training = to_dict(cfg)
    training["model"]["pooling"] = model.pooling
    training["model"]["max_seq_length"] = model.encoder.max_seq_length
    training["model"]["normalize"] = False
    return training


def save_outputs(
    model: RetroMAEModel,
    cfg: RetroMAEConfig,
    pretrained_dir: Path,
    export_dir: Path,
    command: str | None,
    data_summary: str | None,
) -> None:
    """The MLM checkpoint + decoder, and the sentence-transformers export of the encoder."""
    model.save_pretrained(pretrained_dir)
    training = resolved_training_dict(cfg, model)
    card = model_card(cfg, export_dir, command=command, training=training, data_summary=data_summary)
    export_encoder(model.encoder, export_dir, model_card=card)


def run(cfg: RetroMAEConfig, command: str | None = None) -> dict[str, Any]:
    """Pretrain, evaluate reconstruction, save; returns what is written to ``<output_dir>/results.json``."""
    accelerator, output_dir = start_run(cfg)

    model = build_model(cfg)
    parts = "MLM head + decoder" if model.decoder is not None else "MLM head (objective: mlm, no decoder)"
    accelerator.print(f"model: {model.encoder.describe(cfg.model.name_or_path)} + {parts}")
    collator = RetroMAECollator(
        model.tokenizer,
        max_seq_length=model.encoder.max_seq_length,
        encoder_mask_ratio=cfg.retromae.encoder_mask_ratio,
        decoder_mask_ratio=cfg.retromae.decoder_mask_ratio,
        decoder=model.decoder is not None,
        seed=cfg.seed,
        rank=accelerator.process_index,
    )
    dataloader, stats = make_dataloader(
        cfg, model, collator, accelerator.num_processes, accelerator.process_index
    )
    if stats is not None:
        accelerator.print(f"training corpus: {stats.summary()}")
    evaluator = build_evaluator(cfg, model, collator)

    def evaluate() -> dict[str, float]:
        return evaluator(model) if evaluator is not None else {}

    before: dict[str, float] | None = None
    if evaluator is not None and cfg.eval.before_training and accelerator.is_main_process:
        model.to(accelerator.device)
        before = evaluate()
        accelerator.print("before training: " + ", ".join(f"{k}={v:.4f}" for k, v in before.items()))
    accelerator.wait_for_everyone()

    loss_fn = RetroMAELoss(cfg.retromae.encoder_loss_weight, cfg.retromae.decoder_loss_weight)
    outcome = train_loop(
        param_groups=encoder_param_groups(model, cfg.retromae),
        accelerator=accelerator,
        model=model,
        loss_step=make_loss_step(loss_fn),
        dataloader=dataloader,
        cfg=cfg.train,
        output_dir=output_dir,
        evaluate=evaluate if evaluator is not None else None,
    )

    results: dict[str, Any] = {
        "steps": outcome["step"],
        "train_seconds": outcome["train_seconds"],
        "corpus": stats.summary() if stats is not None else "streamed (counts of each pass are in the log)",
        "skipped_rows": stats.bad_rows.total if stats is not None else None,
        "last_metrics": outcome["last_metrics"],
    }
    if accelerator.is_main_process and evaluator is not None:
        results["eval_after"] = after = evaluate()
        if before is not None:
            results["eval_before"] = before
        accelerator.print("after training: " + ", ".join(f"{k}={v:.4f}" for k, v in after.items()))

    def export(export_dir: Path) -> dict[str, Any]:
        pretrained_dir = Path(cfg.export.pretrained_dir or output_dir / "pretrained")
        save_outputs(
            model, cfg, pretrained_dir, export_dir, command, f"RetroMAE pretraining on `{cfg.data.train}`"
        )
        saved = "the MLM checkpoint + decoder" if model.decoder is not None else "the MLM checkpoint"
        accelerator.print(f"saved {saved} to {pretrained_dir}, the encoder export to {export_dir}")
        return {"pretrained_dir": str(pretrained_dir), "export_dir": str(export_dir)}

    return finish_run(accelerator, cfg, output_dir, results, command, export)


def export_checkpoint(cfg: RetroMAEConfig, checkpoint: Path, out_dir: Path) -> Path:
    """``ember-train export``: the encoder export in ``out_dir``, the MLM checkpoint + decoder in ``out_dir/mlm``."""
    model = build_model(cfg)
    load_model_weights(model, checkpoint)
    save_outputs(model, cfg, out_dir / "mlm", out_dir, export_command_line(checkpoint, out_dir), None)
    return out_dir


PIPELINE = Pipeline("retromae", RetroMAEConfig, run, export_checkpoint)
