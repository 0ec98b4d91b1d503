"""Messages for config.yaml problems: each names the field path, the bad value and the allowed ones.

A leaf module: it knows pydantic and `ConfigError`, not bei's config models; the functions that
walk a model take the root model class (`BeiConfig`) as an argument.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from bei.errors import ConfigError

__all__ = ["Problems", "format_error", "raise_problems", "unknown_field_message", "unknown_keys"]


class Problems(ConfigError):
    """A ConfigError carrying its individual problems, so that they can be merged with others."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def unknown_keys(data: dict[Any, Any], known: Iterable[str]) -> list[Any]:
    """The keys of `data` not in `known`, in the mapping's order."""
    known = set(known)
    return [key for key in data if key not in known]


def unknown_field_message(parent: str, key: Any, allowed: Iterable[str]) -> str:
    path = f"{parent}.{key}" if parent else str(key)
    return f"{path}: unknown field {str(key)!r} (allowed: {', '.join(allowed)})"


def format_error(err: Any, root: type[BaseModel]) -> str:
    """One problem line for one entry of `ValidationError.errors()` raised while validating `root`."""
    loc: tuple[int | str, ...] = tuple(err["loc"])
    kind, value, path = err["type"], err.get("input"), _dotted(loc)
    if kind == "missing":
        return f"{path}: missing required field"
    if kind == "extra_forbidden":
        _, parent_model = _field_at(root, loc[:-1]) if loc[:-1] else (None, root)
        allowed = list(parent_model.model_fields) if parent_model else []
        return unknown_field_message(_dotted(loc[:-1]) if loc[:-1] else "", loc[-1], allowed)
    field, _ = _field_at(root, loc)
    if kind in ("enum", "literal_error"):
        values = _allowed_values(field)
        if values:
            return f"{path}: {value!r} is not one of {', '.join(values)}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        bounds = _bounds(field)
        if bounds:
            return f"{path}: {value!r} must be {bounds}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{path}: expected a mapping, got {type(value).__name__} {value!r}"
    return f"{path}: {value!r} is invalid: {err['msg']}"


def raise_problems(source: str, problems: list[str]) -> typing.NoReturn:
    """One ConfigError for `source`: the problem itself, or a count and one indented line each."""
    if len(problems) == 1:
        raise ConfigError(f"{source}: {problems[0]}")
    raise ConfigError(f"{source}: {len(problems)} errors:\n" + "\n".join(f"  {p}" for p in problems))


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _field_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[FieldInfo | None, type[BaseModel] | None]:
    """The field at a pydantic error location under `root`, and the model class that holds that location."""
    model: type[BaseModel] | None = root
    field: FieldInfo | None = None
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None, None
        field = model.model_fields[part]
        inner = _unwrap_optional(field.annotation)
        model = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    return field, model


def _allowed_values(field: FieldInfo | None) -> list[str] | None:
    if field is None:
        return None
    inner = _unwrap_optional(field.annotation)
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        return [str(m.value) for m in inner]
    if typing.get_origin(inner) is Literal:
        return [str(a) for a in typing.get_args(inner)]
    return None


def _bounds(field: FieldInfo | None) -> str | None:
    if field is None:
        return None
    parts = []
    for meta in field.metadata:
        for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            if isinstance(meta, getattr(annotated_types, attr.capitalize())):
                parts.append(f"{op} {getattr(meta, attr)}")
    return " and ".join(parts) or None


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"
