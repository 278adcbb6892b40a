"""The saved sentence-transformers format: write an encoder in it, and read its settings back.

The directory is at once a plain Hugging Face checkpoint (``config.json``, ``model.safetensors``,
tokenizer files: ``transformers.AutoModel`` loads it) and a sentence-transformers model
(``modules.json`` and friends). Module type names are the long-standing
``sentence_transformers.models.*`` ones so both old and new sentence-transformers load it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ember_train.models.pooling import ST_POOLING_KEYS

if TYPE_CHECKING:
    from ember_train.models.encoder import Encoder

POOLING_DIR = "1_Pooling"
NORMALIZE_DIR = "2_Normalize"
MATRYOSHKA_KEY = "matryoshka_dims"  # in config_sentence_transformers.json: the trained prefix lengths


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def export_encoder(
    encoder: Encoder,
    out_dir: str | Path,
    *,
    model_card: str | None = None,
    matryoshka_dims: Sequence[int] = (),
) -> Path:
    """Save ``encoder`` so ``AutoModel`` and ``SentenceTransformer`` both load it with the same vectors.

    ``matryoshka_dims`` (the prefix lengths it was trained for) are recorded in
    ``config_sentence_transformers.json`` under ``matryoshka_dims``; sentence-transformers ignores
    the key, and ``SentenceTransformer(path, truncate_dim=d)`` cuts the vectors to ``d``. The
    default ``truncate_dim`` is left unset: loaders get the full vectors unless they ask.
    """
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backbone = encoder.backbone
    # Weights in fp32 whatever precision training used, so every loader gives the same vectors.
    state = {
        k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()
        for k, v in backbone.state_dict().items()
    }
    backbone.save_pretrained(out, state_dict=state, safe_serialization=True)
    encoder.tokenizer.save_pretrained(out)

    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": POOLING_DIR, "type": "sentence_transformers.models.Pooling"},
    ]
    if encoder.normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": NORMALIZE_DIR, "type": "sentence_transformers.models.Normalize"}
        )
        (out / NORMALIZE_DIR).mkdir(exist_ok=True)
    _write_json(out / "modules.json", modules)
    _write_json(
        out / "sentence_bert_config.json", {"max_seq_length": encoder.max_seq_length, "do_lower_case": False}
    )

    pooling_config: dict[str, Any] = {"word_embedding_dimension": encoder.dim}
    for mode, key in ST_POOLING_KEYS.items():
        pooling_config[key] = mode == encoder.pooling
    pooling_config["pooling_mode_mean_sqrt_len_tokens"] = False
    pooling_config["include_prompt"] = True  # prefixes are part of the text, as at training time
    _write_json(out / POOLING_DIR / "config.json", pooling_config)

    prompts = {}
    if encoder.query_prefix:
        prompts["query"] = encoder.query_prefix
    if encoder.document_prefix:
        prompts["document"] = encoder.document_prefix
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": {
                "ember_train": _ember_version(),
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "prompts": prompts,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            **({MATRYOSHKA_KEY: [int(d) for d in matryoshka_dims]} if matryoshka_dims else {}),
        },
    )
    if model_card is not None:
        (out / "README.md").write_text(model_card, encoding="utf-8")
    return out


def read_sentence_transformers_settings(path: str | Path) -> dict[str, Any]:
    """Encoder settings stored in a sentence-transformers checkpoint (empty for a plain HF checkpoint).

    Returns a subset of ``pooling``, ``normalize``, ``max_seq_length``, ``query_prefix``,
    ``document_prefix``. ``path`` is a local directory or a Hub id: a Hub model's files come through
    the Hub cache, so ``model.pooling: null`` gives e.g. bge's CLS pooling, not the mean default.
    """
    read = _file_reader(path)
    settings: dict[str, Any] = {}
    modules_text = read("modules.json")
    if modules_text is None:
        return settings
    for module in json.loads(modules_text):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = json.loads(read(f"{module['path']}/config.json") or "{}")
            modes = [mode for mode, key in ST_POOLING_KEYS.items() if config.get(key)]
            if config.get("pooling_mode") in ST_POOLING_KEYS:  # newer single-key format
                modes = [config["pooling_mode"]]
            if len(modes) == 1:
                settings["pooling"] = modes[0]
        elif kind == "Normalize":
            settings["normalize"] = True
    settings.setdefault("normalize", False)
    sbert = read("sentence_bert_config.json")
    if sbert is not None:
        max_len = json.loads(sbert).get("max_seq_length")
        if max_len:
            settings["max_seq_length"] = int(max_len)
    st_config = read("config_sentence_transformers.json")
    if st_config is not None:
        prompts = json.loads(st_config).get("prompts") or {}
        if prompts.get("query"):
            settings["query_prefix"] = prompts["query"]
        if prompts.get("document"):
            settings["document_prefix"] = prompts["document"]
    return settings


def read_matryoshka_dims(path: str | Path) -> list[int]:
    """The prefix lengths an export was trained for (empty when none are recorded)."""
    text = _file_reader(path)("config_sentence_transformers.json")
    return [int(d) for d in (json.loads(text).get(MATRYOSHKA_KEY) or [])] if text else []


def find_checkpoint_file(path: str | Path, name: str) -> Path | None:
    """One file of a local checkpoint, or of a Hub repository through the Hub cache; None if absent.

    A Hub repository that cannot be reached reads as absent here; loading its weights reports why.
    """
    root = Path(path)
    if root.is_dir():
        return root / name if (root / name).is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(str(path), name))
    except (HfHubHTTPError, LocalEntryNotFoundError, ValueError, OSError):
        return None


def _file_reader(path: str | Path) -> Callable[[str], str | None]:
    """``read(name)``: the text of one file of ``path`` (:func:`find_checkpoint_file`), or None."""

    def read(name: str) -> str | None:
        file = find_checkpoint_file(path, name)
        return file.read_text(encoding="utf-8") if file is not None else None

    return read


def _ember_version() -> str:
    from ember_train import __version__

    return __version__
