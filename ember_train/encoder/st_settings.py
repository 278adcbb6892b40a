"""Read encoder settings (pooling, normalisation, length, prompts) from a sentence-transformers directory.

Loading an exported or published sentence-transformers model must give the vectors it was made
with, so settings the config leaves unset are taken from the checkpoint's own files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ember_train.encoder.pooling import ST_POOLING_KEYS


def read_sentence_transformers_settings(path: str | Path) -> dict[str, Any]:
    """Encoder settings stored in a sentence-transformers directory (empty for a plain HF checkpoint).

    Returns a subset of ``pooling``, ``normalize``, ``max_seq_length``, ``query_prefix``,
    ``document_prefix``. Hub names return nothing here; their settings come from the config.
    """
    root = Path(path)
    settings: dict[str, Any] = {}
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return settings
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            config = json.loads((root / module["path"] / "config.json").read_text(encoding="utf-8"))
            modes = [mode for mode, key in ST_POOLING_KEYS.items() if config.get(key)]
            if config.get("pooling_mode") in ST_POOLING_KEYS:  # newer single-key format
                modes = [config["pooling_mode"]]
            if len(modes) == 1:
                settings["pooling"] = modes[0]
        elif kind == "Normalize":
            settings["normalize"] = True
    settings.setdefault("normalize", False)
    sbert = root / "sentence_bert_config.json"
    if sbert.is_file():
        max_len = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
        if max_len:
            settings["max_seq_length"] = int(max_len)
    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file():
        prompts = json.loads(st_config.read_text(encoding="utf-8")).get("prompts") or {}
        if prompts.get("query"):
            settings["query_prefix"] = prompts["query"]
        if prompts.get("document"):
            settings["document_prefix"] = prompts["document"]
    return settings
