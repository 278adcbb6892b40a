"""Contrastive tuning recipe: (query, positive[, hard negatives]) pairs -> InfoNCE -> export.

    accelerate launch train.py --config configs/quickstart.yaml [section.key=value ...]

Setup -> evaluate before -> train -> (best step, merge with the base) -> evaluate after -> export,
top to bottom. Everything distributed is in the sampler (each process's shard), the loss
(optional cross-device negatives) and the shared loop; this file reads like single-device code.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader

from ember_train.config import ConfigError, ExportConfig, ModelConfig, TrainConfig
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
from ember_train.evaluation.dims import check_eval_dims, evaluate_at_dims
from ember_train.evaluation.retrieval import RetrievalEvaluator
from ember_train.evaluation.tasks import load_tasks
from ember_train.losses.distill import DistillationLoss
from ember_train.losses.infonce import InfoNCELoss
from ember_train.losses.matryoshka import check_dims_fit, check_matryoshka_dims, with_matryoshka
from ember_train.models import Encoder
from ember_train.models.merge import cpu_state_dict, interpolate_state_dicts
from ember_train.models.sentence_transformers import export_encoder
from ember_train.pipelines.recipe import Pipeline, export_command_line, finish_run, model_card, start_run
from ember_train.pipelines.remining import MiningConfig, NegativeRemining
from ember_train.training import zero
from ember_train.training.checkpoint import best_weights_dir, load_model_weights, read_best_record
from ember_train.training.distributed import decide_on_main, map_sharded
from ember_train.training.grad_cache import slices_loss_step
from ember_train.training.loop import steps_per_epoch, train_loop
from ember_train.training.merge import MERGE_RULE, choose_alpha, format_table, score_alphas
from ember_train.training.select import MetricSelector

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
    # Matryoshka: the loss also on each prefix of the vectors, e.g. [384, 256, 128, 64] (unique,
    # descending; include the model's dimension to train the full vector). Empty: off.
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] | None = None  # one per dimension; default all 1
    # Distillation (losses/distill.py): loss = infonce_weight * InfoNCE + distill_weight * KL(teacher || student)
    # over each query's group; rows must carry `pos_score` and `neg_scores` (ember-train mine --teacher).
    infonce_weight: float = 1.0  # 0 with distill_weight > 0: distillation alone
    distill_weight: float = 0.0  # 0 = off
    distill_temperature: float = 0.05  # T_student: the student's cosines are divided by it
    distill_teacher_temperature: float = (
        0.05  # T_teacher: 0.05 for an embedding teacher's cosines, 1 for logits
    )

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.num_negatives < 0:
            raise ValueError("num_negatives must be >= 0")
        check_matryoshka_dims(self.matryoshka_dims, self.matryoshka_weights)
        for name in ("infonce_weight", "distill_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.infonce_weight == 0 and self.distill_weight == 0:
            raise ValueError("infonce_weight and distill_weight are both 0: nothing to train")
        for name in ("distill_temperature", "distill_teacher_temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.distill_weight > 0 and self.num_negatives < 1:
            raise ValueError(
                "distill_weight > 0 needs num_negatives >= 1: the teacher's distribution is over each "
                "query's positive and hard negatives (a group of one has nothing to rank)"
            )

    @property
    def distill(self) -> bool:
        return self.distill_weight > 0


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
    # Also evaluate each task on the first d coordinates of the vectors, e.g. [64, 128]; results
    # are named <dataset>@dim<d> (dev@dim64/ndcg@10). Empty: full length only.
    dims: list[int] = field(default_factory=list)
    # Export the weights of the best evaluation (every train.eval_every steps, and the last step)
    # instead of the last step's: a metric key as logged, "<dataset>/<metric>" (e.g. dev/ndcg@10,
    # STSB-300/cosine_spearman), or a weighted sum ("0.7*dev/ndcg@10 + 0.3*STSB-300/cosine_spearman").
    # null = the last step.
    select: str | None = None
    select_mode: Literal["max", "min"] = "max"  # whether a higher or a lower select score is better

    def __post_init__(self) -> None:
        check_eval_dims(self.dims)
        if self.select is not None:
            MetricSelector.parse(self.select, self.select_mode)  # a ValueError says what is wrong

    def selector(self) -> MetricSelector | None:
        return None if self.select is None else MetricSelector.parse(self.select, self.select_mode)


def _default_alphas() -> list[float]:
    return [i / 10 for i in range(11)]


@dataclass
class MergeConfig:
    """Weight-space merge of the tuned model with its base after training (docs/domain-adaptation.md)."""

    # Weight of the tuned model: merged = alpha * tuned + (1 - alpha) * base. null = no merge;
    # a number in [0, 1]; auto = the best of `alphas` by the rule below, on eval.data (the domain)
    # and eval.tasks (the general slice).
    alpha: float | Literal["auto"] | None = None
    alphas: list[float] = field(default_factory=_default_alphas)  # candidates for auto
    # auto's rule: the best domain score among the alphas whose general score (the mean of the
    # eval.tasks main scores, x100) is at most this many points below the base's; if none is, the
    # best general score.
    max_general_drop: float = 1.0
    base: str | None = None  # the base model to merge with; null = model.name_or_path

    def __post_init__(self) -> None:
        if isinstance(self.alpha, float) and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"merge.alpha must be in [0, 1] (the tuned model's weight) or auto, got {self.alpha}"
            )
        if not self.alphas:
            raise ValueError("merge.alphas must list at least one candidate alpha")
        bad = [a for a in self.alphas if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"merge.alphas must be in [0, 1], got {bad}")
        if not (math.isfinite(self.max_general_drop) and self.max_general_drop >= 0):
            raise ValueError(f"merge.max_general_drop must be a number >= 0, got {self.max_general_drop}")


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
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)  # hard negatives mined while training

    def __post_init__(self) -> None:
        if self.mining.enabled and self.loss.num_negatives == 0:
            raise ValueError(
                "mining.before_training/every_steps/every_epochs mine hard negatives: set loss.num_negatives > 0"
            )
        if self.mining.enabled and len(self.data.datasets()) > 1:
            raise ValueError(
                "mining: negatives mined while training read one dataset; data.train lists several "
                "(mine each file beforehand with ember-train mine)"
            )
        has_eval = self.eval.data is not None or bool(self.eval.tasks)
        if self.eval.select is not None and not has_eval:
            raise ValueError("eval.select needs an evaluation to select by: set eval.data and/or eval.tasks")
        if self.eval.select is not None and self.train.eval_every <= 0:
            raise ValueError("eval.select needs train.eval_every > 0 (the steps whose weights compete)")
        if self.merge.alpha == "auto" and (self.eval.data is None or not self.eval.tasks):
            raise ValueError(
                "merge.alpha: auto needs a domain evaluation (eval.data) and a general one (eval.tasks, "
                "e.g. configs/eval/general) to choose alpha by"
            )

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
            # Mined before step 0, the negatives need not be in the data.
            num_negatives=0 if cfg.mining.before_training else source.num_negatives,
            limit=cfg.data.max_examples,
            teacher_scores=cfg.loss.distill,
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


def run_evaluators(
    evaluators: list[Evaluator], encoder: Encoder, dims: list[int] | None = None
) -> list[EvalResult]:
    """Every evaluator at full length, then at each of ``dims`` (``eval.dims``)."""
    return evaluate_at_dims(evaluators, encoder, dims or [])


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


def make_loss_step(
    loss_fn: torch.nn.Module,
    grad_cache_chunk_size: int = 0,
    distill_fn: DistillationLoss | None = None,
    infonce_weight: float = 1.0,
    distill_weight: float = 0.0,
):
    """Embed queries and documents (positives, then negatives) and apply InfoNCE (or its Matryoshka
    wrapper), and/or the distillation KL against the batch's ``teacher_scores`` (``distill_fn``).

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
        if distill_fn is None:
            loss = loss_fn(query, documents[:size], negatives)
            return loss if infonce_weight == 1 else infonce_weight * loss
        parts = {"distill_loss": distill_fn(query, documents[:size], negatives, batch["teacher_scores"])}
        loss = distill_weight * parts["distill_loss"]
        if infonce_weight > 0:
            parts["infonce_loss"] = loss_fn(query, documents[:size], negatives)
            loss = loss + infonce_weight * parts["infonce_loss"]
        # For the logs: counts() runs after this on the same batch, in both step kinds.
        batch["loss_parts"] = {k: v.detach() for k, v in parts.items()}
        return loss

    def counts(batch: dict[str, Any]) -> dict[str, Any]:
        return {
            "samples": float(batch["query_order"].shape[0]),
            **batch["token_counts"],
            **batch.pop("loss_parts", {}),
        }

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
        encoder,
        num_negatives=cfg.loss.num_negatives,
        seed=cfg.seed,
        layout=layout,
        teacher_scores=cfg.loss.distill,
        sources=sources,
    )
    return DataLoader(examples, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.train.num_workers)


def check_fits_model(cfg: ContrastiveConfig, model_dim: int) -> None:
    """Vector lengths in the config that the model's vectors are too short for: an error before training."""
    try:
        check_dims_fit(cfg.loss.matryoshka_dims, model_dim, "loss.matryoshka_dims")
        check_dims_fit(cfg.eval.dims, model_dim, "eval.dims")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def run(cfg: ContrastiveConfig, command: str | None = None) -> dict[str, Any]:
    """Train, evaluate and export; returns the results written to ``<output_dir>/results.json``."""
    accelerator, output_dir = start_run(cfg, check=lambda acc: _check_mining(cfg, acc))
    evaluators = build_evaluators(cfg.eval)  # data errors and a select naming no set stop here, unloaded
    select = cfg.eval.selector()
    if select is not None:
        select.check_datasets([e.name for e in evaluators])

    # Data first: a missing or broken file stops the run before the model is loaded.
    examples, bad_rows = load_training_pairs(cfg)
    sources = pair_sources(cfg)
    loaded = Counter(e.dataset for e in examples)
    for d, (source, bad) in enumerate(zip(sources, bad_rows, strict=True)):
        name = f" ({source.name})" if len(sources) > 1 else ""
        accelerator.print(f"training pairs{name}: {loaded[d]} ({bad.summary()})")
    encoder = Encoder.from_pretrained(cfg.model.name_or_path, **cfg.model.encoder_kwargs())
    accelerator.print(f"model: {encoder.describe(cfg.model.name_or_path)}")
    check_fits_model(cfg, encoder.dim)
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

    def evaluate() -> dict[str, float]:
        return flat_metrics(run_evaluators(evaluators, encoder, cfg.eval.dims))

    before: list[EvalResult] | None = None
    if evaluators and cfg.eval.before_training and accelerator.is_main_process:
        encoder.to(accelerator.device)
        before = run_evaluators(evaluators, encoder, cfg.eval.dims)
        accelerator.print("before training:\n" + describe(None, before))
    accelerator.wait_for_everyone()
    if select is not None and evaluators and cfg.eval.before_training:  # a bad metric key stops here
        decide_on_main(accelerator, lambda: select.score(flat_metrics(before or [])))

    remining = None
    if cfg.mining.enabled:
        remining = NegativeRemining(
            examples,
            encoder,
            cfg.mining,
            num_negatives=cfg.loss.num_negatives,
            seed=cfg.seed,
            steps_per_epoch=steps_per_epoch(dataloader, cfg.train),
            autocast=accelerator.autocast,
            log=accelerator.print,
            show_progress=accelerator.is_local_main_process,
        )
    loss_fn = with_matryoshka(
        InfoNCELoss(cfg.loss.temperature, cfg.loss.symmetric, cfg.loss.gather_across_devices),
        cfg.loss.matryoshka_dims,
        cfg.loss.matryoshka_weights,
    )
    distill_fn = (
        DistillationLoss(cfg.loss.distill_temperature, cfg.loss.distill_teacher_temperature)
        if cfg.loss.distill
        else None
    )
    loss_step = make_loss_step(
        loss_fn,
        cfg.train.grad_cache_chunk_size,
        distill_fn=distill_fn,
        infonce_weight=cfg.loss.infonce_weight,
        distill_weight=cfg.loss.distill_weight,
    )
    outcome = train_loop(
        accelerator=accelerator,
        model=encoder,
        loss_step=loss_step,
        dataloader=dataloader,
        cfg=cfg.train,
        output_dir=output_dir,
        evaluate=evaluate if evaluators else None,
        backward_in_step=cfg.train.grad_cache_chunk_size > 0,
        select=select,
        refresh=remining,
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
    if select is not None and outcome["best_step"] > 0:
        best = best_weights_dir(output_dir, outcome["best_step"])
        load_model_weights(encoder, best)
        results["selected"] = {**read_best_record(output_dir, outcome["best_step"]), "steps": outcome["step"]}
        accelerator.print(f"selected step {outcome['best_step']} of {outcome['step']} by {select} ({best})")
    if cfg.merge.alpha is not None:
        results["merge"] = merge_with_base(cfg, encoder, evaluators, accelerator)
    if remining is not None:
        results["mining"] = remining.summary()
    after: list[EvalResult] = []
    if accelerator.is_main_process:
        after = run_evaluators(evaluators, encoder, cfg.eval.dims)
        if after:
            results["eval_after"] = [r.to_dict() for r in after]
            if before is not None:
                results["eval_before"] = [r.to_dict() for r in before]
            accelerator.print("before -> after training:\n" + describe(before, after))

    def export(export_dir: Path) -> dict[str, Any]:
        data_summary = f"{len(examples)} training pairs from " + ", ".join(
            f"`{d.path}`" for d in cfg.data.datasets()
        )
        card = model_card(
            cfg, export_dir, command=command, results=after, data_summary=data_summary,
            selected=results.get("selected"), merge=results.get("merge"),
            matryoshka_dims=cfg.loss.matryoshka_dims,
        )  # fmt: skip
        export_encoder(encoder, export_dir, model_card=card, matryoshka_dims=cfg.loss.matryoshka_dims)
        accelerator.print(f"exported to {export_dir}")
        return {"export_dir": str(export_dir)}

    return finish_run(accelerator, cfg, output_dir, results, command, export)


def flat_metrics(results: list[EvalResult]) -> dict[str, float]:
    """``{dataset/metric: value}``: the keys of the evaluation log and of ``eval.select``."""
    return {f"{r.dataset}/{k}": v for r in results for k, v in r.metrics.items()}


def merge_with_base(
    cfg: ContrastiveConfig, encoder: Encoder, evaluators: list[Evaluator], accelerator: Any
) -> dict[str, Any]:
    """Set ``encoder`` to ``alpha * tuned + (1 - alpha) * base`` on every process; with ``auto``,
    the main process scores ``merge.alphas`` (eval.data: domain, eval.tasks: general) and
    chooses, and every process takes its alpha. Returns results.json's ``merge``."""
    base_name = cfg.merge.base or cfg.model.name_or_path
    tuned = cpu_state_dict(encoder)
    base = cpu_state_dict(Encoder.from_pretrained(base_name, **cfg.model.encoder_kwargs()))
    out: dict[str, Any] = {"base": base_name}
    if cfg.merge.alpha == "auto":
        domain, general = evaluators[0], evaluators[1:]  # build_evaluators puts eval.data first
        names: dict[str, str] = {}

        def score() -> tuple[float, float]:
            domain_result, general_results = domain(encoder), [e(encoder) for e in general]
            names["domain"] = f"{domain_result.dataset} {domain_result.main_metric}"
            names["general"] = "mean of " + ", ".join(f"{r.dataset} {r.main_metric}" for r in general_results)
            return domain_result.main_score, sum(r.main_score for r in general_results) / len(general_results)

        def search() -> float:
            points = score_alphas(encoder, tuned, base, cfg.merge.alphas, score, log=accelerator.print)
            chosen = choose_alpha(points, cfg.merge.alphas, cfg.merge.max_general_drop)
            table = format_table(points, chosen.alpha)
            accelerator.print(
                f"merge with {base_name} ({MERGE_RULE.format(drop=cfg.merge.max_general_drop)}):\n{table}"
            )
            out.update(
                points=[p.to_dict() for p in points],
                table=table,
                **names,
                rule=MERGE_RULE.format(drop=cfg.merge.max_general_drop),
            )
            return chosen.alpha

        alpha = decide_on_main(accelerator, search)
    else:
        alpha = float(cfg.merge.alpha)
    encoder.load_state_dict(interpolate_state_dicts(tuned, base, alpha))
    accelerator.print(f"merged: {alpha:g} x tuned + {1 - alpha:g} x {base_name}")
    return {"alpha": alpha, **out}


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


def _check_mining(cfg: ContrastiveConfig, accelerator: Any) -> None:
    """Mining embeds on each process separately, which ZeRO-3's sharded forward cannot do."""
    if cfg.mining.enabled and zero.is_zero3(accelerator):
        raise ConfigError(
            "mining: mining during training is not supported under DeepSpeed ZeRO-3 (use ZeRO-2)"
        )


def export_checkpoint(cfg: ContrastiveConfig, checkpoint: Path, out_dir: Path) -> Path:
    """``ember-train export``: rebuild the encoder from the run's config and a checkpoint's weights."""
    encoder = Encoder.from_pretrained(cfg.model.name_or_path, **cfg.model.encoder_kwargs())
    load_model_weights(encoder, checkpoint)
    dims = cfg.loss.matryoshka_dims
    card = model_card(cfg, out_dir, command=export_command_line(checkpoint, out_dir), matryoshka_dims=dims)
    return export_encoder(encoder, out_dir, model_card=card, matryoshka_dims=dims)


PIPELINE = Pipeline("contrastive", ContrastiveConfig, run, export_checkpoint)
