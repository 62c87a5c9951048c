"""Config value checks and "did you mean" hints, shared by every stage and library.

Each check returns the converted value or raises :class:`~diffmem.errors.ConfigError` with one
line naming the field, e.g. ``steps must be >= 1 (got -3)``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any, Literal, overload

from diffmem.errors import ConfigError


@overload
def check_int(value: Any, name: str, minimum: int | None = ..., optional: Literal[False] = ...) -> int: ...
@overload
def check_int(value: Any, name: str, minimum: int | None = ..., optional: bool = ...) -> int | None: ...
def check_int(value: Any, name: str, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int ``>= minimum`` (``None`` passes when ``optional``)."""
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)  # numpy's integers included
        and not (isinstance(value, float) and value.is_integer())
    ):
        raise ConfigError(f"{name} must be an integer (got {value!r})")
    if minimum is not None and int(value) < minimum:
        raise ConfigError(f"{name} must be >= {minimum}{' or null' if optional else ''} (got {value})")
    return int(value)


@overload
def check_positive(value: Any, name: str, optional: Literal[False] = ...) -> int: ...
@overload
def check_positive(value: Any, name: str, optional: bool = ...) -> int | None: ...
def check_positive(value: Any, name: str, optional: bool = False) -> int | None:
    """``value`` as an int ``>= 1`` (counts, sizes, steps); ``None`` passes when ``optional``."""
    return check_int(value, name, 1, optional)


@overload
def check_float(
    value: Any,
    name: str,
    minimum: float | None = ...,
    maximum: float | None = ...,
    above: float | None = ...,
    optional: Literal[False] = ...,
) -> float: ...
@overload
def check_float(
    value: Any,
    name: str,
    minimum: float | None = ...,
    maximum: float | None = ...,
    above: float | None = ...,
    optional: bool = ...,
) -> float | None: ...
def check_float(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    optional: bool = False,
) -> float | None:
    """``value`` as a finite float in ``[minimum, maximum]`` and ``> above`` (``None`` passes when
    ``optional``); NaN and infinities never pass."""
    if value is None and optional:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number (got {value!r})") from None
    bounds = [
        f">= {minimum}" if minimum is not None else "",
        f"<= {maximum}" if maximum is not None else "",
        f"> {above}" if above is not None else "",
    ]
    if (
        not math.isfinite(out)
        or (minimum is not None and out < minimum)
        or (maximum is not None and out > maximum)
        or (above is not None and out <= above)
    ):
        bound = " and ".join(b for b in bounds if b)
        raise ConfigError(f"{name} must be a finite number{' ' + bound if bound else ''} (got {value})")
    return out


def check_choice(value: Any, name: str, choices: Iterable[str]) -> str:
    """``value`` when it is one of ``choices``; else a ConfigError with the closest ones."""
    choices = list(choices)
    if value not in choices:
        hint = did_you_mean(value, choices, paren=True)
        raise ConfigError(f"{name} must be one of {', '.join(choices)} (got {value!r}){hint}")
    return value


def did_you_mean(name: object, choices: Iterable[str], n: int = 1, cutoff: float = 0.5, paren: bool = False) -> str:
    """A hint naming the ``choices`` closest to ``name``, or ``""`` when none is close.

    ``" Did you mean 'a'?"`` to follow a sentence, or ``" (did you mean 'a'?)"`` with ``paren``.
    """
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=cutoff)
    if not close:
        return ""
    names = ", ".join(repr(c) for c in close)
    return f" (did you mean {names}?)" if paren else f" Did you mean {names}?"


def check_shard(shard: Any, num_shards: Any) -> tuple[int, int]:
    """``(shard, num_shards)`` of an array job: ``num_shards >= 1`` and ``0 <= shard < num_shards``."""
    num_shards = check_positive(num_shards, "num_shards")
    if not 0 <= check_int(shard, "shard") < num_shards:
        raise ConfigError(f"shard must be in [0, num_shards) (got {shard} of {num_shards})")
    return int(shard), num_shards
