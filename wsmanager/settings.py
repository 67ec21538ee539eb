"""Numeric settings: one home for their checks.

Every numeric setting of ``ConnectionManager``, its heartbeat and the
backends is checked here, at construction and on every assignment, with the
same rules:

* a wrong type (a ``bool``, a ``str``, ``None`` where no "off" exists, a
  ``float`` where a count is expected) raises ``TypeError``;
* a value out of range (NaN, an infinity, a negative or zero count or
  duration where that means nothing, a count above :data:`MAX_COUNT`, a
  duration above :data:`MAX_SECONDS`) raises ``ValueError``;
* both messages start with the setting's name.

The upper bounds exist because the values reach C: a count is held by the
core as a ``Py_ssize_t`` (``sys.maxsize``), and a duration ends up as an
integer of milliseconds or nanoseconds (the Redis lease's ``PX``, CPython's
and uvloop's timers); past the bound these conversions raise
``OverflowError`` or saturate, so the bound is checked up front instead.
The same checks serve the public methods' arguments (``shutdown(timeout=)``,
``ping_user(timeout=)``, ``RedisBackend.wait_up(timeout)``).

A subclass may set a setting as a class attribute (``class M(
ConnectionManager): max_per_lobby = 50``): :func:`class_defaults` checks it
when the class is created and turns it into the default its instances start
with (a keyword argument still wins).

A check is a function ``check(name, value) -> value`` (the value normalized:
``int`` for counts, ``float`` for rates and seconds). :class:`Setting` is a
data descriptor that runs one on assignment.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

__all__ = [
    "MAX_COUNT",
    "MAX_SECONDS",
    "Check",
    "CoreSetting",
    "DefaultFloat",
    "DefaultInt",
    "Setting",
    "class_defaults",
    "count",
    "is_default",
    "optional_count",
    "optional_rate",
    "optional_seconds",
    "resolve",
    "seconds",
]

MAX_COUNT = sys.maxsize
"""Largest count a setting takes: the C core holds counts as ``Py_ssize_t``."""

MAX_SECONDS = 100 * 365 * 24 * 3600.0
"""Largest duration a setting takes (100 years, uvloop's ``MAX_SLEEP``): it
keeps ``seconds * 1000`` (the Redis lease in ms) and ``seconds * 1e9``
(CPython's ``_PyTime_t``) far inside a 64-bit integer."""

T = TypeVar("T")

Check = Callable[[str, object], T]
"""``check(name, value)``: the value, normalized, or TypeError / ValueError."""


def _type_name(value: object) -> str:
    return type(value).__name__


def _shown(n: int) -> str:
    # str() of an int past 4300 digits raises ValueError (int_max_str_digits)
    return str(n) if n.bit_length() <= 128 else f"an int of {n.bit_length()} bits"


def _integer(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int >= {minimum}, not {_type_name(value)}")
    n = operator.index(value)  # type: ignore[arg-type]
    if n < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {_shown(n)}")
    if n > MAX_COUNT:
        raise ValueError(f"{name} must be an int <= {MAX_COUNT} (sys.maxsize), got {_shown(n)}")
    return int(n)


def _real(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {what}, not {_type_name(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond a double
        raise ValueError(f"{name} must be {what}, got {_shown(int(value))}") from None
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
    """A duration in seconds: a number > 0 and <= :data:`MAX_SECONDS`, as a float."""
    number = _real(name, value, "a positive, finite number of seconds")
    if number <= 0:
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {number}")
    if number > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS:.0f} seconds (100 years), got {number}")
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


class DefaultInt(int):
    """An ``int`` parameter default, told apart by its type from the same
    number passed explicitly (see :func:`resolve`); it prints as the number."""

    __slots__ = ()


class DefaultFloat(float):
    """A ``float`` parameter default, told apart like :class:`DefaultInt`."""

    __slots__ = ()


def is_default(value: object) -> bool:
    """True for a :class:`DefaultInt` / :class:`DefaultFloat`: the caller
    left the parameter out."""
    return isinstance(value, (DefaultInt, DefaultFloat))


def resolve(defaults: Mapping[str, Any], name: str, value: T, *, none_is_unset: bool = False) -> T:
    """``value`` as passed, or the class default ``defaults[name]`` (from
    :func:`class_defaults`) when the caller left the parameter out: the value
    is the signature's :class:`DefaultInt` / :class:`DefaultFloat`, or None
    for a parameter whose default is None (``none_is_unset``)."""
    if name in defaults and (is_default(value) or (none_is_unset and value is None)):
        return defaults[name]  # type: ignore[no-any-return]
    return value


def class_defaults(
    cls: type, inherited: Mapping[str, Any], checks: Mapping[str, Check[Any]]
) -> dict[str, Any]:
    """The setting defaults of ``cls``: ``inherited`` updated with the
    settings ``cls`` sets as plain class attributes (``max_per_lobby = 50``).

    Each such attribute is checked now (TypeError / ValueError naming the
    setting and the class, at class creation) and removed from ``cls``, so
    the base class's validating descriptor stays in force for every later
    assignment. An attribute that is itself a descriptor (a property of the
    subclass's own) is left alone.
    """
    defaults = dict(inherited)
    for name, check in checks.items():
        if name not in cls.__dict__:
            continue
        value = cls.__dict__[name]
        if hasattr(type(value), "__get__"):
            continue
        try:
            defaults[name] = check(name, value)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{exc} (class attribute of {cls.__qualname__})") from None
        delattr(cls, name)
    return defaults


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
