"""Type-check a nested config input against config dataclasses with pydantic, collecting every problem.

:func:`check` validates plain containers (the merged YAML and overrides) against a root dataclass,
describes each pydantic error as ``key=value (allowed: ...)``, removes the bad value so that its
default applies, and validates again, so the valid rest is checked too and every problem is reported
once. It knows nothing of the training config itself: ``pretrain.config`` passes its root class in
(this module must not import it, so there is no import cycle).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, get_args

STRICT = {"extra": "forbid", "coerce_numbers_to_str": True}
"""pydantic settings of every config dataclass: unknown keys are errors; ``run_dir=123`` is the string "123"."""


def check(root: type, raw: dict) -> tuple[Any, list[str]]:
    """``(root instance or None, problems)``; None when a value could not be dropped (raw is modified).

    Each round reports every error pydantic finds, then drops the bad values, deepest and last list
    item first so that list indices of the other errors stay right.
    """
    from pydantic import TypeAdapter, ValidationError

    for cls in config_classes(root):
        cls.__pydantic_config__ = STRICT  # type: ignore[attr-defined]
    adapter: TypeAdapter[Any] = TypeAdapter(root)
    problems: list[str] = []
    for _ in range(8):  # a dropped mapping may hide errors inside it; a few rounds find them
        try:
            return adapter.validate_python(raw), problems
        except ValidationError as exc:
            errors = exc.errors()
            problems += [describe(root, err) for err in errors]
            for loc in sorted((tuple(err["loc"]) for err in errors), key=_drop_order, reverse=True):
                drop(raw, loc)
    return None, problems


def consequence(problem: str, reported: list[str]) -> bool:
    """Whether ``problem`` (a later check's) is about a key already reported, or a list with a bad item.

    Such a key was checked with its default or with its bad items removed (``optim.betas=[a, b]``
    leaves ``[]``), so the later problem would only repeat a reported one, and wrongly.
    """
    keys = {_key(r) for r in reported}
    keys |= {re.sub(r"\[\d+\]$", "", k) for k in keys}
    return _key(problem) in keys


def _key(problem: str) -> str:
    """``optim.betas[1]='b': ...`` -> ``optim.betas[1]``; ``optim.lrr: unknown key ...`` -> ``optim.lrr``."""
    return re.split(r"[=: ]", problem, maxsplit=1)[0]


def _drop_order(loc: tuple) -> tuple:
    """Sort key of error locations: list indices compare as numbers, keys as text, at each depth."""
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in loc)


def config_classes(cls: type) -> list[type]:
    """``cls`` and every config dataclass nested in it (fields, list items)."""
    out = [cls]
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        for t in (hint, *get_args(hint)):
            if dataclasses.is_dataclass(t) and t not in out:
                out += [c for c in config_classes(t) if c not in out]  # type: ignore[arg-type]
    return out


def section(root: type, loc: tuple) -> type | None:
    """The config dataclass at ``loc`` (a key path, list indices included), or None past a free-form field."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        hint = typing.get_type_hints(cls).get(part)
        cls = next((t for t in (hint, *get_args(hint)) if dataclasses.is_dataclass(t)), None)
        if cls is None:
            return None
    return cls


def describe(root: type, err: Any) -> str:
    """One pydantic error as ``key=value (allowed: ...)``."""
    loc = tuple(err["loc"])
    key = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in loc).replace(".[", "[")
    kind, value = err["type"], err.get("input")
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        where = section(root, loc[:-1])
        allowed = ", ".join(f.name for f in dataclasses.fields(where)) if where else "?"
        return f"{key}: unknown key (allowed here: {allowed})"
    if kind == "literal_error":
        return f"{key}={value!r} (allowed: {err['ctx']['expected'].replace(' or ', ', ')})"
    return f"{key}={value!r}: {err['msg']}"


def drop(raw: dict, loc: tuple) -> None:
    """Remove the value at ``loc`` from the nested input, so its default is used on the next check."""
    node: Any = raw
    for part in loc[:-1]:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(loc[-1], None)
    elif isinstance(node, list) and isinstance(loc[-1], int) and loc[-1] < len(node):
        node.pop(loc[-1])
