"""The exported model's README.md: a Hub model card with an MTEB-style ``model-index``.

ember-v1 is known by the ``model-index`` block on its card (one entry per task: task type,
dataset type/name/config/split, a list of metrics); we write the same shape from the
evaluations that actually ran, so the Hub and MTEB tooling read our exports like any other.
Scores are copied from :class:`EvalResult` unchanged (MTEB ×100 convention).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # results are read by attribute; export does not import evaluation
    from ember_train.evaluation.base import EvalResult

# Hub dataset ids MTEB uses for tasks we reproduce offline, so the card links the real data.
MTEB_DATASET_IDS = {
    "STSBenchmark": "mteb/stsbenchmark-sts",
    "SICK-R": "mteb/sickr-sts",
    "BIOSSES": "mteb/biosses-sts",
    "STS12": "mteb/sts12-sts",
    "STS13": "mteb/sts13-sts",
    "STS14": "mteb/sts14-sts",
    "STS15": "mteb/sts15-sts",
    "STS16": "mteb/sts16-sts",
    "Banking77Classification": "mteb/banking77",
    "SciFact": "mteb/scifact",
}

_SECRET_KEY = re.compile(
    r"(^|[_\-.])(token|auth|api[_\-]?key|apikey|secret|secret[_\-]?key|password|passwd|credentials?|private[_\-]?key)($|[_\-.])"
)
_SECRET_VALUE = re.compile(r"^(hf_|sk-|ghp_|gho_|github_pat_|xox[bp]-|AKIA)[A-Za-z0-9_\-]{12,}$")


def scrub_secrets(value: Any) -> Any:
    """Copy of ``value`` without keys that name credentials or string values shaped like tokens."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if _SECRET_KEY.search(str(k).lower()):
                continue
            if isinstance(v, str) and _SECRET_VALUE.match(v.strip()):
                continue
            out[k] = scrub_secrets(v)
        return out
    if isinstance(value, list | tuple):
        return [
            scrub_secrets(v) for v in value if not (isinstance(v, str) and _SECRET_VALUE.match(v.strip()))
        ]
    return value


def metric_type(key: str) -> str:
    """Our metric key -> the card's metric ``type`` (``ndcg@10`` -> ``ndcg_at_10``)."""
    return key.replace("@", "_at_")


def model_index(model_name: str, results: Sequence[EvalResult]) -> list[dict[str, Any]]:
    """The ``model-index`` list: one result entry per evaluation, metrics rounded to 4 decimals."""
    entries = []
    for r in results:
        metrics = [
            {"type": metric_type(k), "value": round(float(v), 4)}
            for k, v in r.metrics.items()
            if k != "main_score"
        ]
        metrics.append({"type": "main_score", "value": round(float(r.main_score), 4)})
        entries.append(
            {
                "task": {"type": r.task_type},
                "dataset": {
                    "type": MTEB_DATASET_IDS.get(r.dataset, r.dataset),
                    "name": r.dataset,
                    "config": r.config,
                    "split": r.split,
                },
                "metrics": metrics,
            }
        )
    return [{"name": model_name, "results": entries}]


def _lookup(training: Mapping[str, Any], key: str, default: Any) -> Any:
    model = training.get("model")
    if isinstance(model, Mapping) and key in model:
        return model[key]
    return training.get(key, default)


_POOLING_CODE = {
    "mean": (
        "mask = batch['attention_mask'].unsqueeze(-1).float()\n"
        "emb = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)"
    ),
    "cls": "emb = out.last_hidden_state[:, 0]",
    "max": (
        "mask = batch['attention_mask'].unsqueeze(-1).bool()\n"
        "emb = out.last_hidden_state.masked_fill(~mask, float('-inf')).max(1).values"
    ),
    "weighted_mean": (
        "mask = batch['attention_mask'].unsqueeze(-1).float()\n"
        "w = torch.arange(1, mask.shape[1] + 1).view(1, -1, 1) * mask\n"
        "emb = (out.last_hidden_state * w).sum(1) / w.sum(1).clamp(min=1e-9)"
    ),
    "lasttoken": (
        "last = batch['attention_mask'].sum(1) - 1\n"
        "emb = out.last_hidden_state[torch.arange(len(last)), last]"
    ),
}


def _usage(model_name: str, pooling: str, normalize: bool, max_len: int, q_prefix: str, d_prefix: str) -> str:
    q, d = repr(q_prefix + "How do I install the package?"), repr(d_prefix + "Run pip install ember-train.")
    norm = "emb = torch.nn.functional.normalize(emb, dim=-1)\n" if normalize else ""
    pool = _POOLING_CODE.get(pooling, _POOLING_CODE["mean"])
    return (
        "### sentence-transformers\n\n"
        "```python\n"
        "from sentence_transformers import SentenceTransformer\n\n"
        f"model = SentenceTransformer({model_name!r})\n"
        f"embeddings = model.encode([{q}, {d}])\n"
        "print(model.similarity(embeddings[:1], embeddings[1:]))\n"
        "```\n\n"
        f"### transformers ({pooling} pooling{', L2-normalised' if normalize else ''})\n\n"
        "```python\n"
        "import torch\n"
        "from transformers import AutoModel, AutoTokenizer\n\n"
        f"tokenizer = AutoTokenizer.from_pretrained({model_name!r})\n"
        f"model = AutoModel.from_pretrained({model_name!r}).eval()\n"
        f"batch = tokenizer([{q}, {d}], padding=True, truncation=True, max_length={max_len}, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    out = model(**batch)\n"
        f"{pool}\n{norm}"
        "```\n"
    )


def results_table(results: Sequence[EvalResult]) -> str:
    """Markdown table: task type, dataset, split, main metric, score (2 decimals, as MTEB shows)."""
    return _table((r.task_type, r.dataset, r.split, r.main_metric, r.main_score) for r in results)


def _table(rows: Iterable[tuple[str, str, str, str, float]]) -> str:
    lines = ["| Task | Dataset | Split | Metric | Score |", "|---|---|---|---|---:|"]
    for task_type, dataset, split, metric, score in rows:
        lines.append(f"| {task_type} | {dataset} | {split} | {metric} | {score:.2f} |")
    return "\n".join(lines)


def render_model_card(
    *,
    model_name: str,
    base_model: str,
    results: Sequence[EvalResult],
    training: Mapping[str, Any],
    command: str | None,
    data_summary: str | None = None,
    stages: Sequence[Mapping[str, Any]] | None = None,
    matryoshka_dims: Sequence[int] | None = None,
    selected: Mapping[str, Any] | None = None,
    merge: Mapping[str, Any] | None = None,
) -> str:
    """Render README.md: YAML front matter (parsable by ``yaml.safe_load``) + a human body.

    ``training`` is the run's config as a dict (credentials are dropped before anything is
    written); pooling, normalisation, prefixes and max length are read from ``training["model"]``
    so the usage snippets reproduce the exported vectors. ``stages`` (a multi-stage recipe) are
    rows with ``stage``, ``data``, ``steps``, ``train_seconds`` and ``metrics`` (a short text).
    ``selected`` (``eval.select``'s step) and ``merge`` (the merge with the base) are results.json's.
    """
    training = scrub_secrets(dict(training))
    pooling = str(_lookup(training, "pooling", "mean"))
    normalize = bool(_lookup(training, "normalize", False))
    max_len = int(_lookup(training, "max_seq_length", 512))
    q_prefix = str(_lookup(training, "query_prefix", "") or "")
    d_prefix = str(_lookup(training, "document_prefix", "") or "")
    front = {
        "library_name": "sentence-transformers",
        "pipeline_tag": "sentence-similarity",
        "tags": ["sentence-transformers", "feature-extraction", "sentence-similarity", "ember-train"]
        + (["mteb"] if results else []),
        # The Hub rejects a card whose base_model is not a model id (a local path, say).
        **({"base_model": base_model} if is_hub_model_id(base_model) else {}),
        "model-index": model_index(model_name, results),
    }
    parts = [
        "---",
        yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        "",
        f"# {model_name}",
        "",
        f"A text-embedding model trained from [{base_model}]({_link(base_model)}) with ember-train.",
        "",
        f"- **Base model:** `{base_model}`",
        f"- **Pooling:** {pooling}{' + L2 normalisation' if normalize else ''}",
        f"- **Max sequence length:** {max_len}",
    ]
    if q_prefix or d_prefix:
        parts.append(f"- **Prefixes:** query `{q_prefix!r}`, document `{d_prefix!r}`")
    if matryoshka_dims:
        dims = ", ".join(str(d) for d in matryoshka_dims)
        parts.append(
            f"- **Matryoshka dimensions:** {dims} (trained so that a prefix of the vector is an embedding: "
            f"`SentenceTransformer(..., truncate_dim={matryoshka_dims[-1]})`)"
        )
    if data_summary:
        parts.append(f"- **Training data:** {data_summary}")
    parts += ["", "## Usage", "", _usage(model_name, pooling, normalize, max_len, q_prefix, d_prefix)]
    if results:
        parts += [
            "## Evaluation",
            "",
            "Scores follow the MTEB convention (×100), measured on the splits listed with "
            "ember-train's evaluators (the MTEB protocol, run offline) on this checkpoint.",
            "",
            results_table(results),
            "",
        ]
    parts += ["## Training", ""]
    parts += selection_lines(selected, merge)
    if stages:
        parts += [stages_table(stages), ""]
    if command:
        parts += ["Command:", "", "```bash", command, "```", ""]
    parts += [
        "Configuration:",
        "",
        "```yaml",
        yaml.safe_dump(training, sort_keys=False, allow_unicode=True).rstrip() if training else "{}",
        "```",
        "",
    ]
    return "\n".join(parts)


def selection_lines(selected: Mapping[str, Any] | None, merge: Mapping[str, Any] | None) -> list[str]:
    """Which step's weights were exported (``eval.select``) and how they were merged with the base."""
    lines: list[str] = []
    if selected:
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in selected["metrics"].items())
        lines += [
            f"Exported weights: step {selected['step']} of {selected['steps']}, the best by "
            f"`{selected['select']}` ({selected['score']:.4f}); its evaluation: {metrics}.",
            "",
        ]
    if merge:
        lines += [
            f"Merged with `{merge['base']}` (weights: {merge['alpha']:g} × tuned + {1 - merge['alpha']:g} × base; "
            + (
                "alpha chosen automatically: " + merge["rule"]
                if merge.get("table")
                else "alpha set in the config"
            )
            + ").",
            "",
        ]
        if merge.get("table"):
            lines += [merge["table"], ""]
    return lines


def stages_table(stages: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of a recipe's stages, in the order they ran."""
    lines = ["| Stage | Data | Steps | Time (s) | Metrics (before → after) |", "|---|---|---:|---:|---|"]
    for s in stages:
        seconds = s.get("train_seconds")
        lines.append(
            f"| {s['stage']} | {s.get('data') or ''} | {s.get('steps') if s.get('steps') is not None else ''} "
            f"| {f'{seconds:.0f}' if seconds is not None else ''} | {s.get('metrics') or ''} |"
        )
    return "\n".join(lines)


def is_hub_model_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub model id, not a local directory or a ``package:`` path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("/", ".", "~", "package:")) or "://" in name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _link(base_model: str) -> str:
    return f"https://huggingface.co/{base_model}" if is_hub_model_id(base_model) else base_model


def split_front_matter(card: str) -> tuple[dict[str, Any], str]:
    """``(front matter dict, body)`` of a README that starts with ``---`` YAML ``---``."""
    if not card.startswith("---"):
        return {}, card
    end = card.find("\n---", 3)
    if end < 0:
        return {}, card
    front = yaml.safe_load(card[3:end]) or {}
    body = card[end + len("\n---") :].lstrip("\n")
    return front, body


def update_model_card(card: str, *, model_name: str, results: Sequence[EvalResult]) -> str:
    """Put ``results`` into an existing card: its ``model-index`` and its ``## Evaluation`` table.

    Entries for other (task, dataset, split, config) keys are kept; same keys are replaced, so
    re-running an evaluation refreshes the numbers instead of duplicating them.
    """
    front, body = split_front_matter(card)
    old = (front.get("model-index") or [{}])[0].get("results") or []
    new = model_index(model_name, results)[0]["results"]

    def key(entry: dict[str, Any]) -> tuple:
        d = entry.get("dataset", {})
        return (entry.get("task", {}).get("type"), d.get("name"), d.get("split"), d.get("config"))

    replaced = {key(e) for e in new}
    merged = [e for e in old if key(e) not in replaced] + new
    front["model-index"] = [{"name": model_name, "results": merged}]
    tags = list(front.get("tags") or [])
    if "mteb" not in tags:
        front["tags"] = [*tags, "mteb"]
    section = (
        "## Evaluation\n\n"
        "Scores follow the MTEB convention (×100), measured on the splits listed with "
        "ember-train's evaluators on this checkpoint.\n\n" + _table(_rows_from_index(merged)) + "\n"
    )
    start = body.find("## Evaluation")
    if start >= 0:
        end = body.find("\n## ", start + 1)
        body = body[:start] + section + (body[end + 1 :] if end >= 0 else "")
    else:
        anchor = body.find("## Training")
        body = (
            body[:anchor] + section + "\n" + body[anchor:]
            if anchor >= 0
            else body.rstrip() + "\n\n" + section
        )
    return "---\n" + yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip() + "\n---\n\n" + body


def _rows_from_index(entries: Sequence[dict[str, Any]]) -> list[tuple[str, str, str, str, float]]:
    """Table rows (main score only) from model-index entries."""
    out = []
    for e in entries:
        metrics = {m["type"]: float(m["value"]) for m in e.get("metrics", [])}
        if "main_score" not in metrics:
            continue
        d = e.get("dataset", {})
        main = next(
            (k for k, v in metrics.items() if k != "main_score" and v == metrics["main_score"]), "main_score"
        )
        out.append(
            (
                e.get("task", {}).get("type", ""),
                d.get("name", ""),
                d.get("split", ""),
                main,
                metrics["main_score"],
            )
        )
    return out


def classification_card_section(
    head: Any, before: EvalResult | None, after: EvalResult | None, tuning: str
) -> str:
    """The SetFit-style part of a card: how the body was tuned (``tuning``), the head (a
    ``LinearHead`` or None), accuracy/macro-F1 before and after, and how to predict."""
    lines = ["## SetFit-style classification", ""]
    if head is not None:
        kind = "logistic regression (scikit-learn)" if head.kind == "logistic_regression" else "linear layer"
        lines += [
            f"The body was tuned on {tuning}; "
            f"a {kind} head over {len(head.labels)} labels"
            f"{' (multi-label)' if head.multi_label else ''} is stored in `head/`.",
            "",
        ]
    if after is not None:
        lines += ["| Model | Accuracy | Macro-F1 |", "|---|---:|---:|"]
        if before is not None:
            lines.append(
                f"| before tuning (frozen body + head) | {before.metrics['accuracy']:.2f} | {before.metrics['f1']:.2f} |"
            )
        lines += [f"| after tuning | {after.metrics['accuracy']:.2f} | {after.metrics['f1']:.2f} |", ""]
        lines += [f"Test set: `{after.dataset}`, {after.extra.get('num_test')} texts.", ""]
    if head is not None:
        lines += [
            "```python",
            "from ember_train.models.setfit import SetFitStyleModel",
            "",
            'model = SetFitStyleModel.from_pretrained("path/to/this/model")',
            'model.predict(["a text to classify"])',
            'model.predict_proba(["a text to classify"])',
            "```",
            "",
            "or `ember-train predict path/to/this/model --text 'a text to classify' --proba`.",
            "",
        ]
    return "\n".join(lines)
