"""Contrastive tuning recipe: (query, positive[, hard negatives]) pairs -> InfoNCE -> export.

    accelerate launch train.py --config configs/quickstart.yaml [section.key=value ...]

Setup -> evaluate before -> train -> evaluate after -> export, top to bottom. Everything
distributed is in the sampler (each process's shard), the loss (optional cross-device
negatives) and the shared loop; this file reads like single-device code.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from ember_train.config import ExportConfig, ModelConfig, TrainConfig
from ember_train.data.batching import BatchLayout, restore_order
from ember_train.data.pairs import (
    PairCollator,
    PairColumns,
    PairExample,
    PairSource,
    load_pairs,
    source_prefixed,
)
from ember_train.data.reader import BadRows, DataError
from ember_train.data.sampler import ShardedBatchSampler
from ember_train.evaluation.base import EvalResult, Evaluator
from ember_train.evaluation.retrieval import RetrievalEvaluator
from ember_train.evaluation.tasks import load_tasks
from ember_train.losses.infonce import InfoNCELoss
from ember_train.models import Encoder
from ember_train.models.sentence_transformers import export_encoder
from ember_train.pipelines.recipe import Pipeline, export_command_line, finish_run, model_card, start_run
from ember_train.training.checkpoint import load_model_weights
from ember_train.training.distributed import map_sharded
from ember_train.training.grad_cache import slices_loss_step
from ember_train.training.loop import train_loop

logger = logging.getLogger(__name__)


@dataclass
class PairDatasetConfig:
    """One dataset of a mixture (``data.train`` as a list); unset keys take the run's values."""

    path: str  # JSONL/CSV/Parquet file, directory, or Hub dataset name
    name: str | None = None  # in logs and results.json; default: the file name without its suffix
    weight: float = 1.0  # share of the epoch with data.sampling: weighted (0 leaves it out)
    query_prefix: str | None = None  # replaces model.query_prefix for this dataset's queries
    document_prefix: str | None = None  # replaces model.document_prefix for its positives and negatives
    num_negatives: int | None = None  # hard negatives per query; default loss.num_negatives
    columns: PairColumns | None = None  # default data.columns

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"weight must be >= 0, got {self.weight}")
        if self.num_negatives is not None and self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if self.name is None:
            self.name = Path(self.path).name.split(".")[0] or self.path


@dataclass
class PairDataConfig:
    # JSONL/CSV/Parquet file, directory, or Hub dataset name; or a list of datasets
    # (PairDatasetConfig: path, name, weight, query_prefix, document_prefix, num_negatives, columns)
    train: str | list[PairDatasetConfig]
    split: str = "train"  # Hub split
    columns: PairColumns = field(default_factory=PairColumns)
    on_bad_rows: Literal["error", "skip"] = "error"
    max_examples: int | None = None  # use only the first N examples (of each dataset) (quick experiments)
    group_by_length: bool = False  # length-aware batching: less padding, same randomness at bucket level
    # Several datasets: how many examples of each an epoch draws. proportional: all, once;
    # weighted: the total shared by `weight`; round_robin: the smallest one's size from each, in turns
    sampling: Literal["proportional", "weighted", "round_robin"] = "proportional"
    # every global batch from one dataset (its in-batch negatives from the same task); false
    # shuffles all datasets together (they must then share one num_negatives)
    same_dataset_batches: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.train, list):
            if not self.train:
                raise ValueError("train: the list of datasets is empty")
            names = [d.name for d in self.train]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(
                    f"train: two datasets are named {repeated[0]!r}; give each a distinct `name`"
                )
            if self.sampling == "weighted" and not sum(d.weight for d in self.train) > 0:
                raise ValueError("sampling: weighted needs a dataset with weight > 0")
            if self.sampling != "weighted" and len({d.weight for d in self.train}) > 1:
                logger.warning(
                    "data.train weights are used only with data.sampling: weighted (not %s)", self.sampling
                )

    def datasets(self) -> list[PairDatasetConfig]:
        """The training datasets; a plain ``train`` string is one dataset."""
        if isinstance(self.train, str):
            return [PairDatasetConfig(path=self.train)]
        return self.train


@dataclass
class LossConfig:
    temperature: float = 0.02
    num_negatives: int = 0  # hard negatives per query (group size - 1); rows must carry `neg`
    symmetric: bool = False  # add the document->query term
    gather_across_devices: bool = False  # in-batch negatives from every process

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.num_negatives < 0:
            raise ValueError("num_negatives must be >= 0")


@dataclass
class EvalConfig:
    data: str | None = None  # held-out pair file (same schema as training) or a BEIR folder
    split: str = "test"  # BEIR qrels split
    columns: PairColumns = field(default_factory=PairColumns)
    max_queries: int | None = None
    tasks: list[str] = field(default_factory=list)  # task descriptors, e.g. configs/eval/STSBenchmark.yaml
    data_root: str | None = None  # fills ${EMBER_EVAL_ROOT} in the descriptors
    batch_size: int = 64
    before_training: bool = True


@dataclass
class ContrastiveConfig:
    model: ModelConfig
    data: PairDataConfig
    task: str = "contrastive"
    output_dir: str = "runs/contrastive"
    seed: int = 42
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self) -> None:
        counts = {s.name: s.num_negatives for s in pair_sources(self)}
        if not self.data.same_dataset_batches and len(set(counts.values())) > 1:
            raise ValueError(
                "data.same_dataset_batches: false mixes datasets in a batch, which needs one num_negatives "
                f"for all of them (got {counts}); set the datasets' num_negatives equal, or keep "
                "same_dataset_batches: true"
            )


def pair_sources(cfg: ContrastiveConfig) -> list[PairSource]:
    """Each training dataset's negatives and prefixes, with the run's defaults filled in."""
    return [
        PairSource(
            name=str(d.name),
            num_negatives=cfg.loss.num_negatives if d.num_negatives is None else d.num_negatives,
            query_prefix=d.query_prefix,
            document_prefix=d.document_prefix,
        )
        for d in cfg.data.datasets()
    ]


def load_training_pairs(cfg: ContrastiveConfig) -> tuple[list[PairExample], list[BadRows]]:
    """Every dataset's pairs, each example tagged with its dataset's index (``PairExample.dataset``)."""
    examples: list[PairExample] = []
    bad_rows: list[BadRows] = []
    for index, (dataset, source) in enumerate(zip(cfg.data.datasets(), pair_sources(cfg), strict=True)):
        loaded, bad = load_pairs(
            dataset.path,
            columns=dataset.columns or cfg.data.columns,
            split=cfg.data.split,
            on_bad_rows=cfg.data.on_bad_rows,
            num_negatives=source.num_negatives,
            limit=cfg.data.max_examples,
        )
        for example in loaded:
            example.dataset = index
        examples += loaded
        bad_rows.append(bad)
    return examples, bad_rows


def build_evaluators(cfg: EvalConfig) -> list[Evaluator]:
    """Held-out retrieval (a BEIR folder, or pairs whose positives form the corpus) plus task descriptors."""
    evaluators: list[Evaluator] = []
    if cfg.data is not None:
        path = Path(cfg.data)
        if path.is_dir() and (path / "qrels").is_dir():
            evaluators.append(RetrievalEvaluator.from_beir(path, split=cfg.split, batch_size=cfg.batch_size))
        else:
            examples, _ = load_pairs(cfg.data, columns=cfg.columns)
            queries: dict[str, list[str]] = {}
            for e in examples:
                queries.setdefault(e.query, []).append(e.positive)
            items = list(queries.items())[: cfg.max_queries]
            evaluators.append(
                RetrievalEvaluator.from_pairs(
                    [q for q, _ in items], [p for _, p in items], name=path.stem, batch_size=cfg.batch_size
                )
            )
    if cfg.tasks:
        evaluators += load_tasks(cfg.tasks, data_root=cfg.data_root, batch_size=cfg.batch_size)
    return evaluators


def run_evaluators(evaluators: list[Evaluator], encoder: Encoder) -> list[EvalResult]:
    return [evaluator(encoder) for evaluator in evaluators]


def describe(before: list[EvalResult] | None, after: list[EvalResult]) -> str:
    """One line per task: main metric (before -> after)."""
    lines = []
    for i, result in enumerate(after):
        name = f"{result.dataset} {result.main_metric}"
        if before:
            lines.append(f"{name}: {before[i].main_score:.2f} -> {result.main_score:.2f}")
        else:
            lines.append(f"{name}: {result.main_score:.2f}")
    return "\n".join(lines)


def make_loss_step(loss_fn: InfoNCELoss, grad_cache_chunk_size: int = 0):
    """Embed queries and documents (positives, then negatives) and apply InfoNCE.

    With ``grad_cache_chunk_size > 0`` the step embeds in chunks through the gradient cache and
    runs its own backward passes (the loop is told so via ``backward_in_step``).
    """

    def loss_from_embeddings(embeddings: list[torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        num_query_slices = len(batch["query"])
        query = restore_order(embeddings[:num_query_slices], batch["query_order"])
        documents = restore_order(embeddings[num_query_slices:], batch["document_order"])
        size = query.shape[0]
        num_negatives = documents.shape[0] // size - 1  # from shapes: no read of device values
        negatives = documents[size:].view(size, num_negatives, -1) if num_negatives else None
        return loss_fn(query, documents[:size], negatives)

    def counts(batch: dict[str, Any]) -> dict[str, float]:
        return {"samples": float(batch["query_order"].shape[0]), **batch["token_counts"]}

    return slices_loss_step(
        lambda batch: [*batch["query"], *batch["documents"]],
        loss_from_embeddings,
        counts,
        grad_cache_chunk_size,
    )


def grouping_lengths(
    examples: list[PairExample], encoder: Encoder, sources: list[PairSource] | None = None
) -> list[int]:
    """Per example, the truncated token length of its positive, then of its query (a tie-break).

    Documents are most of the tokens, so batches grouped by document tokens pad least: on Debian
    pairs at 128 tokens, 13% padding against 23-25% when grouped by character counts. Counted
    with the prefixes of each example's dataset (``sources``), as the collator tokenizes them.
    """
    documents, document_kind = [e.positive for e in examples], "document"
    queries, query_kind = [e.query for e in examples], "query"
    if sources:
        documents, document_kind = source_prefixed(encoder, sources, examples, documents, "document")
        queries, query_kind = source_prefixed(encoder, sources, examples, queries, "query")
    documents = encoder.token_lengths(documents, kind=document_kind)
    queries = encoder.token_lengths(queries, kind=query_kind)
    return [d * (encoder.max_seq_length + 1) + q for d, q in zip(documents, queries, strict=True)]


def make_dataloader(
    examples: list[PairExample],
    encoder: Encoder,
    cfg: ContrastiveConfig,
    world_size: int,
    rank: int,
    pack: bool = False,
) -> DataLoader:
    mixture = isinstance(cfg.data.train, list)
    sources = pair_sources(cfg) if mixture else None
    lengths = None
    if cfg.data.group_by_length:  # every process needs all lengths; each computes 1/N of them
        lengths = map_sharded(lambda shard: grouping_lengths(shard, encoder, sources), examples)
    sampler = ShardedBatchSampler(
        len(examples),
        cfg.train.batch_size,
        world_size=world_size,
        rank=rank,
        seed=cfg.seed,
        dedup_keys=[(e.query, e.positive) for e in examples],
        lengths=lengths,
        dataset_ids=[e.dataset for e in examples] if mixture else None,
        sampling=cfg.data.sampling,
        weights=[d.weight for d in cfg.data.datasets()],
        same_dataset_batches=cfg.data.same_dataset_batches,
    )
    layout = BatchLayout.from_config(cfg.train, pack)
    collate = PairCollator(
        encoder, num_negatives=cfg.loss.num_negatives, seed=cfg.seed, layout=layout, sources=sources
    )
    return DataLoader(examples, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.train.num_workers)


def run(cfg: ContrastiveConfig, command: str | None = None) -> dict[str, Any]:
    """Train, evaluate and export; returns the results written to ``<output_dir>/results.json``."""
    accelerator, output_dir = start_run(cfg)

    # Data first: a missing or broken file stops the run before the model is loaded.
    examples, bad_rows = load_training_pairs(cfg)
    sources = pair_sources(cfg)
    loaded = Counter(e.dataset for e in examples)
    for d, (source, bad) in enumerate(zip(sources, bad_rows, strict=True)):
        name = f" ({source.name})" if len(sources) > 1 else ""
        accelerator.print(f"training pairs{name}: {loaded[d]} ({bad.summary()})")
    encoder = Encoder.from_pretrained(cfg.model.name_or_path, **cfg.model.encoder_kwargs())
    accelerator.print(f"model: {encoder.describe(cfg.model.name_or_path)}")
    if cfg.train.gradient_checkpointing:
        encoder.gradient_checkpointing_enable()
    layout = BatchLayout.for_run(cfg.train, encoder, accelerator.device)
    accelerator.print(f"batches: {layout.describe()}")
    dataloader = make_dataloader(
        examples, encoder, cfg, accelerator.num_processes, accelerator.process_index, pack=layout.pack
    )
    sampler = dataloader.batch_sampler
    if len(sources) > 1:
        accelerator.print(describe_mixture(cfg, sources, sampler))
    notes, useless = sampler.size_warnings("pairs")
    if useless and all(s.num_negatives == 0 for s in sources):
        distinct = len({e.query for e in examples} | {e.positive for e in examples})
        raise DataError(
            str(cfg.data.train),
            None,
            f"every batch holds a single pair ({len(examples)} pairs, {distinct} distinct texts): "
            "in-batch negatives need pairs with different texts, or hard negatives (loss.num_negatives)",
        )
    for note in notes:
        logger.warning(note)
    evaluators = build_evaluators(cfg.eval)

    def evaluate() -> dict[str, float]:
        return {
            f"{r.dataset}/{k}": v for r in run_evaluators(evaluators, encoder) for k, v in r.metrics.items()
        }

    before: list[EvalResult] | None = None
    if evaluators and cfg.eval.before_training and accelerator.is_main_process:
        encoder.to(accelerator.device)
        before = run_evaluators(evaluators, encoder)
        accelerator.print("before training:\n" + describe(None, before))
    accelerator.wait_for_everyone()

    loss_fn = InfoNCELoss(cfg.loss.temperature, cfg.loss.symmetric, cfg.loss.gather_across_devices)
    outcome = train_loop(
        accelerator=accelerator,
        model=encoder,
        loss_step=make_loss_step(loss_fn, cfg.train.grad_cache_chunk_size),
        dataloader=dataloader,
        cfg=cfg.train,
        output_dir=output_dir,
        evaluate=evaluate if evaluators else None,
        backward_in_step=cfg.train.grad_cache_chunk_size > 0,
    )

    trained = trained_counts(sampler, outcome["epoch"], outcome["batch_in_epoch"])
    results: dict[str, Any] = {
        "steps": outcome["step"],
        "train_seconds": outcome["train_seconds"],
        "train_examples": len(examples),
        "skipped_rows": sum(bad.total for bad in bad_rows),
        "last_metrics": outcome["last_metrics"],
        "datasets": {
            source.name: {
                "examples": loaded[d],
                "skipped_rows": bad_rows[d].total,
                "examples_per_epoch": sampler.quotas()[d],
                "trained_examples": trained[d],
            }
            for d, source in enumerate(sources)
        },
    }
    if len(sources) > 1:
        accelerator.print(
            "trained examples per dataset: "
            + ", ".join(f"{s.name} {n}" for s, n in zip(sources, trained, strict=True))
        )
    after: list[EvalResult] = []
    if accelerator.is_main_process:
        after = run_evaluators(evaluators, encoder)
        if after:
            results["eval_after"] = [r.to_dict() for r in after]
            if before is not None:
                results["eval_before"] = [r.to_dict() for r in before]
            accelerator.print("before -> after training:\n" + describe(before, after))

    def export(export_dir: Path) -> dict[str, Any]:
        data_summary = f"{len(examples)} training pairs from " + ", ".join(
            f"`{d.path}`" for d in cfg.data.datasets()
        )
        card = model_card(cfg, export_dir, command=command, results=after, data_summary=data_summary)
        export_encoder(encoder, export_dir, model_card=card)
        accelerator.print(f"exported to {export_dir}")
        return {"export_dir": str(export_dir)}

    return finish_run(accelerator, cfg, output_dir, results, command, export)


def describe_mixture(cfg: ContrastiveConfig, sources: list[PairSource], sampler: ShardedBatchSampler) -> str:
    """The mixture's plan for one epoch: each dataset's examples and global batches."""
    counts, batches = sampler.dataset_counts(0), sampler.dataset_batches(0)
    mode = "one dataset per batch" if cfg.data.same_dataset_batches else "mixed batches"
    lines = [f"datasets ({cfg.data.sampling} sampling, {mode}), per epoch:"]
    for source, n, b in zip(sources, counts, batches, strict=True):
        lines.append(f"  {source.name}: {n} examples in {b} batches, {source.num_negatives} hard negatives")
    return "\n".join(lines)


def trained_counts(sampler: ShardedBatchSampler, epoch: int, batch_in_epoch: int) -> list[int]:
    """Examples of each dataset the run trained on: the full epochs, then the batches of the last."""
    totals = [0] * sampler.num_datasets
    for e in range(epoch + 1):
        counts = sampler.dataset_counts(e, batch_in_epoch if e == epoch else None)
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
    return totals


def export_checkpoint(cfg: ContrastiveConfig, checkpoint: Path, out_dir: Path) -> Path:
    """``ember-train export``: rebuild the encoder from the run's config and a checkpoint's weights."""
    encoder = Encoder.from_pretrained(cfg.model.name_or_path, **cfg.model.encoder_kwargs())
    load_model_weights(encoder, checkpoint)
    card = model_card(cfg, out_dir, command=export_command_line(checkpoint, out_dir))
    return export_encoder(encoder, out_dir, model_card=card)


PIPELINE = Pipeline("contrastive", ContrastiveConfig, run, export_checkpoint)
