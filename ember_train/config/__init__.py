"""Typed configs: YAML files plus ``section.key=value`` overrides, checked before anything runs."""

from ember_train.config.parse import (
    ConfigError,
    apply_overrides,
    from_dict,
    read_yaml,
    save_config,
    to_dict,
)
from ember_train.config.schema import ExportConfig, ModelConfig, TrainConfig

__all__ = [
    "ConfigError",
    "ExportConfig",
    "ModelConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load_config",
    "read_yaml",
    "save_config",
    "to_dict",
]


def load_config(path: str, overrides: list[str] | None = None):
    """Read ``path``, apply overrides, and build the config class of the pipeline named by ``task``."""
    from ember_train.pipelines import get_pipeline

    data = apply_overrides(read_yaml(path), list(overrides or []))
    task = data.get("task")
    if task is None:
        raise ConfigError(f"{path}: missing required key 'task' (contrastive, retromae or setfit)")
    pipeline = get_pipeline(task, source=str(path))
    return from_dict(pipeline.config_class, data, source=str(path))
