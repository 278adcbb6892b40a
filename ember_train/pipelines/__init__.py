"""Pipelines (recipes): one readable module per training pipeline, looked up by the config's ``task``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ember_train.config.parse import ConfigError

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
