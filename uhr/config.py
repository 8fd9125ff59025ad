"""Job configurations: YAML files, then `key=value` overrides, validated into typed configs."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from uhr.errors import UhrError
from uhr.storage import redact

ConfigT = TypeVar("ConfigT", bound=BaseModel)


class ConfigError(UhrError):
    """A job configuration that cannot be used; raised before any work starts."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["pruning.budget=512", "ask=[a, b]"]` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def merge_trees(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, nested mappings merged key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_trees(merged[key], value)
        else:
            merged[key] = value
    return merged


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` without its None values, in nested mappings too."""
    return {key: _given(value) if isinstance(value, dict) else value for key, value in fields.items() if value is not None}


def load_config(
    cls: type[ConfigT], path: str | Path | None = None, overrides: list[str] | None = None, **fields: Any
) -> ConfigT:
    """Build `cls` from a YAML file, then `fields`, then `key=value` overrides (last wins).

    A None in `fields`, at any depth, means "not given" (an unset command-line option) and leaves
    the YAML's value in place.

    Raises `ConfigError` naming the file and every invalid key, before any work starts.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config {path} is not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(loaded).__name__}")
        tree = loaded or {}
    tree = merge_trees(tree, _given(fields))
    tree = merge_trees(tree, parse_overrides(overrides or []))
    try:
        return cls.model_validate(tree)
    except ValidationError as err:
        where = f" in {path}" if path is not None else ""
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"invalid {cls.__name__}{where}: {problems}") from err


def config_yaml(config: BaseModel) -> str:
    """`config` as YAML that `load_config` reads back to an equal config: every key with its value
    and its description as a comment, sections nested. A key the config was not given is written
    commented out, so that reading the YAML back leaves it unset too (an unset `pruning` field
    defers to the model's own defaults). URIs are shown with credentials masked."""
    lines = ["# Keys commented out were not given: they keep their defaults (pruning: the model's own)."]
    _emit(config, config.model_dump(mode="json"), "", lines)
    return redact("\n".join(lines)) + "\n"


def _emit(model: BaseModel, dumped: dict[str, Any], pad: str, lines: list[str]) -> bool:
    """Append `model`'s keys to `lines`; True when any of them, at any depth, was given."""
    given = False
    for name, field in type(model).model_fields.items():
        if field.description:
            lines += [f"{pad}# {line}" for line in textwrap.wrap(field.description, max(40, 100 - len(pad)))]
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            header = len(lines)
            lines.append(f"{pad}{name}:")
            if _emit(value, dumped[name], pad + "  ", lines):
                given = True
            else:
                lines[header] = f"{pad}# {name}:"
            continue
        text = yaml.safe_dump({name: dumped[name]}, default_flow_style=True, sort_keys=False, width=float("inf"))
        text = text.strip().removeprefix("{").removesuffix("}")
        set_here = name in model.model_fields_set
        given |= set_here
        lines.append(f"{pad}{text}" if set_here else f"{pad}# {text}")
    return given
