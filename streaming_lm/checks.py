"""Input checks at the package boundary: one validator per kind of argument, used everywhere."""

from collections.abc import Collection
from typing import Any

import numpy as np


def is_int(value: Any) -> bool:
    """True for Python and numpy integers, False for bools (which are ints to isinstance)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any, *, maximum: int | None = None) -> int:
    """`value` as an int if it is an integer >= 1 (and <= `maximum`), else ValueError naming `name`."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum:,}, got {value:,}")
    return int(value)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """`value` if it is one of `choices`, else ValueError naming `name` and listing the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
