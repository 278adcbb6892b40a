"""``ember-train eval`` and ``ember-train mine``: the evaluation suite and mining from the shell.

ember-train eval MODEL --tasks configs/eval/STS12.yaml,configs/eval/SciFact.yaml --data-root DIR
ember-train eval MODEL --mteb STS12,SciFact            # the official mteb package (online)
ember-train mine --model MODEL --pairs train.jsonl --output mined.jsonl --rank-window 10,100
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ember_train.data.reader import BadRows, DataError, check_text, handle_bad_row, iter_records
from ember_train.evaluation.base import EvalResult

logger = logging.getLogger(__name__)


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _window(value: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START,END (e.g. 10,100), got {value!r}") from None
    return lo, hi


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``mine`` subcommands to the ``ember-train`` parser."""
    ev = subparsers.add_parser("eval", help="evaluate a model on task descriptors and/or MTEB tasks")
    ev.add_argument("model", help="exported model directory, checkpoint dir or Hub name")
    ev.add_argument("--tasks", help="comma-separated descriptor files (or folders of them)")
    ev.add_argument("--data-root", help="fills ${EMBER_EVAL_ROOT} in descriptors")
    ev.add_argument("--mteb", help="comma-separated MTEB task names, run with the mteb package")
    ev.add_argument("--output", help="write results as JSON here")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--max-seq-length", type=int, help="override the model's own max length")
    ev.add_argument("--device", help="e.g. cuda, cpu (default: cpu)")
    ev.add_argument(
        "--update-card", action="store_true", help="write the results into MODEL/README.md (model-index)"
    )
    ev.set_defaults(handler=eval_command)

    mine = subparsers.add_parser("mine", help="mine hard negatives for a pair file")
    mine.add_argument("--model", required=True)
    mine.add_argument("--pairs", required=True, help="pair file (query, pos) as JSONL/CSV/Parquet")
    mine.add_argument("--output", required=True, help="output JSONL with a `neg` list per row")
    mine.add_argument("--corpus", help="file of documents to mine from (default: every distinct positive)")
    mine.add_argument("--corpus-field", default="text", help="field holding the document text in --corpus")
    mine.add_argument("--query-field", default="query")
    mine.add_argument("--pos-field", default="pos")
    mine.add_argument("--neg-field", default="neg")
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


def print_results(results: list[EvalResult]) -> None:
    print("| Task | Dataset | Split | Metric | Score |")
    print("|---|---|---|---|---:|")
    for r in results:
        print(f"| {r.task_type} | {r.dataset} | {r.split} | {r.main_metric} | {r.main_score:.2f} |")


def eval_command(args: argparse.Namespace) -> int:
    from ember_train.evaluation.loading import load_encoder
    from ember_train.evaluation.tasks import load_tasks

    if not args.tasks and not args.mteb:
        raise DataError(
            "ember-train eval", None, "give --tasks (descriptor files) and/or --mteb (task names)"
        )
    results: list[EvalResult] = []
    if args.tasks:
        evaluators = load_tasks(_csv(args.tasks), data_root=args.data_root, batch_size=args.batch_size)
        encoder = load_encoder(args.model, max_seq_length=args.max_seq_length, device=args.device)
        for evaluator in evaluators:
            result = evaluator(encoder)
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
    print_results(results)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(
            json.dumps([r.to_dict() for r in results], indent=2) + "\n", encoding="utf-8"
        )
        print(f"results written to {args.output}")
    if args.update_card:
        from ember_train.export.model_card import render_model_card, update_model_card

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


def read_pair_rows(
    path: str, *, query: str, pos: str, on_bad_rows: str
) -> tuple[list[dict[str, Any]], BadRows]:
    """Rows with a valid query and positive(s); every other field is kept as is."""
    bad = BadRows()
    rows = []
    for row, record in iter_records(path, on_error=lambda e: handle_bad_row(e, on_bad_rows, bad)):
        try:
            check_text(record.get(query), source=path, row=row, field=query)
            value = record.get(pos)
            values = [value] if isinstance(value, str) or value is None else value
            if not isinstance(values, list) or not values:
                raise DataError(path, row, f"field {pos!r} must be a string or a non-empty list of strings")
            for i, v in enumerate(values):
                check_text(v, source=path, row=row, field=pos if isinstance(value, str) else f"{pos}[{i}]")
        except DataError as e:
            handle_bad_row(e, on_bad_rows, bad)
            continue
        rows.append(record)
    if not rows:
        raise DataError(path, None, f"no usable pairs ({bad.summary()})")
    return rows, bad


def read_corpus(path: str, *, field: str, on_bad_rows: str) -> list[str]:
    bad = BadRows()
    texts = []
    for row, record in iter_records(path, on_error=lambda e: handle_bad_row(e, on_bad_rows, bad)):
        try:
            texts.append(check_text(record.get(field), source=path, row=row, field=field))
        except DataError as e:
            handle_bad_row(e, on_bad_rows, bad)
    if bad.total:
        logger.warning("%s: %s", path, bad.summary())
    return texts


def mine_command(args: argparse.Namespace) -> int:
    from ember_train.evaluation.loading import load_encoder
    from ember_train.mining import mine_hard_negatives, write_jsonl

    rows, bad = read_pair_rows(
        args.pairs, query=args.query_field, pos=args.pos_field, on_bad_rows=args.on_bad_rows
    )
    if bad.total:
        logger.warning("%s: %s", args.pairs, bad.summary())
    corpus = (
        read_corpus(args.corpus, field=args.corpus_field, on_bad_rows=args.on_bad_rows)
        if args.corpus
        else None
    )
    encoder = load_encoder(args.model, device=args.device)
    pairs = [{"query": r[args.query_field], "pos": r[args.pos_field]} for r in rows]
    mined, stats = mine_hard_negatives(
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
    out_rows = [{**row, args.neg_field: m["neg"]} for row, m in zip(rows, mined, strict=True)]
    write_jsonl(out_rows, args.output)
    print(f"{stats.summary()}; skipped input rows: {bad.total}")
    print(f"wrote {len(out_rows)} rows to {args.output}")
    return 0
