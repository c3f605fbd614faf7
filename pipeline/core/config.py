"""Configuration plumbing shared by every YAML the product reads.

* :class:`StrictModel`: pydantic base with ``extra="forbid"`` so a typo is an error that
  names the key and the allowed ones.
* :func:`load_config`: ``yaml.safe_load`` + ``--set key=value`` overrides + validation, with
  one-line error messages (:class:`~pipeline.core.errors.ConfigError`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` a file; a missing file or a YAML syntax error is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}:{where} invalid YAML ({problem})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def format_validation_error(source: str, exc: ValidationError, model: type[BaseModel]) -> str:
    """One line naming the first bad field, the cause and, for unknown keys, the allowed keys."""
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, err["loc"][:-1])
        hint = f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
        msg = f"{source}: unknown key {loc!r}{hint}"
    else:
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = f"{source}: {loc}: {err['msg']}{shown}"
    more = len(exc.errors()) - 1
    return msg + (f" [+{more} more error(s)]" if more else "")


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        current = next(
            (a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), ann
        )
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else []


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate ``data`` into ``model``; errors become a one-line ConfigError."""
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model)) from None


def load_config(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Read YAML ``path``, apply ``--set`` overrides, validate into ``model``."""
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    apply_overrides(data, overrides)
    return validate(model, data, str(path))


def config_hash(cfg: BaseModel) -> str:
    """sha256 of the canonical JSON of a resolved config (first 16 hex digits)."""
    blob = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
