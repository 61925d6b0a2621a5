"""The one-line argument checks used across gptjax: an integer at least some minimum, a value
from a fixed set. Each error names the value and what is allowed."""

from __future__ import annotations

import numbers
from typing import Any, Iterable


def is_int(v: Any) -> bool:
    """Whether `v` is an integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_int(name: str, v: Any, minimum: int = 1, *, error: type = ValueError) -> None:
    """Raises `error` ("name=v: must be a positive integer" / "an integer >= minimum") unless
    `v` is an integer >= `minimum`."""
    if not is_int(v) or v < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{name}={v!r}: must be {what}")


def check_choice(name: str, v: Any, allowed: Iterable, *, error: type = ValueError) -> None:
    """Raises `error` ("name=v: allowed values are [...]") unless `v` is one of `allowed`."""
    allowed = list(allowed)
    if v not in allowed:
        raise error(f"{name}={v!r}: allowed values are {allowed}")
