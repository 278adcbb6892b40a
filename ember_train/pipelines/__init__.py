"""Pipelines (recipes): one readable module per training pipeline, looked up by the config's ``task``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ember_train.config.parse import ConfigError, apply_overrides, from_dict, read_yaml

# task name -> (module, config class name). Modules are imported lazily so that one broken
# optional dependency does not stop the other pipelines.
_REGISTRY: dict[str, tuple[str, str]] = {
    "contrastive": ("ember_train.pipelines.contrastive", "ContrastiveConfig"),
    "retromae": ("ember_train.pipelines.retromae", "RetroMAEConfig"),
    "setfit": ("ember_train.pipelines.setfit", "SetFitConfig"),
}


@dataclass
class Pipeline:
    name: str
    config_class: type
    run: Callable[[Any], dict]


def get_pipeline(task: str, source: str = "<config>") -> Pipeline:
    if task not in _REGISTRY:
        raise ConfigError(f"{source}: task {task!r} is not a pipeline; choose one of {sorted(_REGISTRY)}")
    module_name, class_name = _REGISTRY[task]
    module = importlib.import_module(module_name)
    return Pipeline(task, getattr(module, class_name), module.run)


def load_config(path: str, overrides: list[str] | None = None):
    """Read ``path``, apply overrides, and build the config class of the pipeline named by ``task``."""
    data = apply_overrides(read_yaml(path), list(overrides or []))
    task = data.get("task")
    if task is None:
        raise ConfigError(f"{path}: missing required key 'task' (contrastive, retromae or setfit)")
    pipeline = get_pipeline(task, source=str(path))
    return from_dict(pipeline.config_class, data, source=str(path))
