"""Typed values <-> plain data, for the checkpoint (state.py): one converter, driven by the type hints
of frozen dataclasses, that names the field it refuses, and digests that name the field edited.

Plain data is what `torch.load(weights_only=True)`, pickle and JSON all take: dicts with string
keys, lists, ints, floats, strings, bools and None. A dataclass becomes a dict of its fields (a
trailing "_" dropped from a name), or a list when it says `LIST = True` (positions: [piece, row,
token]); a tuple becomes a list. `typed(kind, value, path)` goes back, checking every value against
its annotation: `Annotated[int, low]` is an int >= low, `X | None`, `tuple[X, ...]`, `dict[str, X]`,
nested dataclasses; a missing, unknown or ill-typed field raises ValueError naming its path.

`digests(value)` mirrors the shape of plain data with 8 hex digits of SHA-256 over (path, leaf)
at each leaf (below dicts and lists of dicts), so `differences` names the first leaf edited,
deleted, added or moved to another path since the digests were taken.
"""

import dataclasses
import hashlib
import inspect
import json
import re
import types
import typing
from collections.abc import Iterator
from typing import Annotated, Any

from .checks import is_int


def to_plain(value: Any) -> Any:
    """A typed value as plain data."""
    if dataclasses.is_dataclass(value):
        items = {f.name.rstrip("_"): to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return list(items.values()) if getattr(value, "LIST", False) else items
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def typed(kind: Any, value: Any, path: str) -> Any:
    """`value` as an instance of the annotation `kind`, checked; ValueError naming `path`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        ok = is_int(value) and value >= args[1]
        return int(expect(value, f"an int >= {args[1]}", path, ok))
    if origin in (types.UnionType, typing.Union):
        return None if value is None else typed(args[0], value, path)
    if origin is tuple:
        return tuple(typed(args[0], v, f"{path}[{i}]") for i, v in enumerate(expect(value, list, path)))
    if origin is dict:
        for key in expect(value, dict, path):
            expect(key, str, f"{path} key {key!r}")
        return {k: typed(args[1], v, join(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(kind):
        return _dataclass(kind, value, path)
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < float("inf")
        return float(expect(value, "a positive number", path, ok))
    return expect(
        value, kind, path, isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    )


def _dataclass(kind: Any, value: Any, path: str) -> Any:
    fields = dataclasses.fields(kind)
    hints = typing.get_type_hints(kind, include_extras=True)
    if getattr(kind, "LIST", False):
        names = [f.name for f in fields]
        ok = isinstance(value, list) and len(value) == len(fields)
        value = dict(zip(names, expect(value, f"[{', '.join(names)}]", path, ok)))
    else:
        keys = {f.name.rstrip("_"): f.name for f in fields}
        unknown = sorted(set(expect(value, dict, path)) - set(keys))
        if unknown:
            raise ValueError(f"corrupt checkpoint: {join(path, unknown[0])}: not a field of {kind.__name__}")
        required = [f.name.rstrip("_") for f in fields if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in value]
        if missing:
            raise ValueError(f"corrupt checkpoint: {join(path, missing[0])}: missing")
        value = {keys[k]: v for k, v in value.items()}
    return kind(**{name: typed(hints[name], v, join(path, name.rstrip("_"))) for name, v in value.items()})


def expect(value: Any, kind: Any, path: str, ok: bool | None = None) -> Any:
    """`value` if `ok` (default: it is an instance of `kind`), else ValueError naming `path`."""
    if not (isinstance(value, kind) if ok is None else ok):
        name = kind if isinstance(kind, str) else f"a {kind.__name__}"
        raise ValueError(f"corrupt checkpoint: {path or 'the state'}: expected {name}, got {value!r:.80}")
    return value


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def digests(value: Any, path: str = "") -> Any:
    """The digest tree of plain data: its shape, with a digest of (path, leaf) at each leaf."""
    if isinstance(value, dict):
        return {k: digests(v, join(path, k)) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return [digests(v, f"{path}[{i}]") for i, v in enumerate(value)]
    text = json.dumps([path, value], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def differences(expected: Any, saved: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, what) wherever the digest tree `saved` differs from `expected` (the data's now)."""
    if isinstance(expected, dict) and isinstance(saved, dict):
        for key in [*expected, *(k for k in saved if k not in expected)]:
            yield from differences(expected.get(key), saved.get(key), join(path, str(key)))
    elif isinstance(expected, list) and isinstance(saved, list) and len(expected) != len(saved):
        yield path, f"{len(expected)} entries, but it was saved with {len(saved)}"
    elif isinstance(expected, list) and isinstance(saved, list):
        for i, (a, b) in enumerate(zip(expected, saved)):
            yield from differences(a, b, f"{path}[{i}]")
    elif expected != saved:
        yield path, "it does not match its digest (edited, deleted or added after the state was saved)"


def describe(kind: Any, indent: str = "") -> str:
    """The plain form of dataclass `kind`, field by field with its type and the comment its source
    gives it (nested dataclasses indented below their field)."""
    hints = typing.get_type_hints(kind, include_extras=True)
    notes = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(kind), re.MULTILINE))
    lines = []
    for f in dataclasses.fields(kind):
        note = notes.get(f.name) or (_inner(hints[f.name]) or [None])[0].__doc__
        note = f"  # {note.splitlines()[0]}" if note else ""
        lines.append(f"{indent}{f.name.rstrip('_')}: {type_name(hints[f.name])}{note}")
        lines += [describe(inner, indent + "    ") for inner in _inner(hints[f.name])]
    return "\n".join(lines)


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return f"int >= {args[1]}"
    if origin in (types.UnionType, typing.Union):
        return f"{type_name(args[0])} or null"
    if origin is tuple:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"{{str: {type_name(args[1])}}}"
    if dataclasses.is_dataclass(hint) and getattr(hint, "LIST", False):
        return f"[{', '.join(f.name for f in dataclasses.fields(hint))}]"
    return hint.__name__


def _inner(hint: Any) -> list[Any]:
    """The dataclasses (not lists) an annotation holds."""
    if dataclasses.is_dataclass(hint):
        return [] if getattr(hint, "LIST", False) else [hint]
    return [k for a in typing.get_args(hint) for k in _inner(a)]
