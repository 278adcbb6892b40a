"""SetFit-style recipe: labelled texts -> contrastive pairs -> cosine loss on the body -> head -> export.

    accelerate launch train.py --config configs/setfit_quick.yaml [section.key=value ...]

Setup -> head on the frozen body and evaluate ("before") -> tune the body on generated pairs
through the shared loop -> refit the head on the tuned body (optionally tune body and head end
to end) -> evaluate ("after") -> export body + head. Scored sentence pairs
(``sentence1, sentence2, score``) can be added to, or replace, the labelled texts for STS-style
tuning with the same loss.

Checkpoints hold the body *and* the head (both live in one :class:`SetFitStyleModel`). The head
in a mid-run checkpoint is the one fitted before tuning, or at the last evaluation when
``train.eval_every`` > 0; the final checkpoint is rewritten once the head has been refitted.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ember_train.config import ConfigError, ExportConfig, ModelConfig, TrainConfig, save_config
from ember_train.data.batching import BatchLayout, restore_order
from ember_train.data.labelled import (
    LabelledTexts,
    ScoredPairDataset,
    ScoredPairs,
    TextCollator,
    load_labelled,
    load_scored_pairs,
    sample_per_label,
    subsample,
)
from ember_train.data.reader import DataError
from ember_train.data.sampler import ShardedBatchSampler
from ember_train.data.setfit_pairs import LabelPairs, PairBatchSampler, TargetPairCollator
from ember_train.evaluation.base import EvalResult
from ember_train.evaluation.classification import evaluate_classifier
from ember_train.evaluation.sts import STSEvaluator
from ember_train.export.model_card import classification_card_section
from ember_train.losses.cosine import build_pair_loss
from ember_train.losses.matryoshka import check_dims_fit, check_matryoshka_dims, with_matryoshka
from ember_train.models import Encoder
from ember_train.models.heads import HEAD_DIR, LinearHead, fit_head
from ember_train.models.setfit import SetFitStyleModel
from ember_train.pipelines.recipe import Pipeline, export_command_line, finish_run, model_card, start_run
from ember_train.training import zero
from ember_train.training.checkpoint import TrainState, load_model_weights, save_checkpoint
from ember_train.training.grad_cache import slices_loss_step
from ember_train.training.loop import build_accelerator, train_loop

logger = logging.getLogger(__name__)


@dataclass
class SetFitDataConfig:
    train: str | None = None  # labelled texts: `text`, `label` (a list of labels for multi-label)
    test: str | None = None  # labelled texts for accuracy / macro-F1 before and after tuning
    split: str = "train"  # Hub split of `train`
    test_split: str = "test"  # Hub split of `test`
    text_field: str = "text"
    label_field: str = "label"
    samples_per_label: int | None = None  # few-shot: keep N random texts per label (seeded)
    max_test_examples: int | None = None  # evaluate on a seeded random subset of the test set
    pairs: str | None = None  # scored pairs `sentence1`, `sentence2`, `score` for STS-style tuning
    test_pairs: str | None = None  # scored pairs for an STS evaluation (Spearman) before and after
    score_range: list[float] | None = (
        None  # [low, high] of the score scale (e.g. [0, 5]); default: data min/max
    )
    on_bad_rows: Literal["error", "skip"] = "error"

    def __post_init__(self) -> None:
        if self.train is None and self.pairs is None:
            raise ValueError("give data.train (labelled texts) and/or data.pairs (scored pairs)")
        if self.test is not None and self.train is None:
            raise ValueError("data.test needs data.train: the classification head is fitted on it")
        if self.score_range is not None and len(self.score_range) != 2:
            raise ValueError("score_range must be [low, high]")


@dataclass
class PairGenerationConfig:
    strategy: Literal["oversampling", "undersampling", "unique"] = "oversampling"
    num_iterations: int | None = None  # k positive + k negative pairs per text; overrides strategy
    include_self_pairs: bool = False
    loss: Literal["cosine_mse", "cosent"] = "cosine_mse"
    cosent_scale: float = 20.0
    # Matryoshka: the pair loss also on each prefix of the vectors, e.g. [384, 256, 128, 64]
    # (unique, descending). Empty: off. The head is fitted on the full vectors.
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] | None = None  # one per dimension; default all 1

    def __post_init__(self) -> None:
        check_matryoshka_dims(self.matryoshka_dims, self.matryoshka_weights)


@dataclass
class HeadConfig:
    type: Literal["logistic_regression", "linear"] = "logistic_regression"
    C: float = 1.0  # logistic regression: inverse L2 strength
    max_iter: int = 1000  # logistic regression
    epochs: int = 100  # linear head on frozen embeddings
    learning_rate: float = 1e-2  # linear head on frozen embeddings
    batch_size: int = 32
    end_to_end: bool = False  # linear head only: then tune body + head with cross-entropy
    end_to_end_epochs: int = 1
    end_to_end_learning_rate: float = 1e-5
    threshold: float = 0.5  # multi-label decision threshold

    def __post_init__(self) -> None:
        if self.end_to_end and self.type != "linear":
            raise ValueError("end_to_end needs head.type: linear (a logistic regression has no gradient)")


@dataclass
class SetFitEvalConfig:
    batch_size: int = 64
    before_training: bool = True


@dataclass
class SetFitConfig:
    model: ModelConfig
    data: SetFitDataConfig
    task: str = "setfit"
    output_dir: str = "runs/setfit"
    seed: int = 42
    pairs: PairGenerationConfig = field(default_factory=PairGenerationConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=16, learning_rate=2e-5))
    eval: SetFitEvalConfig = field(default_factory=SetFitEvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def build_pair_dataset(
    train: LabelledTexts | None, scored: ScoredPairs | None, cfg: SetFitConfig
) -> tuple[Dataset, dict[str, int]]:
    """Generated SetFit pairs and/or scored pairs; returns the dataset and its counts."""
    parts: list[Dataset] = []
    counts: dict[str, int] = {}
    if train is not None:
        try:
            pairs = LabelPairs(
                train.texts,
                train.labels,
                strategy=cfg.pairs.strategy,
                num_iterations=cfg.pairs.num_iterations,
                include_self_pairs=cfg.pairs.include_self_pairs,
                seed=cfg.seed,
                multi_label=train.multi_label,
            )
        except ValueError as e:  # labels that give no positive or no negative pair
            raise DataError(str(cfg.data.train), None, str(e)) from None
        parts.append(pairs)
        counts.update(
            distinct_positive_pairs=pairs.n_positive,
            distinct_negative_pairs=pairs.n_negative,
            positive_items=pairs.n_pos_items,
            negative_items=pairs.n_neg_items,
        )
    if scored is not None:
        parts.append(ScoredPairDataset(scored, cfg.data.score_range))
        counts["scored_pairs"] = len(scored)
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    counts["pairs_per_epoch"] = len(dataset)
    return dataset, counts


def make_pair_loss_step(loss_fn: torch.nn.Module, grad_cache_chunk_size: int = 0):
    """Embed the length-sorted slices, restore pair order, then the cosine loss against the targets.

    With ``grad_cache_chunk_size > 0`` the slices are embedded in chunks through the gradient
    cache, which runs its own backward passes (the loop is told so via ``backward_in_step``).
    """

    def loss_from_embeddings(sorted_embeddings: list[torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        embeddings = restore_order(sorted_embeddings, batch["order"])  # back to pair order
        size = batch["label"].shape[0]
        return loss_fn(embeddings[:size], embeddings[size:], target=batch["label"])

    def counts(batch: dict[str, Any]) -> dict[str, float]:
        return {"samples": float(batch["label"].shape[0]), **batch["token_counts"]}

    return slices_loss_step(
        lambda batch: batch["slices"], loss_from_embeddings, counts, grad_cache_chunk_size
    )


def make_head_loss_step(head: LinearHead):
    def loss_step(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        logits = model(batch["features"], output="logits")
        return head.loss(logits, batch["targets"]), {"samples": float(logits.shape[0])}

    return loss_step


@dataclass
class SetFitData:
    """What a run reads: labelled texts (train, test) and/or scored pairs (tuning, STS evaluation)."""

    train: LabelledTexts | None
    test: LabelledTexts | None
    scored: ScoredPairs | None
    sts: STSEvaluator | None


def load_data(cfg: SetFitConfig) -> SetFitData:
    data = cfg.data
    read = {"text_field": data.text_field, "label_field": data.label_field, "on_bad_rows": data.on_bad_rows}
    train = load_labelled(data.train, split=data.split, **read) if data.train else None
    if train is not None and not train.multi_label and len(train.label_names()) < 2:
        raise DataError(
            train.source,
            None,
            f"column {data.label_field!r} has only one class ({train.label_names()[0]!r} in all "
            f"{len(train)} rows); a classifier needs at least two",
        )
    if train is not None and data.samples_per_label:
        train = sample_per_label(train, data.samples_per_label, cfg.seed)
    test = load_labelled(data.test, split=data.test_split, **read) if data.test else None
    if test is not None:
        test = subsample(test, data.max_test_examples, cfg.seed)
    scored = (
        load_scored_pairs(data.pairs, split=data.split, on_bad_rows=data.on_bad_rows) if data.pairs else None
    )
    sts = None
    if data.test_pairs:
        held_out = load_scored_pairs(data.test_pairs, split=data.test_split, on_bad_rows=data.on_bad_rows)
        sts = STSEvaluator(
            held_out.sentence1, held_out.sentence2, held_out.scores,
            name=Path(data.test_pairs).stem, batch_size=cfg.eval.batch_size,
        )  # fmt: skip
    return SetFitData(train, test, scored, sts)


def refuse_end_to_end_under_deepspeed(cfg: SetFitConfig):
    def check(accelerator: Any) -> None:
        if cfg.head.end_to_end and zero.active(accelerator):
            # accelerate ties one DeepSpeed engine to an Accelerator (one per process): a second
            # training phase would step the first phase's engine. Refuse before any work is done.
            raise ConfigError(
                "head.end_to_end is not supported under DeepSpeed (one training phase per run); use DDP"
            )

    return check


def run(cfg: SetFitConfig, command: str | None = None) -> dict[str, Any]:
    """Tune, fit the head, evaluate and export; returns what is written to ``<output_dir>/results.json``."""
    accelerator, output_dir = start_run(cfg, check=refuse_end_to_end_under_deepspeed(cfg))

    encoder = Encoder.from_pretrained(cfg.model.name_or_path, **cfg.model.encoder_kwargs())
    accelerator.print(f"model: {encoder.describe(cfg.model.name_or_path)}")
    try:
        check_dims_fit(cfg.pairs.matryoshka_dims, encoder.dim, "pairs.matryoshka_dims")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.train.gradient_checkpointing:
        encoder.gradient_checkpointing_enable()
    encoder.to(accelerator.device)
    data = load_data(cfg)
    train, test, sts = data.train, data.test, data.sts
    if train is not None:
        accelerator.print(f"labelled texts: {len(train)} ({len(train.label_names())} labels)")
    test_name = Path(cfg.data.test).stem if cfg.data.test else "test"
    batch_size = cfg.eval.batch_size

    def refit_head() -> LinearHead:
        return fit_head(encoder, train, cfg.head, seed=cfg.seed, batch_size=batch_size)

    def evaluate(model: SetFitStyleModel) -> dict[str, EvalResult]:
        results = {}
        if model.head is not None and test is not None:
            results["classification"] = evaluate_classifier(
                model, test, name=test_name, batch_size=batch_size, threshold=cfg.head.threshold
            )
        if sts is not None:
            results["sts"] = sts(encoder)
        return results

    # Before: the frozen body with a head fitted on its embeddings (every process fits the same head).
    # Nobody sees that head when there is no "before" evaluation and the only checkpoint is the
    # last one (written after the refit): then a zero head holds the label list and fitting waits.
    head = None
    if train is not None and (cfg.eval.before_training or cfg.train.checkpoint_every > 0):
        head = refit_head()
    elif train is not None:
        with torch.random.fork_rng(devices=[]):  # leave the training RNG (dropout) where it was
            head = LinearHead(encoder.dim, train.label_names(), multi_label=train.multi_label)
        torch.nn.init.zeros_(head.linear.weight)
        torch.nn.init.zeros_(head.linear.bias)
    model = SetFitStyleModel(encoder, head)
    model.to(accelerator.device)
    before: dict[str, EvalResult] = {}
    if cfg.eval.before_training and accelerator.is_main_process:
        before = evaluate(model)
        for result in before.values():
            accelerator.print(f"before tuning: {result}")
    if head is not None:
        head.requires_grad_(False)  # pair tuning trains the body only
        if accelerator.is_main_process:
            head.save(output_dir / HEAD_DIR)  # label list for `ember-train export` of any checkpoint
    accelerator.wait_for_everyone()

    # Body tuning on generated (and/or scored) pairs, through the shared loop.
    dataset, counts = build_pair_dataset(train, data.scored, cfg)
    accelerator.print(f"pairs: {counts}")
    layout = BatchLayout.for_run(cfg.train, encoder, accelerator.device)
    accelerator.print(f"batches: {layout.describe()}")
    sampler = PairBatchSampler(
        len(dataset), cfg.train.batch_size,
        world_size=accelerator.num_processes, rank=accelerator.process_index, seed=cfg.seed,
    )  # fmt: skip
    collate = TargetPairCollator(encoder, layout)
    dataloader = DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.train.num_workers
    )
    loss_fn = with_matryoshka(
        build_pair_loss(cfg.pairs.loss, cosent_scale=cfg.pairs.cosent_scale),
        cfg.pairs.matryoshka_dims,
        cfg.pairs.matryoshka_weights,
    )

    def evaluate_during() -> dict[str, float]:
        if head is not None and test is not None:
            model.load_head_weights(refit_head())
        return {k: v for result in evaluate(model).values() for k, v in result.metrics.items()}

    outcome = train_loop(
        accelerator=accelerator,
        model=model,
        loss_step=make_pair_loss_step(loss_fn, cfg.train.grad_cache_chunk_size),
        backward_in_step=cfg.train.grad_cache_chunk_size > 0,
        dataloader=dataloader,
        cfg=cfg.train,
        output_dir=output_dir,
        evaluate=evaluate_during if (test is not None and head is not None) or sts is not None else None,
        save_final_checkpoint=head is None,  # with a head, saved once below, after the refit
    )
    results: dict[str, Any] = {
        "steps": outcome["step"],
        "train_seconds": outcome["train_seconds"],
        "train_texts": len(train) if train is not None else 0,
        "pairs": counts,
        "last_metrics": outcome["last_metrics"],
    }

    # Head on the tuned body; the final checkpoint is written with this head.
    if head is not None:
        model.load_head_weights(refit_head())
        save_checkpoint(
            accelerator,
            output_dir,
            TrainState(step=outcome["step"], epoch=outcome["epoch"]),
            cfg.train.keep_checkpoints,
        )
        if cfg.head.end_to_end:
            results["end_to_end"] = _tune_end_to_end(accelerator, model, train, cfg, output_dir)

    after: dict[str, EvalResult] = {}
    if accelerator.is_main_process:
        after = evaluate(model)
        for key, result in after.items():
            results[f"eval_after_{key}"] = result.to_dict()
            line = f"after tuning: {result}"
            if key in before:
                results[f"eval_before_{key}"] = before[key].to_dict()
                line = f"{result.main_metric} before -> after: {before[key].main_score:.2f} -> {result.main_score:.2f}"
            accelerator.print(line)

    def export(export_dir: Path) -> dict[str, Any]:
        summary = _data_summary(train, data.scored, cfg)
        card = model_card(
            cfg, export_dir, command=command, results=list(after.values()), data_summary=summary,
            matryoshka_dims=cfg.pairs.matryoshka_dims,
        )  # fmt: skip
        card += "\n" + classification_card_section(
            model.head,
            before.get("classification"),
            after.get("classification"),
            _tuning_summary(counts, cfg),
        )
        model.save_pretrained(export_dir, model_card=card, matryoshka_dims=cfg.pairs.matryoshka_dims)
        accelerator.print(f"exported to {export_dir}")
        return {"export_dir": str(export_dir)}

    return finish_run(accelerator, cfg, output_dir, results, command, export)


def _tune_end_to_end(
    accelerator: Any, model: SetFitStyleModel, train: LabelledTexts, cfg: SetFitConfig, output_dir: Path
) -> dict[str, Any]:
    """Cross-entropy through body and head, starting from the head fitted on the tuned body.

    This phase trains a copy of the model with its own Accelerator (same settings; the RNG stream
    goes on and the run's trackers stay the body phase's): the body phase's wrapper (DDP under
    ``accelerate launch``) keeps its gradient hooks on the original parameters, and this phase's
    checkpoints (``<output_dir>/end_to_end``) hold exactly the model it trains. The tuned weights
    are copied back into ``model`` at the end.
    """
    e2e_dir = output_dir / "end_to_end"
    if accelerator.is_main_process:
        save_config(cfg, e2e_dir / "config.yaml")  # so `ember-train export` finds it next to the checkpoints
    e2e_cfg = copy.deepcopy(cfg.train)
    e2e_cfg.epochs = cfg.head.end_to_end_epochs
    e2e_cfg.max_steps = -1
    e2e_cfg.learning_rate = cfg.head.end_to_end_learning_rate
    e2e_accelerator = build_accelerator(e2e_cfg, e2e_dir, seed=None, trackers=False)
    e2e_model = copy.deepcopy(model)
    head = e2e_model.head
    head.requires_grad_(True)  # the body keeps its own flags (its unused pooler stays frozen for DDP)
    sampler = ShardedBatchSampler(
        len(train), cfg.head.batch_size,
        world_size=accelerator.num_processes, rank=accelerator.process_index, seed=cfg.seed,
    )  # fmt: skip
    examples = list(zip(train.texts, train.labels, strict=True))
    dataloader = DataLoader(examples, batch_sampler=sampler, collate_fn=TextCollator(e2e_model.body, head))
    outcome = train_loop(
        accelerator=e2e_accelerator,
        model=e2e_model,
        loss_step=make_head_loss_step(head),
        dataloader=dataloader,
        cfg=e2e_cfg,
        output_dir=e2e_dir,
    )
    model.load_state_dict(outcome["model"].state_dict())
    model.head.kind = "linear"
    return {
        "steps": outcome["step"],
        "train_seconds": outcome["train_seconds"],
        "last_metrics": outcome["last_metrics"],
    }


def _data_summary(train: LabelledTexts | None, scored: ScoredPairs | None, cfg: SetFitConfig) -> str:
    parts = []
    if train is not None:
        parts.append(f"{len(train)} labelled texts from `{cfg.data.train}`")
    if scored is not None:
        parts.append(f"{len(scored)} scored pairs from `{cfg.data.pairs}`")
    return "; ".join(parts)


def _tuning_summary(counts: dict[str, int], cfg: SetFitConfig) -> str:
    """How the body was tuned, for the card: pairs per epoch, how they were generated, the loss."""
    if cfg.pairs.num_iterations:
        pairing = (
            f"{cfg.pairs.num_iterations} positive and {cfg.pairs.num_iterations} negative pairs per text"
        )
    else:
        pairing = f"strategy `{cfg.pairs.strategy}`"
    return (
        f"{counts.get('pairs_per_epoch', 0)} generated pairs per epoch ({pairing}, loss `{cfg.pairs.loss}`)"
    )


def export_checkpoint(cfg: SetFitConfig, checkpoint: Path, out_dir: Path) -> Path:
    """``ember-train export``: body and head exactly as a checkpoint holds them."""
    encoder = Encoder.from_pretrained(cfg.model.name_or_path, **cfg.model.encoder_kwargs())
    # <run>/checkpoints/step_N, or <run>/end_to_end/checkpoints/step_N: the head's labels are in <run>/head.
    run_dir = Path(checkpoint).parent.parent
    head_dirs = [d / HEAD_DIR for d in (run_dir, run_dir.parent) if (d / HEAD_DIR).is_dir()]
    head = LinearHead.load(head_dirs[0]) if head_dirs else None
    model = SetFitStyleModel(encoder, head)
    load_model_weights(model, checkpoint)
    dims = cfg.pairs.matryoshka_dims
    card = model_card(cfg, out_dir, command=export_command_line(checkpoint, out_dir), matryoshka_dims=dims)
    return model.save_pretrained(out_dir, model_card=card, matryoshka_dims=dims)


PIPELINE = Pipeline("setfit", SetFitConfig, run, export_checkpoint)
