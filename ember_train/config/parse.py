"""YAML + ``key=value`` overrides -> typed, validated dataclasses.

A config is the whole experiment. Unknown keys, wrong types and missing required values fail
before any model is loaded, naming the key and the file, so a typo never silently runs the
default.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")
logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A problem in a config file or an override; the message names the key and the source."""


# Keys that were renamed: (config section class, old key) -> new key. An old key is an error that
# names its new name, so a config written for an earlier version says what to change.
RENAMED_KEYS: dict[tuple[str, str], str] = {
    ("TextDataConfig", "pack"): "join_texts",  # RetroMAE's joining of short texts, not train.pack_sequences
    ("TextDataConfig", "pack_separator"): "join_separator",
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _same_shape(value: Any, tp: Any) -> bool:
    """Whether ``value`` is a list for a list type, or a mapping for a section or dict type."""
    origin = typing.get_origin(tp)
    if isinstance(value, list | tuple):
        return origin in (list, tuple)
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(tp)
    return False


def _coerce(value: Any, tp: Any, key: str, source: str, dropped: list[str] | None = None) -> Any:
    """Check ``value`` against the annotation ``tp``, converting where YAML is ambiguous
    (``dropped``: as in :func:`from_dict`)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        shaped = [arg for arg in args if _same_shape(value, arg)]
        if len(shaped) == 1 and isinstance(value, list | tuple | dict):
            # e.g. ``str | list[Section]`` given a list: its item's error names the bad key.
            return _coerce(value, shaped[0], key, source, dropped)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            tried: list[str] | None = None if dropped is None else []  # kept only from the match
            try:
                coerced = _coerce(value, arg, key, source, tried)
            except ConfigError as e:
                errors.append(str(e))
                continue
            if dropped is not None and tried:
                dropped += tried
            return coerced
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{source}: {key}: {value!r} matches none of {tp}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping (section), got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=f"{key}.", dropped=dropped)
    if origin in (list, tuple):
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]  # a single item is a one-item list (handy for overrides)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__}")
        item_tp = args[0] if args else Any
        return [_coerce(v, item_tp, f"{key}[{i}]", source, dropped) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {type(value).__name__}")
        value_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_tp, f"{key}.{k}", source, dropped) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads "1e-4" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
    raise ConfigError(f"{source}: {key}: unsupported config type {_type_name(tp)}")


def from_dict(
    cls: type[T],
    data: dict[str, Any],
    *,
    source: str = "<config>",
    prefix: str = "",
    dropped: list[str] | None = None,
) -> T:
    """Build dataclass ``cls`` from a mapping; every key is checked, nested sections included.

    ``dropped`` is for reading a config written by an earlier version (a run's ``config.yaml``):
    given a list, a renamed key is read under its new name and a key this version no longer has
    is left out and appended to the list (dotted), instead of either being an error.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if dropped is not None and unknown:
        data = dict(data)
        for key in unknown:
            value, new = data.pop(key), RENAMED_KEYS.get((cls.__name__, key))
            if new is not None and new not in data:
                data[new] = value
            else:
                dropped.append(f"{prefix}{key}")
        unknown = []
    for key in unknown:
        if (cls.__name__, key) in RENAMED_KEYS:
            new = RENAMED_KEYS[cls.__name__, key]
            raise ConfigError(f"{source}: key '{prefix}{key}' was renamed to '{prefix}{new}'")
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys in this section: {known})"
        )
    kwargs = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key, source, dropped)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {key!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ checks
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from None


def blame_override(error: ConfigError, source: str, overrides: list[str]) -> ConfigError:
    """An error about a key given on the command line names the command line, not the file."""
    message = str(error)
    for item in overrides:
        key = item.split("=", 1)[0]
        section, _, name = key.rpartition(".")
        checked = f"{source}: {section}: {name} " if section else None  # a __post_init__ check
        if f"'{key}'" in message or f"{source}: {key}:" in message or (checked and checked in message):
            return ConfigError(message.replace(f"{source}:", f"command line ({item}):", 1))
    return error


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``safe_load`` only (no Python object tags)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if item.startswith("-") or "=" not in item:
            raise ConfigError(f"override {item!r}: use section.key=value (no --flags besides --config)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config so a run's directory describes the run (a resume checks against it:
    ``training.checkpoint.check_resume_config``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as ``key: old -> new``."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def changes_since_saved(saved: dict, cfg: Any, source: str = "<saved config>") -> list[str]:
    """Keys of ``cfg`` that differ from ``saved`` (a run's ``config.yaml``), as ``key: old -> new``.

    ``saved`` may have been written by an earlier version, so it is resolved through ``type(cfg)``
    before comparing, never compared as written: a key added since takes its default on both
    sides and is no change; a renamed key is compared under its new name; a key this version no
    longer has cannot affect the run, so it is left out of the comparison and named in a warning.
    A config of another recipe (``task``) is not read as this one: the change of ``task`` is all
    there is to say. Raises ConfigError when ``saved`` does not resolve (e.g. a value this version refuses): the
    caller decides what an uncomparable config means.
    """
    task = getattr(cfg, "task", None)
    if task is not None and saved.get("task", task) != task:  # another recipe: ``task`` picks the class
        return [f"task: {saved['task']!r} -> {task!r}"]
    dropped: list[str] = []
    resolved = from_dict(type(cfg), saved, source=source, dropped=dropped)
    if dropped:
        logger.warning(
            "%s: not compared, as this version has no such settings: %s", source, ", ".join(dropped)
        )
    return changed_keys(to_dict(resolved), to_dict(cfg))
