"""Pipelines (recipes): one readable module per training pipeline, looked up by the config's ``task``."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ember_train.config.parse import ConfigError, apply_overrides, blame_override, from_dict, read_yaml

if TYPE_CHECKING:
    from ember_train.pipelines.recipe import Pipeline

# task name -> the recipe module, whose ``PIPELINE`` is its record (:class:`~.recipe.Pipeline`).
# Modules are imported lazily so that one broken optional dependency does not stop the others.
_REGISTRY: dict[str, str] = {
    "contrastive": "ember_train.pipelines.contrastive",
    "ember": "ember_train.pipelines.ember",
    "retromae": "ember_train.pipelines.retromae",
    "setfit": "ember_train.pipelines.setfit",
}


def get_pipeline(task: str, source: str = "<config>") -> Pipeline:
    if task not in _REGISTRY:
        raise ConfigError(f"{source}: task {task!r} is not a pipeline; choose one of {sorted(_REGISTRY)}")
    return importlib.import_module(_REGISTRY[task]).PIPELINE


def parse_config(data: dict, source: str = "<config>"):
    """The config class of the pipeline named by ``task``, built from ``data`` and checked."""
    task = data.get("task")
    if task is None:
        raise ConfigError(f"{source}: missing required key 'task' (one of {sorted(_REGISTRY)})")
    pipeline = get_pipeline(task, source=source)
    cfg = from_dict(pipeline.config_class, data, source=source)
    if pipeline.check_config is not None:
        pipeline.check_config(cfg, source)
    return cfg


def load_config(path: str, overrides: list[str] | None = None):
    """Read ``path``, apply overrides, and build the config class of the pipeline named by ``task``."""
    overrides = list(overrides or [])
    try:
        return parse_config(apply_overrides(read_yaml(path), overrides), source=str(path))
    except ConfigError as e:
        raise blame_override(e, str(path), overrides) from None
