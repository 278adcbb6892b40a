"""Typed configs: YAML files plus ``section.key=value`` overrides, checked before anything runs."""

from ember_train.config.parse import (
    ConfigError,
    apply_overrides,
    changed_keys,
    changes_since_saved,
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
    "changed_keys",
    "changes_since_saved",
    "from_dict",
    "read_yaml",
    "save_config",
    "to_dict",
]
