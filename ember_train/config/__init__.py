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
    try:
        return from_dict(pipeline.config_class, data, source=str(path))
    except ConfigError as e:
        raise _blame_override(e, str(path), list(overrides or [])) from None


def _blame_override(error: ConfigError, source: str, overrides: list[str]) -> ConfigError:
    """An error about a key given on the command line names the command line, not the file."""
    message = str(error)
    for item in overrides:
        key = item.split("=", 1)[0]
        section, _, name = key.rpartition(".")
        checked = f"{source}: {section}: {name} " if section else None  # a __post_init__ check
        if f"'{key}'" in message or f"{source}: {key}:" in message or (checked and checked in message):
            return ConfigError(message.replace(f"{source}:", f"command line ({item}):", 1))
    return error
