"""The ember recipe: a new ember checkpoint for a field, every stage from one config.

    accelerate launch train.py --config configs/ember_domain_quick.yaml [section.key=value ...]

RetroMAE on raw text (optional) -> hard-negative mining with the current model (optional) ->
contrastive tuning, evaluated before and after -> the export, whose model card lists every stage.
Each stage runs an existing recipe's ``run`` (or the miner behind ``ember-train mine``) with a
config built from this one, in its own directory, and starts from the previous stage's output:

* ``<output_dir>/stages/1-retromae``: a retromae run (``config.yaml``, ``checkpoints/``,
  ``results.json``, ``final/`` = the encoder export the next stages start from, ``pretrained/``).
* ``<output_dir>/stages/2-mining``: ``pairs.jsonl`` (the contrastive pairs with ``neg`` filled in
  by the current model), ``config.yaml``, ``results.json``.
* ``<output_dir>/stages/3-contrastive``: a contrastive run on those pairs; it exports to
  ``<output_dir>/final`` (``export.dir``), whose card this recipe then writes.
* ``<output_dir>/results.json``: every stage's data, steps, time and metrics before and after.

A stage section holds the sections of its recipe's config; ``model`` and ``train`` there override
the top-level ones, which every stage inherits. The whole config, every stage included, is checked
before anything is loaded. A stage is done when its ``results.json`` (and its export) exist: with
``train.resume: auto`` a rerun skips done stages, saying so and naming any key changed since, and
the interrupted stage resumes from its newest checkpoint exactly as its recipe alone would.
``train.resume: none`` runs every stage afresh.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate.state import PartialState

from ember_train.config import (
    ConfigError,
    ExportConfig,
    ModelConfig,
    TrainConfig,
    changes_since_saved,
    from_dict,
    read_yaml,
    save_config,
    to_dict,
)
from ember_train.data.reader import DataError
from ember_train.evaluation.base import EvalResult
from ember_train.evaluation.mining import MiningSettings, read_corpus, read_pair_rows, write_jsonl
from ember_train.export.hub import check_hub_access, push_export
from ember_train.models import Encoder
from ember_train.models.encoder import resolve_model_path
from ember_train.models.retromae import checkpoint_has_mlm_head
from ember_train.models.sentence_transformers import read_matryoshka_dims, read_sentence_transformers_settings
from ember_train.pipelines import contrastive, retromae
from ember_train.pipelines.contrastive import ContrastiveConfig, PairDataConfig
from ember_train.pipelines.recipe import Pipeline, chained_runs, model_card
from ember_train.pipelines.retromae import RetroMAEConfig
from ember_train.training.distributed import ShardedEncoder
from ember_train.training.loop import build_accelerator

logger = logging.getLogger(__name__)

MINED_PAIRS = "pairs.jsonl"
_PIPELINES = {"retromae": retromae.PIPELINE, "contrastive": contrastive.PIPELINE}  # the model stages' recipes
# Keys of a stage's recipe config that this recipe sets, and what sets them.
_OWNED = {
    "task": "the stage's recipe",
    "output_dir": "output_dir/stages/<stage>",
    "export": "the top-level export section is the final model's",
}


@dataclass
class MiningConfig(MiningSettings):
    """The ``mining:`` stage: what ``ember-train mine`` takes. It mines for the contrastive pairs."""

    enabled: bool = True
    num_negatives: int = 4  # per query; also the contrastive stage's loss.num_negatives unless set there
    corpus: str | None = None  # documents to mine from; default: every distinct positive
    corpus_field: str = "text"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_negatives < 1:
            raise ValueError("num_negatives must be >= 1")


@dataclass
class EmberConfig:
    model: ModelConfig  # the starting checkpoint, and the encoder settings every stage inherits
    # The sections of a contrastive config (data, loss, train, eval; model: overrides).
    contrastive: dict[str, Any]
    task: str = "ember"
    output_dir: str = "runs/ember"
    seed: int = 42
    train: TrainConfig = field(default_factory=TrainConfig)  # every stage's; a stage's train: overrides
    # The sections of a retromae config (data, retromae, train, eval; model: overrides), and
    # `enabled` (default true). Absent: no RetroMAE stage.
    retromae: dict[str, Any] | None = None
    mining: MiningConfig | None = None  # absent: the contrastive stage trains on its pairs as they are
    export: ExportConfig = field(default_factory=ExportConfig)  # the final model (the contrastive stage's)


@dataclass
class MiningRun:
    """The mining stage's config: its settings, the model it mines with and the pairs it mines for."""

    mining: MiningConfig
    model: ModelConfig
    data: PairDataConfig
    seed: int
    output_dir: str


@dataclass
class Stage:
    name: str  # its directory under <output_dir>/stages
    key: str  # its section in the recipe config
    cfg: Any  # RetroMAEConfig | MiningRun | ContrastiveConfig; None when disabled
    skipped: str | None = None  # why an enabled stage does not run (cfg is then None)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def export_dir(self) -> Path | None:
        """The stage's model export (None for mining, or with export disabled)."""
        export = getattr(self.cfg, "export", None)
        if export is None or not export.enabled:
            return None
        return Path(export.dir or self.dir / "final")

    def done(self) -> bool:
        if not (self.dir / "results.json").is_file():
            return False
        if self.key == "mining":
            return (self.dir / MINED_PAIRS).is_file()
        return self.export_dir is None or (self.export_dir / "modules.json").is_file()

    def started(self) -> bool:
        return self.dir.is_dir() and any(self.dir.iterdir())

    def results(self) -> dict[str, Any]:
        return json.loads((self.dir / "results.json").read_text(encoding="utf-8"))


def _section(value: Any, key: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}: expected a mapping (section), got {type(value).__name__}")
    return dict(value)


def stage_config(
    cls: type,
    key: str,
    section: dict[str, Any],
    cfg: EmberConfig,
    source: str,
    name_or_path: str,
    **owned: Any,
):
    """``cls`` (a recipe's config) from a stage section over the top-level sections, starting from
    ``name_or_path``; errors name keys as ``<key>.<section>.<name>``."""
    for name, what in _OWNED.items():
        if name in section:
            raise ConfigError(f"{source}: {key}.{name} is set by the ember recipe: {what}")
    model = _section(section.get("model"), f"{key}.model", source)
    if "name_or_path" in model:
        raise ConfigError(
            f"{source}: {key}.model.name_or_path is set by the ember recipe: the previous stage's export "
            "(the first stage starts from model.name_or_path)"
        )
    train = _section(section.get("train"), f"{key}.train", source)
    if "resume" in train:
        raise ConfigError(f"{source}: {key}.train.resume: set train.resume at the top level (all stages)")
    data = {
        **section,
        "task": cls.__dataclass_fields__["task"].default,
        "seed": section.get("seed", cfg.seed),
        "model": {**to_dict(cfg.model), **model, "name_or_path": name_or_path},
        "train": {**to_dict(cfg.train), **train},
        **owned,
    }
    return from_dict(cls, data, source=source, prefix=f"{key}.")


def build_stages(cfg: EmberConfig, source: str = "<config>") -> list[Stage]:
    """Every stage's config, in order (``cfg=None`` for a disabled one); a bad key raises ConfigError."""
    if cfg.train.resume not in ("auto", "none"):
        raise ConfigError(
            f"{source}: train.resume: the ember recipe takes auto or none, got {cfg.train.resume!r}"
        )
    root = Path(cfg.output_dir) / "stages"
    model = cfg.model.name_or_path  # the current model: each model stage's export feeds the next stage

    retro = _section(cfg.retromae, "retromae", source)
    enabled = retro.pop("enabled", "auto" if cfg.retromae is not None else False)
    if not isinstance(enabled, bool) and enabled != "auto":
        raise ConfigError(f"{source}: retromae.enabled: expected true, false or auto, got {enabled!r}")
    retro_cfg, retro_skipped = None, None
    if enabled:
        retro_cfg = stage_config(
            RetroMAEConfig, "retromae", retro, cfg, source,
            name_or_path=model, output_dir=str(root / "1-retromae"), export={"enabled": True},
        )  # fmt: skip
    if enabled == "auto" and not retromae_can_help(cfg.model):
        retro_cfg, retro_skipped = None, f"{cfg.model.name_or_path} {NO_MLM_HEAD}"
    if retro_cfg is not None:
        model = str(Path(retro_cfg.output_dir) / "final")

    final_dir = Path(cfg.export.dir or Path(cfg.output_dir) / "final")
    export = {
        "enabled": cfg.export.enabled,
        "dir": str(final_dir),
        "model_name": cfg.export.card_name(final_dir),
    }
    section = _section(cfg.contrastive, "contrastive", source)
    contrastive_cfg = stage_config(
        ContrastiveConfig, "contrastive", section, cfg, source,
        name_or_path=model, output_dir=str(root / "3-contrastive"), export=export,
    )  # fmt: skip
    if contrastive_cfg.merge.base is None:  # merge back towards the starting model, not RetroMAE's output
        contrastive_cfg.merge.base = cfg.model.name_or_path

    mining_run = None
    if cfg.mining is not None and cfg.mining.enabled:
        if isinstance(contrastive_cfg.data.train, list):
            raise ConfigError(
                f"{source}: contrastive.data.train: mining reads one pair file, not a list of datasets"
            )
        mining_run = MiningRun(
            mining=cfg.mining,
            model=copy.deepcopy(contrastive_cfg.model),  # embed as the contrastive stage will
            data=copy.deepcopy(contrastive_cfg.data),
            seed=cfg.seed,
            output_dir=str(root / "2-mining"),
        )
        contrastive_cfg.data.train = str(root / "2-mining" / MINED_PAIRS)
        if "num_negatives" not in _section(section.get("loss"), "contrastive.loss", source):
            contrastive_cfg.loss.num_negatives = cfg.mining.num_negatives

    stages = [
        Stage("1-retromae", "retromae", retro_cfg, skipped=retro_skipped),
        Stage("2-mining", "mining", mining_run),
        Stage("3-contrastive", "contrastive", contrastive_cfg),
    ]
    # One process runs every stage, and accelerate fixes the precision once per process.
    precisions = {s.key: s.cfg.train.mixed_precision for s in stages if hasattr(s.cfg, "train")}
    if len(set(precisions.values())) > 1:
        raise ConfigError(
            f"{source}: train.mixed_precision differs between stages ({precisions}); accelerate sets it "
            "once per process, so set it at the top level only"
        )
    return stages


# Measured: 3 seeds of configs/ember_domain_quick.yaml, docs/domain-adaptation.md.
NO_MLM_HEAD = (
    "has no trained MLM head, and RetroMAE from a new head did not help all-MiniLM-L6-v2 on Debian "
    "(-0.94 nDCG@10, -0.05 with warm-ups; docs/domain-adaptation.md); retromae.enabled: true runs it anyway"
)


def retromae_can_help(model: ModelConfig) -> bool:
    """``retromae.enabled: auto``: run RetroMAE on a body that ships its MLM head (or when that cannot
    be told, e.g. an unreachable Hub model); skip it for one without, where it measured harmful."""
    name = resolve_model_path(model.name_or_path)
    has_head = checkpoint_has_mlm_head(name, trust_remote_code=model.trust_remote_code)
    if has_head is None:
        logger.info("could not read %s's weight names: RetroMAE runs (retromae.enabled: auto)", name)
    return has_head is not False


def check_config(cfg: EmberConfig, source: str) -> None:
    build_stages(cfg, source)


def mine(run: MiningRun, train: TrainConfig) -> dict[str, Any]:
    """The mining stage: the pairs with ``neg`` filled in by the current model, as ``pairs.jsonl``.

    Every process embeds its share of the texts and searches; the main process writes.
    """
    out = Path(run.output_dir)
    accelerator = build_accelerator(train, out, run.seed, trackers=False)
    if accelerator.is_main_process:
        save_config(run, out / "config.yaml")
    start = time.perf_counter()
    columns, settings = run.data.columns, run.mining
    rows, bad = read_pair_rows(
        run.data.train, query=columns.query, pos=columns.pos, on_bad_rows=run.data.on_bad_rows
    )
    corpus = None
    if settings.corpus:
        corpus = read_corpus(settings.corpus, field=settings.corpus_field, on_bad_rows=run.data.on_bad_rows)
    encoder = Encoder.from_pretrained(run.model.name_or_path, **run.model.encoder_kwargs())
    encoder.to(accelerator.device).eval()
    with accelerator.autocast():
        mined, stats = settings.mine(
            ShardedEncoder(encoder),
            [{"query": r[columns.query], "pos": r[columns.pos]} for r in rows],
            corpus=corpus,
            num_negatives=settings.num_negatives,
            seed=run.seed,
            show_progress=accelerator.is_local_main_process,
        )
    # A query left with no negative cannot be trained with loss.num_negatives > 0: dropped, counted.
    kept = [{**row, columns.neg: m["neg"]} for row, m in zip(rows, mined, strict=True) if m["neg"]]
    if not kept:
        raise DataError(
            run.data.train, None, "mining left no pair with a negative; widen mining.rank_window or "
            "raise mining.max_score_ratio",
        )  # fmt: skip
    results = {
        "data": run.data.train,
        "model": run.model.name_or_path,
        "output": str(out / MINED_PAIRS),
        "seconds": time.perf_counter() - start,
        "skipped_rows": bad.total,
        "rows_without_negatives": len(rows) - len(kept),  # left out of the mined pairs
        "mining": stats.__dict__,
        "summary": stats.summary(),
    }
    if accelerator.is_main_process:
        write_jsonl(kept, out / MINED_PAIRS)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        accelerator.print(
            f"mined: {stats.summary()}; wrote {len(kept)} pairs to {out / MINED_PAIRS} "
            f"({len(rows) - len(kept)} left out: no negative survived the filters)"
        )
    accelerator.wait_for_everyone()
    return results


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(text: str) -> None:
    if _is_main_process():
        print(text, flush=True)


def changes_since(stage: Stage) -> list[str]:
    """Keys of the stage's config that differ from those it ran with (``train.resume`` aside); the
    saved config is resolved as a resume resolves it (:func:`~ember_train.config.changes_since_saved`)."""
    path = stage.dir / "config.yaml"
    try:
        changes = changes_since_saved(read_yaml(path), stage.cfg, source=str(path))
    except (OSError, ConfigError) as e:  # the error names the file
        return [f"not comparable: {e}"]
    return [f"{stage.key}.{c}" for c in changes if not c.startswith("train.resume:")]


def _before_after(before: dict[str, float] | None, after: dict[str, float] | None, digits: int) -> str:
    if not after:
        return ""
    return ", ".join(
        f"{k} {before[k]:.{digits}f} → {v:.{digits}f}" if before and k in before else f"{k} {v:.{digits}f}"
        for k, v in after.items()
    )


def stage_summary(stage: Stage, ran: bool) -> dict[str, Any]:
    """One stage's row of the recipe's results.json and model card, read from its results.json."""
    r = stage.results()
    row: dict[str, Any] = {"stage": stage.name, "dir": str(stage.dir), "ran": ran}
    if stage.key == "retromae":
        before = {k: v for k, v in (r.get("eval_before") or {}).items() if k.endswith("_acc")}
        after = {k: v for k, v in (r.get("eval_after") or {}).items() if k.endswith("_acc")}
        row.update(
            model_in=stage.cfg.model.name_or_path, model_out=r.get("export_dir"),
            data=f"`{stage.cfg.data.train}` ({r.get('corpus')})", steps=r.get("steps"),
            train_seconds=r.get("train_seconds"), metrics_before=r.get("eval_before"),
            metrics_after=r.get("eval_after"), metrics=_before_after(before, after, 3),
        )  # fmt: skip
    elif stage.key == "mining":
        m = r["mining"]
        row.update(
            model_in=r["model"], data=f"`{r['data']}`", output=r["output"], steps=None,
            train_seconds=r["seconds"], mining=m,
            metrics=f"{m['negatives_written']} negatives for {m['rows']} pairs "
            f"({r['rows_without_negatives']} left without one)",
        )  # fmt: skip
    else:
        scores = {"before": {}, "after": {}}
        for when in scores:
            for result in r.get(f"eval_{when}") or []:
                scores[when][f"{result['dataset']} {result['main_metric']}"] = result["main_score"]
        row.update(
            model_in=stage.cfg.model.name_or_path, model_out=r.get("export_dir"),
            data=f"{r['train_examples']} pairs from `{stage.cfg.data.train}`", steps=r["steps"],
            train_seconds=r["train_seconds"], metrics_before=r.get("eval_before"),
            metrics_after=r.get("eval_after"), metrics=_before_after(scores["before"], scores["after"], 2),
        )  # fmt: skip
    return row


def run(cfg: EmberConfig, command: str | None = None) -> dict[str, Any]:
    """Run the stages in order; returns what is written to ``<output_dir>/results.json``."""
    stages = build_stages(cfg)
    output_dir = Path(cfg.output_dir)
    resume = cfg.train.resume == "auto"
    enabled = [s for s in stages if s.cfg is not None]
    if resume:  # a stage to (re)run must not leave a later one holding outputs of an earlier input
        for i, stage in enumerate(enabled):
            later = [s for s in enabled[i + 1 :] if s.started()]
            if not stage.done() and later:
                raise ConfigError(
                    f"stage {stage.name} is to run, but {later[0].dir} holds outputs made from its earlier "
                    "output; delete it (and the stages after it) to redo them, or use train.resume=none"
                )
    # Done stages whose config changed since: kept as they are, and named.
    changed = {s.name: changes_since(s) for s in enabled if resume and s.done()}
    changed = {name: keys for name, keys in changed.items() if keys}
    if _is_main_process():
        if cfg.export.hub_repo_id:
            check_hub_access(cfg.export.hub_repo_id)
        if not changed:  # else the saved config stays that of the run that made the outputs
            save_config(cfg, output_dir / "config.yaml")  # stages warn for themselves

    ran: set[str] = set()
    for number, stage in enumerate(stages, 1):
        if stage.cfg is None:
            _say(
                f"== stage {number}/3 {stage.key}: "
                + (f"skipped: {stage.skipped}" if stage.skipped else "disabled")
            )
            if stage.skipped and _is_main_process():
                logger.warning("stage %s skipped: %s", stage.name, stage.skipped)
            continue
        if resume and stage.done():
            _say(f"== stage {number}/3 {stage.key}: done ({stage.dir / 'results.json'}), skipped")
            if _is_main_process() and stage.name in changed:
                logger.warning(
                    "stage %s is done but its config changed since (%s); it is not redone. Delete %s to "
                    "redo it and the stages after it.",
                    stage.name, ", ".join(changed[stage.name]), stage.dir,
                )  # fmt: skip
            continue
        _say(f"== stage {number}/3 {stage.key}: {stage.cfg.model.name_or_path} -> {stage.dir}")
        if stage.key == "mining":
            mine(stage.cfg, cfg.train)
        else:
            with chained_runs():  # the process group stays open for the next stage
                _PIPELINES[stage.key].run(stage.cfg, command=command)
        ran.add(stage.name)

    rows = [stage_summary(s, s.name in ran) for s in enabled]
    results: dict[str, Any] = {"stages": rows}
    final = next(s for s in stages if s.key == "contrastive")
    if final.export_dir is not None:
        results["export_dir"] = str(final.export_dir)
    if _is_main_process():
        if final.export_dir is not None and (ran or not changed):  # a card of the config that made it
            write_card(cfg, final, rows, command)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        print_summary(rows)
        if cfg.export.hub_repo_id and final.export_dir is not None:
            print(f"uploaded {final.export_dir} to {push_export(final.export_dir, cfg.export, command)}")
    PartialState().wait_for_everyone()
    PartialState().destroy_process_group()  # what each stage's end_training() left open
    return results


def write_card(cfg: EmberConfig, final: Stage, rows: list[dict[str, Any]], command: str | None) -> None:
    """The final export's README: the recipe's config and stages, the contrastive stage's evaluation."""
    export_dir = final.export_dir
    assert export_dir is not None
    training = to_dict(cfg)
    training["model"].update(read_sentence_transformers_settings(export_dir))  # the settings as exported
    results = final.results()
    after = [EvalResult.from_dict(r) for r in results.get("eval_after") or []]
    card = model_card(
        cfg, export_dir, command=command, results=after, training=training,
        data_summary=rows[-1]["data"], stages=rows, matryoshka_dims=read_matryoshka_dims(export_dir),
        selected=results.get("selected"), merge=results.get("merge"),
    )  # fmt: skip
    (export_dir / "README.md").write_text(card, encoding="utf-8")


def print_summary(rows: list[dict[str, Any]]) -> None:
    print("\nember recipe: stages (metrics before → after)")
    for row in rows:
        steps = "" if row.get("steps") is None else f"{row['steps']} steps, "
        print(f"  {row['stage']:<14} {steps}{row['train_seconds']:.0f} s  {row['metrics']}")


def _under(path: Path, directory: Path) -> bool:
    return Path(path).resolve().is_relative_to(directory.resolve())


def export_checkpoint(cfg: EmberConfig, checkpoint: Path, out_dir: Path) -> Path:
    """``ember-train export`` with the recipe's config: the checkpoint's stage exports it."""
    for stage in build_stages(cfg):
        if stage.key in _PIPELINES and stage.cfg is not None and _under(checkpoint, stage.dir):
            return _PIPELINES[stage.key].export_checkpoint(stage.cfg, checkpoint, out_dir)
    raise ConfigError(f"{checkpoint} is not a checkpoint of a model stage under {cfg.output_dir}/stages")


PIPELINE = Pipeline("ember", EmberConfig, run, export_checkpoint, check_config=check_config)
