"""Numeric settings: one home for their checks.

Every numeric setting of ``ConnectionManager``, its heartbeat and the
backends is checked here, at construction and on every assignment, with the
same rules:

* a wrong type (a ``bool``, a ``str``, ``None`` where no "off" exists, a
  ``float`` where a count is expected) raises ``TypeError``;
* a value out of range (NaN, an infinity, a negative or zero count or
  duration where that means nothing) raises ``ValueError``;
* both messages start with the setting's name.

A check is a function ``check(name, value) -> value`` (the value normalized:
``int`` for counts, ``float`` for rates and seconds). :class:`Setting` is a
data descriptor that runs one on assignment.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

__all__ = [
    "Check",
    "CoreSetting",
    "Setting",
    "count",
    "optional_count",
    "optional_rate",
    "optional_seconds",
    "seconds",
]

T = TypeVar("T")

Check = Callable[[str, object], T]
"""``check(name, value)``: the value, normalized, or TypeError / ValueError."""


def _type_name(value: object) -> str:
    return type(value).__name__


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int >= {minimum}, not {_type_name(value)}")
    n = operator.index(value)  # type: ignore[arg-type]
    if n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {n}")
    return int(n)


def _real(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {what}, not {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond a double
        raise ValueError(f"{name} must be {what}, got {value!r:.40}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be {what}, got {number}")
    return number


def count(minimum: int) -> Check[int]:
    """An ``int`` (or ``__index__``) >= ``minimum``; no bool, no float."""

    def check(name: str, value: object) -> int:
        return _integer(name, value, minimum)

    return check


def optional_count(minimum: int) -> Check[int | None]:
    """None (no limit) or an ``int`` >= ``minimum``."""

    def check(name: str, value: object) -> int | None:
        if value is None:
            return None
        try:
            return _integer(name, value, minimum)
        except TypeError:
            raise TypeError(f"{name} must be None or an int >= {minimum}, not {_type_name(value)}") from None

    return check


def seconds(name: str, value: object) -> float:
    """A duration in seconds: a finite number > 0, as a float."""
    number = _real(name, value, "a positive, finite number of seconds")
    if number <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {number}")
    return number


def optional_seconds(name: str, value: object) -> float | None:
    """None (off) or a duration: a finite number of seconds > 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, not {_type_name(value)}")
    return seconds(name, value)


def optional_rate(minimum: float) -> Check[float | None]:
    """None or a finite number >= ``minimum``, as a float."""

    def check(name: str, value: object) -> float | None:
        if value is None:
            return None
        number = _real(name, value, f"None or a finite number >= {minimum:g}")
        if number < minimum:
            raise ValueError(f"{name} must be None or a finite number >= {minimum:g}, got {number}")
        return number

    return check


class Setting(Generic[T]):
    """A validated attribute: assigning it runs ``check(name, value)`` and
    stores the result in the instance's ``__dict__``, so a read costs what a
    plain attribute's does (the descriptor has no ``__get__``).

    ``Owner.attr.validate(value)`` runs the same check without storing.
    """

    def __init__(self, check: Check[T]) -> None:
        self.check = check
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def validate(self, value: object) -> T:
        """The checked, normalized ``value``, or TypeError / ValueError."""
        return self.check(self.name, value)

    def __set__(self, obj: Any, value: T) -> None:
        obj.__dict__[self.name] = self.check(self.name, value)

    if TYPE_CHECKING:

        @overload
        def __get__(self, obj: None, owner: type) -> Setting[T]: ...
        @overload
        def __get__(self, obj: object, owner: type) -> T: ...
        def __get__(self, obj: object, owner: type) -> Setting[T] | T: ...


class CoreSetting(Setting[T]):
    """A validated attribute held by the C core: ``base`` is the core's own
    descriptor (``Core.__dict__[name]``), read through and assigned after
    the check."""

    def __init__(self, base: Any, check: Check[T]) -> None:
        super().__init__(check)
        self.base = base

    def __set__(self, obj: Any, value: T) -> None:
        self.base.__set__(obj, self.check(self.name, value))

    @overload
    def __get__(self, obj: None, owner: type) -> CoreSetting[T]: ...
    @overload
    def __get__(self, obj: object, owner: type) -> T: ...
    def __get__(self, obj: object, owner: type) -> CoreSetting[T] | T:
        if obj is None:
            return self
        return self.base.__get__(obj, owner)  # type: ignore[no-any-return]
