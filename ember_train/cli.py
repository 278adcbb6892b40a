"""``ember-train`` command line: train, export, eval, mine, predict. Every command is here.

``train`` takes the config and ``section.key=value`` overrides, exactly like ``train.py``, so the
config stays the whole experiment.

ember-train eval MODEL --tasks configs/eval/STS12.yaml,configs/eval/SciFact.yaml --data-root DIR
ember-train eval MODEL --mteb STS12,SciFact            # the official mteb package (online)
ember-train eval MODEL --tasks ... --dims 64,128       # also on the first 64 and 128 coordinates
ember-train mine --model MODEL --pairs train.jsonl --output mined.jsonl --rank-window 10,100
ember-train predict runs/setfit/final --text "my package does not install"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from ember_train.config import ConfigError, read_yaml
from ember_train.data.reader import DataError, check_text, iter_records

logger = logging.getLogger(__name__)

# Messages of libraries that say nothing to a user of ember-train: what they report is expected
# (tied MLM-head weights are saved once; a body without an MLM head gets a new one, which the
# RetroMAE pipeline states itself).
_EXPECTED_LIBRARY_MESSAGES = {
    "accelerate.utils.other": ("Removed shared tensor",),
    "transformers.modeling_utils": ("This checkpoint seem corrupted",),
}
# transformers' per-call progress bars for reading and writing one model file (milliseconds here).
_QUIET_PROGRESS_BARS = ("Loading weights", "Writing model shards")


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith(self.starts)


def _without_weight_file_bars(factory, args, kwargs):  # noqa: ANN001 (transformers' tqdm hook)
    if str(kwargs.get("desc", "")).startswith(_QUIET_PROGRESS_BARS):
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def _setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # accelerate logs five INFO lines per checkpoint; ember-train's own "saved checkpoint" says it.
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name, starts in _EXPECTED_LIBRARY_MESSAGES.items():
        logging.getLogger(name).addFilter(_DropMessages(starts))
    from transformers.utils import logging as transformers_logging

    if hasattr(transformers_logging, "set_tqdm_hook"):  # transformers >= 5
        transformers_logging.set_tqdm_hook(_without_weight_file_bars)


def train_command(args: argparse.Namespace) -> int:
    from ember_train.pipelines import get_pipeline, load_config

    cfg = load_config(args.config, args.overrides)

    pipeline = get_pipeline(cfg.task)
    command = "accelerate launch train.py " + " ".join(
        shlex.quote(a) for a in ["--config", args.config, *args.overrides]
    )
    pipeline.run(cfg, command=command)
    return 0


def export_command(args: argparse.Namespace) -> int:
    """Export a checkpoint (``<run>/checkpoints/step_N``) with the run's config."""
    checkpoint = Path(args.checkpoint)
    config_path = Path(args.config) if args.config else checkpoint.parent.parent / "config.yaml"
    data = read_yaml(config_path)
    from ember_train.pipelines import get_pipeline, parse_config

    cfg = parse_config(data, source=str(config_path))
    pipeline = get_pipeline(cfg.task)
    import torch

    from ember_train.training.hardware import tell_deepspeed_the_device

    tell_deepspeed_the_device("cuda" if torch.cuda.is_available() else "cpu")
    if args.hub_repo_id:  # the config's own export.hub_repo_id is for its training run, not this command
        from ember_train.export.hub import check_hub_access

        private = cfg.export.hub_private if args.hub_private is None else args.hub_private
        try:
            cfg.export = dataclasses.replace(
                cfg.export, enabled=True, hub_repo_id=args.hub_repo_id, hub_private=private
            )
        except ValueError as e:
            raise ConfigError(f"--hub-repo-id: {e}") from None
        check_hub_access(args.hub_repo_id)
    out = pipeline.export_checkpoint(cfg, checkpoint, Path(args.output))
    print(f"exported {checkpoint} to {out}")
    if args.hub_repo_id:
        from ember_train.export.hub import push_export

        command = "ember-train export " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        print(f"uploaded {out} to {push_export(out, cfg.export, command)}")
    return 0


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _window(value: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END (e.g. 10,100), got {value!r}") from None
    return lo, hi


def eval_command(args: argparse.Namespace) -> int:
    from ember_train.evaluation.base import EvalResult
    from ember_train.evaluation.dims import check_eval_dims, evaluate_at_dims
    from ember_train.evaluation.loading import load_encoder
    from ember_train.evaluation.tasks import load_tasks
    from ember_train.export.model_card import render_model_card, results_table, update_model_card
    from ember_train.losses.matryoshka import check_dims_fit

    if not args.tasks and not args.mteb:
        raise DataError(
            "ember-train eval", None, "give --tasks (descriptor files) and/or --mteb (task names)"
        )
    try:
        dims = [int(d) for d in _csv(args.dims)]
        check_eval_dims(dims)
    except ValueError as e:
        raise DataError("--dims", None, f"{e} (expected lengths like 64,128)") from None
    if dims and args.mteb:
        raise DataError("--dims", None, "works with --tasks only (the mteb package evaluates full vectors)")
    results: list[EvalResult] = []
    if args.tasks:
        evaluators = load_tasks(_csv(args.tasks), data_root=args.data_root, batch_size=args.batch_size)
        encoder = load_encoder(args.model, max_seq_length=args.max_seq_length, device=args.device)
        try:
            check_dims_fit(dims, encoder.dim, "--dims")
        except ValueError as e:
            raise DataError(str(args.model), None, str(e)) from None
        for evaluator in evaluators:
            for result in evaluate_at_dims([evaluator], encoder, dims):
                print(f"{result}", flush=True)
                results.append(result)
    if args.mteb:
        from ember_train.evaluation.mteb_runner import MTEBTaskError, run_mteb

        try:
            results += run_mteb(args.model, _csv(args.mteb), batch_size=args.batch_size, device=args.device)
        except (ImportError, MTEBTaskError) as e:
            # A user error (missing optional package, misspelt task): one line, no traceback.
            raise DataError("--mteb", None, str(e)) from None
    print()
    print(results_table(results))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(
            json.dumps([r.to_dict() for r in results], indent=2) + "\n", encoding="utf-8"
        )
        print(f"results written to {args.output}")
    if args.update_card:
        readme = Path(args.model) / "README.md"
        if not Path(args.model).is_dir():
            raise DataError(str(args.model), None, "--update-card needs a local model directory")
        name = Path(args.model).resolve().name
        if readme.is_file():
            card = update_model_card(readme.read_text(encoding="utf-8"), model_name=name, results=results)
        else:
            card = render_model_card(
                model_name=name, base_model=str(args.model), results=results, training={}, command=None
            )
        readme.write_text(card, encoding="utf-8")
        print(f"model card updated: {readme}")
    return 0


def mine_command(args: argparse.Namespace) -> int:
    """Mine hard negatives with ``--model``, and/or score each row's group with ``--teacher``.

    With ``--teacher`` alone the file's own negatives (``--neg-field``) are scored, not re-mined.
    """
    from ember_train.evaluation.loading import load_encoder
    from ember_train.evaluation.mining import (
        mine_hard_negatives,
        read_corpus,
        read_pair_rows,
        score_pairs,
        write_jsonl,
    )

    if not args.model and not args.teacher:
        raise DataError(
            "ember-train mine", None, "give --model (to mine negatives) and/or --teacher (to score them)"
        )
    rows, bad = read_pair_rows(
        args.pairs,
        query=args.query_field,
        pos=args.pos_field,
        on_bad_rows=args.on_bad_rows,
        neg=None if args.model else args.neg_field,
    )
    if bad.total:
        logger.warning("%s: %s", args.pairs, bad.summary())
    pairs = [{"query": r[args.query_field], "pos": r[args.pos_field]} for r in rows]
    if args.model:
        corpus = (
            read_corpus(args.corpus, field=args.corpus_field, on_bad_rows=args.on_bad_rows)
            if args.corpus
            else None
        )
        encoder = load_encoder(args.model, device=args.device)
        pairs, stats = mine_hard_negatives(
            encoder,
            pairs,
            corpus=corpus,
            rank_window=args.rank_window,
            margin=args.margin,
            max_score_ratio=args.max_score_ratio or None,
            num_negatives=args.num_negatives,
            seed=args.seed,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            use_faiss={"auto": None, "on": True, "off": False}[args.faiss],
        )
        print(f"{stats.summary()}; skipped input rows: {bad.total}")
    else:
        pairs = [{**pair, "neg": row[args.neg_field]} for pair, row in zip(pairs, rows, strict=True)]
    out_rows = [{**row, args.neg_field: pair["neg"]} for row, pair in zip(rows, pairs, strict=True)]
    if args.teacher:
        teacher = load_encoder(args.teacher, device=args.device)
        scores = score_pairs(teacher, pairs, batch_size=args.batch_size)
        for row, (pos_score, neg_scores) in zip(out_rows, scores, strict=True):
            row[args.pos_score_field], row[args.neg_scores_field] = pos_score, neg_scores
        print(f"scored {len(out_rows)} rows with the teacher {args.teacher}; skipped input rows: {bad.total}")
    write_jsonl(out_rows, args.output)
    print(f"wrote {len(out_rows)} rows to {args.output}")
    return 0


def _read_texts(path: str) -> list[str]:
    """Texts to classify: one per line (``.txt``/``-`` for stdin) or a ``text`` field (JSONL/CSV/...)."""
    if path == "-":
        return [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if path.endswith(".txt"):
        return [
            line.rstrip("\n") for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
        ]
    return [
        check_text(rec.get("text"), source=path, row=row, field="text") for row, rec in iter_records(path)
    ]


def predict_command(args: argparse.Namespace) -> int:
    """Print one JSON line per text: the text, its prediction and (``--proba``) the probabilities."""
    from ember_train.models.setfit import SetFitStyleModel

    model = SetFitStyleModel.from_pretrained(args.model).eval()
    texts = list(args.text or []) + (_read_texts(args.input) if args.input else [])
    if not texts:
        raise SystemExit("ember-train predict: give texts with --text or --input")
    predictions = model.predict(texts, batch_size=args.batch_size, threshold=args.threshold)
    proba = model.predict_proba(texts, batch_size=args.batch_size) if args.proba else None
    for i, (text, label) in enumerate(zip(texts, predictions, strict=True)):
        record: dict[str, Any] = {"text": text, "label": label}
        if proba is not None:
            record["proba"] = {
                str(name): round(float(p), 6) for name, p in zip(model.labels, proba[i], strict=True)
            }
        print(json.dumps(record, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run a pipeline from a YAML config")
    train.add_argument("--config", required=True)
    train.add_argument("overrides", nargs="*", help="section.key=value")
    train.set_defaults(handler=train_command)

    export = sub.add_parser("export", help="export a checkpoint for transformers and sentence-transformers")
    export.add_argument("checkpoint")
    export.add_argument("output")
    export.add_argument("--config", help="the run's config.yaml (default: <run>/config.yaml)")
    export.add_argument(
        "--hub-repo-id", help="also upload the export to this Hub model repository (user/name)"
    )
    export.add_argument(
        "--hub-private",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="visibility if the repository is created (default: the config's export.hub_private, true)",
    )
    export.set_defaults(handler=export_command)

    ev = sub.add_parser("eval", help="evaluate a model on task descriptors and/or MTEB tasks")
    ev.add_argument("model", help="exported model directory, checkpoint dir or Hub name")
    ev.add_argument("--tasks", help="comma-separated descriptor files (or folders of them)")
    ev.add_argument("--data-root", help="fills ${EMBER_EVAL_ROOT} in descriptors")
    ev.add_argument("--mteb", help="comma-separated MTEB task names, run with the mteb package")
    ev.add_argument("--output", help="write results as JSON here")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-seq-length", type=int, help="override the model's own max length")
    ev.add_argument("--device", help="e.g. cuda, cpu (default: cpu)")
    ev.add_argument(
        "--dims",
        help="comma-separated vector lengths: each task also on the first d coordinates (results <dataset>@dim<d>)",
    )
    ev.add_argument(
        "--update-card", action="store_true", help="write the results into MODEL/README.md (model-index)"
    )
    ev.set_defaults(handler=eval_command)

    mine = sub.add_parser(
        "mine", help="mine hard negatives for a pair file, and/or score them with a teacher (distillation)"
    )
    mine.add_argument(
        "--model", help="the model that mines negatives (without it, --teacher scores the file's own)"
    )
    mine.add_argument(
        "--teacher",
        help="embedding model whose cosine similarities of query with pos and each neg are written "
        "(pos_score, neg_scores) for loss.distill_weight",
    )
    mine.add_argument("--pairs", required=True, help="pair file (query, pos[, neg]) as JSONL/CSV/Parquet")
    mine.add_argument(
        "--output", required=True, help="output JSONL with a `neg` list (and the teacher's scores) per row"
    )
    mine.add_argument("--corpus", help="file of documents to mine from (default: every distinct positive)")
    mine.add_argument("--corpus-field", default="text", help="field holding the document text in --corpus")
    mine.add_argument("--query-field", default="query")
    mine.add_argument("--pos-field", default="pos")
    mine.add_argument("--neg-field", default="neg")
    mine.add_argument(
        "--pos-score-field", default="pos_score", help="where --teacher writes the positive's score"
    )
    mine.add_argument(
        "--neg-scores-field", default="neg_scores", help="where --teacher writes the negatives' scores"
    )
    mine.add_argument(
        "--rank-window", type=_window, default=(10, 100), help="START,END: take ranks START+1..END"
    )
    mine.add_argument("--num-negatives", type=int, default=4)
    mine.add_argument(
        "--margin", type=float, default=0.0, help="drop candidates scoring >= pos_score - margin"
    )
    mine.add_argument(
        "--max-score-ratio",
        type=float,
        default=0.95,
        help="drop candidates >= ratio * pos_score (0 disables)",
    )
    mine.add_argument("--seed", type=int, default=0)
    mine.add_argument("--batch-size", type=int, default=64)
    mine.add_argument(
        "--chunk-size", type=int, default=16_384, help="documents scored at once (memory bound)"
    )
    mine.add_argument("--faiss", choices=("auto", "on", "off"), default="auto")
    mine.add_argument("--on-bad-rows", choices=("error", "skip"), default="error")
    mine.add_argument("--device")
    mine.set_defaults(handler=mine_command)

    predict = sub.add_parser("predict", help="classify texts with an exported SetFit-style model")
    predict.add_argument("model", help="directory written by the setfit pipeline (or save_pretrained)")
    predict.add_argument("--text", action="append", help="a text to classify (repeatable)")
    predict.add_argument(
        "--input", help="a .txt file (one text per line, - for stdin) or a JSONL/CSV file with 'text'"
    )
    predict.add_argument("--proba", action="store_true", help="also print every label's probability")
    predict.add_argument("--threshold", type=float, default=0.5, help="multi-label decision threshold")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.set_defaults(handler=predict_command)
    return parser


def _error_prefix() -> str:
    """``ember-train: error`` plus, in a multi-process run, which process failed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        return f"ember-train: error (rank {os.environ.get('RANK', '?')} of {world})"
    return "ember-train: error"


def _report(message: str) -> None:
    """Print an error on a line of its own, even under a progress bar that is still drawn."""
    from tqdm.auto import tqdm

    tqdm.write(f"{_error_prefix()}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    from ember_train.export.hub import HubUploadError
    from ember_train.models.encoder import ModelNotFoundError, UnsafeWeightsError
    from ember_train.training.checkpoint import CheckpointError
    from ember_train.training.loop import NonFiniteLossError

    try:
        return args.handler(args)
    except (ConfigError, DataError, UnsafeWeightsError, ModelNotFoundError) as e:
        # User errors: one clear line, no stack trace from deep inside a library.
        _report(str(e))
        return 2
    except (CheckpointError, NonFiniteLossError, HubUploadError) as e:
        # The run stopped for a stated reason (its message says what was saved): no stack trace.
        _report(str(e))
        return 1
    except Exception as e:
        # Anything else keeps its stack trace, but first says which process failed and why.
        _report(f"{type(e).__name__}: {e}")
        raise


if __name__ == "__main__":
    sys.exit(main())
