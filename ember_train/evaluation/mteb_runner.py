"""Run the official ``mteb`` package on an exported model (for users online, or with local tasks).

Our offline evaluators reproduce MTEB's protocol; this runner is the reference itself: it loads
the exported directory with sentence-transformers (so prompts, pooling and normalisation are the
exported ones) and hands it to ``mteb.evaluate``. Results come back as :class:`EvalResult` in the
same ×100 convention, so the model card and ``--output`` treat both sources alike.

``mteb`` is optional (``pip install 'ember-train[mteb]'``); it is imported only when used.
Tasks are MTEB task names (downloaded from the Hub) or ``mteb.AbsTask`` instances (e.g. a task
whose ``load_data`` reads local files, as in our tests).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ember_train.evaluation.base import EvalResult

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "the MTEB runner needs the `mteb` package: pip install 'ember-train[mteb]' (or pip install mteb)"
)


class MTEBTaskError(ValueError):
    """An MTEB task name that the installed ``mteb`` does not know."""


def import_mteb() -> Any:
    try:
        import mteb
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return mteb


def resolve_tasks(tasks: Sequence[Any]) -> list[Any]:
    """Task names -> ``mteb`` task objects; task objects pass through."""
    mteb = import_mteb()
    names = [t for t in tasks if isinstance(t, str)]
    by_name = {}
    if names:
        try:
            found = mteb.get_tasks(tasks=names)
        except KeyError as e:
            raise MTEBTaskError(f"unknown MTEB task: {e.args[0] if e.args else e}") from None
        by_name = {t.metadata.name: t for t in found}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise MTEBTaskError(f"unknown MTEB task(s): {', '.join(missing)}")
    return [by_name[t] if isinstance(t, str) else t for t in tasks]


def _percent(value: Any) -> float | None:
    return float(value) * 100.0 if isinstance(value, int | float) and not isinstance(value, bool) else None


def to_eval_results(model_result: Any, tasks: Sequence[Any]) -> list[EvalResult]:
    """``mteb`` ``ModelResult`` -> one :class:`EvalResult` per (task, split, subset), ×100."""
    meta = {t.metadata.name: t.metadata for t in tasks}
    out = []
    for task_result in model_result.task_results:
        metadata = meta.get(task_result.task_name)
        task_type = metadata.type if metadata is not None else "Unknown"
        for split, entries in task_result.scores.items():
            for entry in entries:
                metrics = {k: p for k, v in entry.items() if (p := _percent(v)) is not None}
                main_metric = (
                    metadata.main_score
                    if metadata is not None and metadata.main_score in metrics
                    else "main_score"
                )
                out.append(
                    EvalResult(
                        task_type=task_type,
                        dataset=task_result.task_name,
                        split=split,
                        metrics=metrics,
                        main_metric=main_metric,
                        config=str(entry.get("hf_subset", "default")),
                        extra={"source": "mteb", "mteb_version": entry.get("mteb_version")},
                    )
                )
    return out


def run_mteb(
    model: str | Path | Any,
    tasks: Sequence[Any],
    *,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    device: str | None = None,
    show_progress: bool = False,
) -> list[EvalResult]:
    """Evaluate ``model`` (an exported directory, a Hub name, or a ``SentenceTransformer``) on ``tasks``.

    ``cache_dir`` keeps MTEB's per-task result files (and skips tasks already there); by
    default nothing is cached, so every call measures the model as it is now.
    """
    mteb = import_mteb()
    from sentence_transformers import SentenceTransformer

    task_objects = resolve_tasks(tasks)
    st_model = (
        model if isinstance(model, SentenceTransformer) else SentenceTransformer(str(model), device=device)
    )
    cache = mteb.ResultCache(cache_path=str(cache_dir)) if cache_dir is not None else None
    logger.info("running MTEB on %d task(s): %s", len(task_objects), [t.metadata.name for t in task_objects])
    result = mteb.evaluate(
        st_model,
        task_objects,
        cache=cache,
        encode_kwargs={"batch_size": batch_size},
        show_progress_bar=show_progress,
    )
    return to_eval_results(result, task_objects)
