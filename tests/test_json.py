"""wsmanager.dumps: the compact JSON encoder of the C core.

The reference is json.dumps(x, ensure_ascii=False, separators=(",", ":"),
allow_nan=False): same text for everything it can encode, except lone
surrogates, which dumps escapes so that its output is always valid UTF-8.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import decimal
import enum
import gc
import json
import math
import os
import random
import subprocess
import sys
import tracemalloc
import uuid
import zoneinfo
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import pydantic
import pytest
from fastapi import FastAPI, WebSocket
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from tests.asgi_fakes import FakePeer
from wsmanager import Connection, ConnectionManager, dumps
from wsmanager._core import encode_message


def reference(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def join_surrogate_pairs(s: str) -> str:
    """What a JSON reader makes of s: adjacent high+low surrogates are one character."""
    return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")


def expected(obj: Any) -> Any:
    """The value json.loads(dumps(obj)) must give back."""
    if isinstance(obj, str):
        return join_surrogate_pairs(obj)
    if isinstance(obj, (list, tuple)):
        return [expected(item) for item in obj]
    if isinstance(obj, dict):
        return {join_surrogate_pairs(k): expected(v) for k, v in obj.items()}
    return obj


def has_surrogate(obj: Any) -> bool:
    if isinstance(obj, str):
        return any("\ud800" <= ch <= "\udfff" for ch in obj)
    if isinstance(obj, (list, tuple)):
        return any(has_surrogate(item) for item in obj)
    if isinstance(obj, dict):
        return any(has_surrogate(k) or has_surrogate(v) for k, v in obj.items())
    return False


# Every code point, including surrogates and control characters.
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
big_ints = st.integers(min_value=-(10**300), max_value=10**300)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | big_ints | st.integers() | finite_floats | any_text
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=8)
        | st.lists(children, max_size=8).map(tuple)
        | st.dictionaries(any_text, children, max_size=8)
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_round_trip_and_same_text_as_json_dumps(value: Any) -> None:
    text = dumps(value)
    assert isinstance(text, str)
    text.encode("utf-8")  # always valid UTF-8, even with lone surrogates
    assert json.loads(text) == expected(value)
    if not has_surrogate(value):
        assert text == reference(value)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.none() | st.booleans() | st.integers() | big_ints | finite_floats | any_text,
        scalars,
        max_size=8,
    )
)
def test_dict_keys_are_converted_like_json_dumps(value: dict[Any, Any]) -> None:
    if not has_surrogate(value):
        assert dumps(value) == reference(value)


@settings(max_examples=300, deadline=None)
@given(finite_floats)
def test_floats_are_written_like_float_repr(value: float) -> None:
    text = dumps(value)
    assert text == repr(value)
    assert float(text) == value
    assert math.copysign(1.0, float(text)) == math.copysign(1.0, value)


@pytest.mark.parametrize(
    "value",
    [
        0.0,
        -0.0,
        0.1,
        0.30000000000000004,
        1732761600.123,
        1732761600.1234567,
        1e16,
        9999999999999998.0,
        1e-4,
        9.999999999999999e-05,
        1e-05,
        5e-324,
        2.2250738585072014e-308,
        1.7976931348623157e308,
        2.0**50 + 0.25,  # exactly between two shortest candidates: the even one wins
        123456789.98765433,
        -2.5,
    ],
)
def test_float_edge_cases_match_repr(value: float) -> None:
    assert dumps(value) == repr(value)
    assert dumps([value]) == f"[{value!r}]"


def test_decimals_with_few_digits_match_repr() -> None:
    # Prices, coordinates, timestamps: up to 4 decimals, every magnitude up to
    # 2**53, including around 2**51 / 10**4 where the shortcut changes.
    rng = random.Random(7)
    values = [
        sign * (whole + frac / 10**k)
        for sign in (1, -1)
        for k in range(6)
        for _ in range(300)
        for whole, frac in [(rng.randrange(10 ** rng.randrange(16)), rng.randrange(10**k))]
    ]
    values += [
        i / 10**k for k in range(5) for i in range(2**51 // 10**4 * 10**k - 50, 2**51 // 10**4 * 10**k + 50)
    ]
    values += [2.0**51 / 10**k + d for k in range(5) for d in (-0.5, -0.25, 0.0, 0.25, 0.5)]
    assert dumps(values) == "[" + ",".join(map(repr, values)) + "]"


def test_compact_output_of_a_chat_message() -> None:
    msg = {"type": "chat", "user": "alice", "text": "hello world", "ts": 1732761600.123, "seq": 42}
    assert dumps(msg) == '{"type":"chat","user":"alice","text":"hello world","ts":1732761600.123,"seq":42}'


def test_scalars_and_empty_containers() -> None:
    assert dumps(None) == "null"
    assert dumps(True) == "true"
    assert dumps(False) == "false"
    assert dumps([]) == "[]"
    assert dumps(()) == "[]"
    assert dumps({}) == "{}"
    assert dumps("") == '""'
    assert dumps([[], {}, ()]) == "[[],{},[]]"
    assert dumps((1, (2, [3]))) == "[1,[2,[3]]]"


@pytest.mark.parametrize(
    "value",
    [
        *(0, -1, 9, 10, 99, 100, 2**15, 2**30 - 1, 2**30, -(2**30), 2**31, -(2**31)),
        *(2**60 - 1, 2**60, -(2**60) + 1, -(2**60), 2**63 - 1, -(2**63), 2**63, 2**64),
        *(-(2**64) - 1, 10**200),
    ],
)
def test_ints_of_any_size(value: int) -> None:
    assert dumps(value) == str(value)
    assert dumps([value, -value, value * 0]) == f"[{value},{-value},0]"
    assert dumps({value: value}) == f'{{"{value}":{value}}}'


def test_int_too_long_for_str_raises_like_str() -> None:
    if not hasattr(sys, "set_int_max_str_digits"):
        pytest.skip("no int max str digits limit before 3.11")
    huge = 10**5000
    with pytest.raises(ValueError):
        str(huge)
    with pytest.raises(ValueError):
        dumps([huge])


def test_strings_escape_only_what_json_requires() -> None:
    assert dumps('say "hi" \\ bye') == r'"say \"hi\" \\ bye"'
    assert dumps("\n\r\t\b\f") == r'"\n\r\t\b\f"'
    assert dumps("\x00\x01\x1f") == r'"\u0000\u0001\u001f"'
    # DEL, non-ASCII and the JS line separators are kept as they are
    assert dumps("\x7f é 中 😀 \u2028\u2029") == '"\x7f é 中 😀 \u2028\u2029"'
    control = "".join(chr(c) for c in range(0x20))
    assert json.loads(dumps(control)) == control
    assert dumps(control) == reference(control)


def test_escapes_at_every_position_of_short_and_long_strings() -> None:
    # Short strings are checked with overlapping word loads, long ones by
    # blocks: an escape must be found wherever it sits.
    for length in (*range(1, 40), 255, 256, 257, 300):
        for pos in {0, length // 3, length // 2, length - 1}:
            for special in ('"', "\\", "\n", "\x00", "\x1f"):
                text = "a" * pos + special + "b" * (length - pos - 1)
                assert dumps(text) == reference(text)
                assert dumps({text: text}) == reference({text: text})
            text = "é" * pos + "\x7f" + "中" * (length - pos - 1)
            assert dumps(text) == reference(text)


# Strings of each storage width, mixed in one message: the result is built
# as a str of the widest kind they need (and no wider: == compares kinds).
WIDTHS = ["ascii", "\x7f", "é", "\xff", "Ā", "中", "\uffff", "😀", "\U0010ffff", 'q"\n']


@pytest.mark.parametrize("a", WIDTHS)
@pytest.mark.parametrize("b", WIDTHS)
def test_mixed_widths_give_the_same_str_as_json_dumps(a: str, b: str) -> None:
    msg = {a: [b, a * 3, {"k": b * 20, b: 1}], "n": [1, -2, 3.5], "s": "plain " * 5}
    out = dumps(msg)
    assert out == reference(msg)
    assert max(map(ord, out)) == max(map(ord, reference(msg)))
    assert sys.getsizeof(out) == sys.getsizeof(reference(msg))


@pytest.mark.parametrize("wide", ["", "é", "中", "😀"])
def test_lone_surrogates_next_to_other_widths(wide: str) -> None:
    msg = {"a": wide, "b": "x\ud800y", wide: ["\udfff", wide * 3]}
    out = dumps(msg)
    out.encode("utf-8")
    assert json.loads(out) == msg
    assert out == reference(msg).replace("\ud800", "\\ud800").replace("\udfff", "\\udfff")


@pytest.mark.parametrize(
    "text",
    ["plain ascii", "x" * 1000 + '"', "é" * 300 + "\n", "中文" * 200 + "\\", "😀" * 100 + "\x01"],
)
def test_long_strings_of_each_width(text: str) -> None:
    assert dumps(text) == reference(text)
    assert dumps({text: [text]}) == reference({text: [text]})


@pytest.mark.parametrize(
    "text",
    ["\ud800", "a\udfffb", "\udc00\ud800", "é\ud83d", "😀\udbff", "\ud83d\ude00"],
)
def test_lone_surrogates_are_escaped_and_read_back(text: str) -> None:
    out = dumps(text)
    out.encode("utf-8")  # json.dumps(ensure_ascii=False) would give unencodable text here
    assert "\\ud" in out
    assert json.loads(out) == join_surrogate_pairs(text)
    assert json.loads(dumps({text: text})) == {join_surrogate_pairs(text): join_surrogate_pairs(text)}


def test_dict_keys_conversion() -> None:
    value = {"s": 0, 5: 1, -2: 2, 2.5: 3, True: 4, False: 5, None: 6, 10**30: 7}
    assert dumps(value) == (
        '{"s":0,"5":1,"-2":2,"2.5":3,"true":4,"false":5,"null":6,"1000000000000000000000000000000":7}'
    )
    assert dumps(value) == reference(value)


@pytest.mark.parametrize("key", [(1, 2), b"bytes", frozenset(), object()])
def test_unsupported_dict_key_raises_type_error_naming_the_type(key: Any) -> None:
    with pytest.raises(TypeError, match=type(key).__name__):
        dumps({key: 1})


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, [1, math.nan], {"x": math.inf}, {math.nan: 1}, {-math.inf: 1}],
)
def test_nan_and_infinity_raise_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        dumps(value)


@pytest.mark.parametrize(
    "value", [{1, 2}, b"bytes", bytearray(b"x"), object(), 1j, datetime.timedelta(seconds=1)]
)
def test_unsupported_types_raise_type_error(value: Any) -> None:
    with pytest.raises(TypeError, match=f"Object of type {type(value).__name__} is not JSON serializable"):
        dumps({"nested": [value]})


def test_default_converts_unsupported_objects() -> None:
    when = datetime.datetime(2024, 11, 28, 12, 30, tzinfo=datetime.timezone.utc)

    def convert(obj: Any) -> Any:
        if isinstance(obj, datetime.datetime):
            return obj.isoformat()
        if isinstance(obj, set):
            return sorted(obj)
        raise TypeError(f"cannot encode {type(obj).__name__}")

    msg = {"at": when, "tags": {"b", "a"}, "ok": True}
    assert dumps(msg, default=convert) == '{"at":"2024-11-28T12:30:00+00:00","tags":["a","b"],"ok":true}'
    assert dumps(msg, default=convert) == json.dumps(msg, default=convert, separators=(",", ":"))


def test_default_is_not_called_for_supported_types() -> None:
    calls: list[Any] = []

    def spy(obj: Any) -> Any:
        calls.append(obj)
        return None

    dumps({"a": [1, 2.5, "s", None, True, (1,)]}, default=spy)
    assert calls == []


def test_exception_raised_by_default_propagates() -> None:
    class Refused(Exception):
        pass

    def refuse(obj: Any) -> Any:
        raise Refused(repr(obj))

    with pytest.raises(Refused):
        dumps({"a": [1, object()]}, default=refuse)


def test_default_returning_unsupported_objects_forever_raises_recursion_error() -> None:
    with pytest.raises(RecursionError):
        dumps(object(), default=lambda obj: obj)
    with pytest.raises(RecursionError):
        dumps(object(), default=lambda obj: [object()])
    assert dumps([1]) == "[1]"


def test_default_none_means_no_default() -> None:
    with pytest.raises(TypeError):
        dumps(object(), default=None)


def test_default_mutating_the_container_does_not_crash() -> None:
    items: list[Any] = [object(), 1, 2, 3]
    mapping: dict[str, Any] = {"a": object(), "b": 1, "c": 2}

    def clear_items(obj: Any) -> Any:
        items.clear()
        return "gone"

    def clear_mapping(obj: Any) -> Any:
        mapping.clear()
        mapping.update({f"new{i}": i for i in range(100)})  # forces a resize
        return "gone"

    assert json.loads(dumps(items, default=clear_items)) == ["gone"]
    out = json.loads(dumps(mapping, default=clear_mapping))
    assert out["a"] == "gone"


def test_subclasses_are_encoded_as_their_base_type() -> None:
    class Level(enum.IntEnum):
        HIGH = 3

    class Color(str, enum.Enum):
        RED = "red"

    class Meters(float):
        def __repr__(self) -> str:
            return "Meters(...)"

    class Point(NamedTuple):
        x: int
        y: int

    class Tags(list[str]):
        pass

    ordered = collections.OrderedDict([("a", 1), ("b", 2)])
    ordered.move_to_end("a")
    value = {
        "level": Level.HIGH,
        "color": Color.RED,
        "m": Meters(1.5),
        "p": Point(1, 2),
        "tags": Tags(["x"]),
        "od": ordered,
        "dd": collections.defaultdict(int, {"k": 1}),
        Level.HIGH: "int-enum key",
        Color.RED: "str-enum key",
    }
    text = dumps(value)
    assert text == (
        '{"level":3,"color":"red","m":1.5,"p":[1,2],"tags":["x"],"od":{"b":2,"a":1},'
        '"dd":{"k":1},"3":"int-enum key","red":"str-enum key"}'
    )
    assert text == reference(value)


def test_deep_nesting_raises_recursion_error() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        dumps(deep)
    nested: Any = {}
    for _ in range(100_000):
        nested = {"a": nested}
    with pytest.raises(RecursionError):
        dumps(nested)
    # still usable afterwards
    assert dumps({"ok": [1]}) == '{"ok":[1]}'


def test_moderate_nesting_is_fine() -> None:
    value: Any = 1
    for _ in range(200):
        value = [{"k": value}]
    assert json.loads(dumps(value)) == value


def test_self_referencing_containers_raise() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises((RecursionError, ValueError)):
        dumps(loop)
    cycle: dict[str, Any] = {}
    cycle["self"] = [cycle]
    with pytest.raises((RecursionError, ValueError)):
        dumps(cycle)


def test_large_output_is_correct() -> None:
    value = {
        "blob": "é" * 2_000_000,
        "ascii": "x" * 1_000_000,
        "numbers": list(range(300_000)),
        "floats": [i / 7 for i in range(50_000)],
        "rows": [{"id": i, "name": f"user{i}", "line": "a\nb"} for i in range(20_000)],
    }
    text = dumps(value)
    assert len(text) > 5_000_000
    assert text == reference(value)


def test_large_pure_ascii_output() -> None:
    value = ["abc\n" * 100] * 20_000
    text = dumps(value)
    assert text == reference(value)
    assert text.isascii()


def test_refcounts_unchanged_after_success() -> None:
    inner = [1.5, "text", 10**40, None]
    payload = {"k": inner, "t": (inner,)}
    marker = object()
    before = (sys.getrefcount(payload), sys.getrefcount(inner), sys.getrefcount(marker))
    for _ in range(1000):
        dumps(payload)
        dumps([marker], default=lambda obj: "m")
    assert (sys.getrefcount(payload), sys.getrefcount(inner), sys.getrefcount(marker)) == before


def test_refcounts_unchanged_after_failure() -> None:
    bad = object()
    payload = {"ok": [1, 2], "bad": [bad]}
    nan_payload = [1, {"x": math.nan}]
    before = (sys.getrefcount(bad), sys.getrefcount(payload), sys.getrefcount(nan_payload))

    def refuse(obj: Any) -> Any:
        raise KeyError("no")

    for _ in range(1000):
        with pytest.raises(TypeError):
            dumps(payload)
        with pytest.raises(KeyError):
            dumps(payload, default=refuse)
        with pytest.raises(ValueError):
            dumps(nan_payload)
    assert (sys.getrefcount(bad), sys.getrefcount(payload), sys.getrefcount(nan_payload)) == before


def test_memory_is_flat_over_many_calls() -> None:
    msg = {"type": "state", "players": [{"id": i, "x": i * 0.5, "name": "é" * i} for i in range(10)]}
    bad = {"x": [object()]}

    def run(n: int) -> None:
        for _ in range(n):
            dumps(msg)
            dumps({"s": "x" * 10_000})  # past the stack buffer: heap path
            with contextlib.suppress(TypeError):
                dumps(bad)

    run(1000)  # warm caches
    gc.collect()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        run(20_000)
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert end - start < 64 * 1024


# ---------------------------------------------------------------------------
# Types real apps send: datetime / date / time, UUID, Decimal, Enum,
# dataclasses, pydantic models; converters on the sends.

UTC = datetime.timezone.utc
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")


def tz(**delta: float) -> datetime.timezone:
    return datetime.timezone(datetime.timedelta(**delta))


def iso(value: Any) -> str:
    return json.dumps(value.isoformat())


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2024, 11, 28, 12, 30),
        datetime.datetime(2024, 11, 28, 12, 30, 5, 1),
        datetime.datetime(2024, 11, 28, 12, 30, 5, 999_999),
        datetime.datetime(1, 1, 1),
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999_999),
        datetime.datetime(2024, 1, 1, tzinfo=UTC),
        datetime.datetime(2024, 1, 1, 0, 0, 0, 10, tzinfo=tz(hours=0)),
        datetime.datetime(2024, 1, 1, tzinfo=tz(hours=5, minutes=30)),
        datetime.datetime(2024, 1, 1, tzinfo=tz(hours=-9, minutes=-30)),
        datetime.datetime(2024, 1, 1, tzinfo=tz(hours=23, minutes=59, seconds=59, microseconds=999_999)),
        datetime.datetime(2024, 1, 1, tzinfo=tz(hours=-23, minutes=-59, seconds=-59, microseconds=-999_999)),
        datetime.datetime(2024, 1, 1, tzinfo=tz(seconds=7)),
        datetime.datetime(2024, 1, 1, tzinfo=tz(seconds=-1, microseconds=-1)),
        datetime.datetime(2024, 1, 1, tzinfo=tz(microseconds=1)),
        datetime.datetime(1, 1, 1, tzinfo=tz(hours=1)),
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=tz(hours=-12)),
        # the same wall time twice at the end of DST: fold picks the offset
        datetime.datetime(2021, 11, 7, 1, 30, tzinfo=NEW_YORK),
        datetime.datetime(2021, 11, 7, 1, 30, fold=1, tzinfo=NEW_YORK),
        datetime.datetime(2024, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("Asia/Kathmandu")),
        datetime.datetime(1900, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Amsterdam")),  # +00:19:32
        datetime.date(1, 1, 1),
        datetime.date(2024, 2, 29),
        datetime.date(9999, 12, 31),
        datetime.time(0, 0),
        datetime.time(23, 59, 59, 999_999),
        datetime.time(12, 0, 0, 1),
        datetime.time(12, 0, tzinfo=UTC),
        datetime.time(12, 0, tzinfo=tz(hours=-3, seconds=-5, microseconds=-6)),
        datetime.time(12, 0, tzinfo=NEW_YORK),  # utcoffset(None) is None: naive text
    ],
    ids=repr,
)
def test_dates_and_times_are_written_as_isoformat(value: Any) -> None:
    assert dumps(value) == iso(value)
    assert dumps({"at": [value]}) == '{"at":[' + iso(value) + "]}"
    assert json.loads(dumps(value)) == value.isoformat()


fixed_offsets = st.timedeltas(
    min_value=datetime.timedelta(hours=-24) + datetime.timedelta(microseconds=1),
    max_value=datetime.timedelta(hours=24) - datetime.timedelta(microseconds=1),
).map(datetime.timezone)
zones = st.none() | st.just(UTC) | fixed_offsets | st.timezones()


@settings(max_examples=300, deadline=None)
@given(st.datetimes(timezones=zones, allow_imaginary=True), st.times(timezones=zones), st.dates())
def test_any_date_time_and_zone_matches_isoformat(
    when: datetime.datetime, clock: datetime.time, day: datetime.date
) -> None:
    assert dumps([when, clock, day]) == f"[{iso(when)},{iso(clock)},{iso(day)}]"


class Stamp(datetime.datetime):
    """A datetime subclass that keeps isoformat()."""


class Nanos(datetime.datetime):
    """A datetime subclass with its own text (pandas' Timestamp does this)."""

    def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
        return super().isoformat(sep, timespec) + "000"


class Day(datetime.date):
    def isoformat(self) -> str:
        return "day " + super().isoformat()


class Clock(datetime.time):
    pass


def test_date_and_time_subclasses_use_their_isoformat() -> None:
    values: list[datetime.date | datetime.time] = [
        Stamp(2024, 1, 2, 3, 4, 5, 6, tzinfo=tz(hours=1)),
        Nanos(2024, 1, 2, 3, 4, 5, 6),
        Day(2024, 1, 2),
        Clock(1, 2, 3, tzinfo=UTC),
    ]
    assert json.loads(dumps(values)) == [v.isoformat() for v in values]
    assert json.loads(dumps(values))[1] == "2024-01-02T03:04:05.000006000"


class BadOffset(datetime.tzinfo):
    def __init__(self, offset: Any) -> None:
        self.offset = offset

    def utcoffset(self, dt: datetime.datetime | None) -> Any:
        if isinstance(self.offset, BaseException):
            raise type(self.offset)(*self.offset.args)  # a fresh one: no traceback piles up
        return self.offset

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta | None:
        return None

    def tzname(self, dt: datetime.datetime | None) -> str | None:
        return None


@pytest.mark.parametrize(
    ("offset", "error"),
    [
        (LookupError("no such zone"), LookupError),
        (datetime.timedelta(hours=24), ValueError),  # datetime's own check
        ("+01:00", TypeError),
    ],
)
def test_a_tzinfo_whose_utcoffset_fails_gives_a_clear_error(offset: Any, error: type[Exception]) -> None:
    for value in (
        datetime.datetime(2024, 1, 1, tzinfo=BadOffset(offset)),
        datetime.time(1, 0, tzinfo=BadOffset(offset)),
    ):
        with pytest.raises(error) as raised:
            value.isoformat()
        with pytest.raises(error):
            dumps({"at": [value]})
        # the sends: one exception type for "cannot be serialized"
        with pytest.raises(TypeError) as wrapped:
            encode_message({"at": [value]}, None)
        if error is not TypeError:
            assert "utcoffset()" in str(wrapped.value)
            assert type(wrapped.value.__cause__) is type(raised.value)


def test_a_tzinfo_answering_none_is_naive_like_isoformat() -> None:
    value = datetime.datetime(2024, 1, 1, 8, tzinfo=BadOffset(None))
    assert dumps(value) == iso(value) == '"2024-01-01T08:00:00"'


def test_isoformat_that_raises_or_returns_no_str() -> None:
    class Raising(datetime.datetime):
        def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
            raise RuntimeError("broken")

    class NotText(datetime.date):
        def isoformat(self) -> Any:
            return 42

    with pytest.raises(RuntimeError, match="broken"):
        dumps([Raising(2024, 1, 1)])
    with pytest.raises(TypeError, match=r"isoformat\(\) raised RuntimeError for an object of type Raising"):
        encode_message([Raising(2024, 1, 1)], None)
    with pytest.raises(TypeError, match="returned int, not str"):
        dumps({"d": NotText(2024, 1, 1)})


@pytest.mark.parametrize(
    "value",
    [
        uuid.UUID(int=0),
        uuid.UUID(int=2**128 - 1),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        uuid.uuid1(),
        uuid.uuid4(),
        uuid.uuid5(uuid.NAMESPACE_DNS, "example.com"),
    ],
)
def test_uuids_are_written_as_str(value: uuid.UUID) -> None:
    assert dumps(value) == f'"{value}"'
    assert json.loads(dumps({"id": value, "ids": [value, value]})) == {
        "id": str(value),
        "ids": [str(value)] * 2,
    }


def test_uuid_subclasses_use_their_str() -> None:
    class Short(uuid.UUID):
        def __str__(self) -> str:
            return self.hex[:8]

    value = Short(int=2**100)
    assert dumps([value]) == f'["{value.hex[:8]}"]'


@pytest.mark.parametrize(
    "text",
    [
        "0",
        "-0",
        "1",
        "12.50",
        "-0.001",
        "1E+3",
        "1.5E-7",
        "0E-7",
        "-0.0",
        "123456789012345678901234567890.0123456789",
    ],
)
def test_decimals_are_exact_json_numbers(text: str) -> None:
    value = decimal.Decimal(text)
    assert dumps(value) == str(value)
    assert json.loads(dumps([value]), parse_float=decimal.Decimal, parse_int=decimal.Decimal) == [value]
    assert json.loads(dumps({"price": value}))["price"] == float(value)


@pytest.mark.parametrize("text", ["NaN", "-NaN", "sNaN", "Infinity", "-Infinity", "NaN123"])
def test_non_finite_decimals_raise_value_error_like_floats(text: str) -> None:
    with pytest.raises(ValueError, match="not JSON compliant"):
        dumps({"x": [decimal.Decimal(text)]})


@pytest.mark.parametrize(
    "text",
    [
        "1E+400",
        "-1E+400",
        "1.7976931348623159E+308",  # rounds up past DBL_MAX
        "1" + "0" * 309,  # no exponent: 1e309 as 310 digits
        "-" + "9" * 400 + ".5",
        "0.1E+310",
    ],
)
def test_a_decimal_beyond_the_double_range_is_not_sent_as_infinity(text: str) -> None:
    # README: Decimal NaN and Infinity raise ValueError "as floats do"
    # (browsers cannot parse them). Decimal("1E+400") was written as the
    # number 1E+400, which JSON.parse and json.loads read as Infinity: the
    # client got the value the encoder promises never to send. It raises.
    assert math.isinf(float(text))  # what every double-based reader makes of it
    with pytest.raises(ValueError, match="Out of range Decimal values are not JSON compliant"):
        dumps({"price": decimal.Decimal(text)})


@pytest.mark.parametrize(
    "text", ["1.7976931348623157E+308", "-1" + "0" * 308, "9" * 308 + ".99", "1E-400", "1E+308"]
)
def test_a_decimal_at_the_edge_of_the_double_range_is_written(text: str) -> None:
    value = decimal.Decimal(text)
    assert dumps(value) == str(value)
    assert math.isfinite(json.loads(dumps({"x": value}))["x"])


def test_a_decimal_subclass_whose_str_is_not_a_number_raises() -> None:
    class Money(decimal.Decimal):
        def __str__(self) -> str:
            return "$" + super().__str__()

    with pytest.raises(ValueError, match="not a JSON number"):
        dumps(Money("1.50"))


class Color(enum.Enum):
    RED = "red"
    PAIR = (1, "two")
    WHEN = datetime.date(2024, 1, 1)


class Mode(enum.Enum):
    DARK = Color.RED  # an Enum whose value is an Enum


class Level(enum.IntEnum):
    HIGH = 3


class Perm(enum.Flag):
    R = 4
    W = 2


class Shade(str, enum.Enum):
    BLUE = "blue"


def test_enums_are_written_by_their_value() -> None:
    value = [Color.RED, Color.PAIR, Color.WHEN, Mode.DARK, Perm.R | Perm.W, Level.HIGH, Shade.BLUE]
    assert dumps(value) == '["red",[1,"two"],"2024-01-01","red",6,3,"blue"]'
    assert dumps({Level.HIGH: Shade.BLUE, Shade.BLUE: 1}) == '{"3":"blue","blue":1}'


def test_an_enum_whose_value_is_itself_raises_recursion_error() -> None:
    class Loop(enum.Enum):
        A = 1

    Loop.A._value_ = Loop.A  # type: ignore[assignment]
    with pytest.raises(RecursionError):
        dumps([Loop.A])


@dataclasses.dataclass
class Point:
    x: float
    y: float


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    kind: str
    at: datetime.datetime
    where: Point
    tags: tuple[str, ...] = ()
    shared: ClassVar[int] = 7  # not a field
    seq: int = dataclasses.field(default=0, init=False)  # a field


@dataclasses.dataclass
class WithInitVar:
    a: int
    secret: dataclasses.InitVar[str]

    def __post_init__(self, secret: str) -> None:
        self.b = len(secret)  # an attribute, not a field


def test_dataclass_instances_are_objects_of_their_fields_in_order() -> None:
    when = datetime.datetime(2024, 1, 1, tzinfo=UTC)
    event = Event("move", when, Point(1.5, -2), ("a",))
    assert dumps(event) == (
        '{"kind":"move","at":"2024-01-01T00:00:00+00:00","where":{"x":1.5,"y":-2},"tags":["a"],"seq":0}'
    )
    assert json.loads(dumps([event])) == [
        {**dataclasses.asdict(event), "at": when.isoformat(), "tags": ["a"]}
    ]
    assert dumps(WithInitVar(1, "xyz")) == '{"a":1}'


def test_dataclass_classes_are_not_instances() -> None:
    with pytest.raises(TypeError, match="Object of type type is not JSON serializable"):
        dumps([Point])
    assert dumps([Point], default=lambda cls: cls.__name__) == '["Point"]'


def test_self_referencing_dataclass_raises_recursion_error() -> None:
    @dataclasses.dataclass
    class Node:
        child: Any = None

    node = Node()
    node.child = node
    with pytest.raises(RecursionError):
        dumps(node)


def test_a_dataclass_field_that_raises() -> None:
    @dataclasses.dataclass
    class Lazy:
        a: int

        def __getattribute__(self, name: str) -> Any:
            if name == "a":
                raise KeyError("not loaded")
            return object.__getattribute__(self, name)

    with pytest.raises(KeyError):
        dumps({"x": Lazy(1)})
    with pytest.raises(
        TypeError, match="a dataclass field raised KeyError for an object of type Lazy"
    ) as raised:
        encode_message({"x": Lazy(1)}, None)
    assert isinstance(raised.value.__cause__, KeyError)


def test_a_dataclass_field_that_mutates_its_container_and_the_fields() -> None:
    items: list[Any] = []

    @dataclasses.dataclass
    class Hostile:
        a: int
        b: int
        c: int

        def __getattribute__(self, name: str) -> Any:
            if name == "a":
                items.clear()  # drops the last reference to the other items
                fields = type(self).__dataclass_fields__
                fields.pop("c", None)  # the table being walked
                fields.update({f"f{i}": fields["b"] for i in range(50)})  # and a resize
                gc.collect()
            if name.startswith("f") and name[1:].isdigit():
                return 0  # the fields it added
            return object.__getattribute__(self, name)

    items.extend([Hostile(1, 2, 3), {"big": list(range(1000))}, [object()]])
    out = dumps(items, default=lambda obj: "converted")
    assert json.loads(out)[0]["a"] == 1


class PydanticColor(enum.Enum):
    RED = "red"


def test_pydantic_models_are_written_through_model_dump_json_mode() -> None:

    class Item(pydantic.BaseModel):
        id: uuid.UUID
        price: decimal.Decimal
        at: datetime.datetime
        color: PydanticColor
        tags: set[str] = set()

    class Order(pydantic.BaseModel):
        items: list[Item]
        note: str | None = None

    when = datetime.datetime(2024, 1, 1, 12, tzinfo=tz(hours=2))
    order = Order(
        items=[Item(id=uuid.UUID(int=5), price=decimal.Decimal("9.90"), at=when, color=PydanticColor.RED)]
    )
    assert json.loads(dumps({"order": order})) == {"order": json.loads(order.model_dump_json())}
    assert json.loads(dumps(order)) == order.model_dump(mode="json")


def test_pydantic_model_dump_that_raises_mutates_or_loops() -> None:
    box: list[Any] = []

    class Broken(pydantic.BaseModel):
        def model_dump(self, **kwargs: Any) -> Any:
            raise RuntimeError("no dump")

    class Selfish(pydantic.BaseModel):
        def model_dump(self, **kwargs: Any) -> Any:
            return self

    class Mutating(pydantic.BaseModel):
        n: int = 1

        def model_dump(self, **kwargs: Any) -> Any:
            assert kwargs == {"mode": "json"}
            box.clear()
            gc.collect()
            return super().model_dump(**kwargs)

    with pytest.raises(RuntimeError):
        dumps([Broken()])
    with pytest.raises(TypeError, match=r"model_dump\(\) raised RuntimeError for an object of type Broken"):
        encode_message([Broken()], None)
    with pytest.raises(RecursionError):
        dumps(Selfish())
    box.extend([Mutating(), Mutating(), {"k": [object()]}])
    # the list emptied while its first item was encoded: what is left of it
    assert dumps(box, default=lambda obj: None) == '[{"n":1}]'


def test_pydantic_is_not_imported_by_the_encoder() -> None:
    code = (
        "import sys, datetime, uuid, decimal, dataclasses, enum\n"
        "from wsmanager import dumps\n"
        "assert 'pydantic' not in sys.modules\n"
        "@dataclasses.dataclass\n"
        "class P:\n"
        "    x: int\n"
        "print(dumps([datetime.date(2024, 1, 1), uuid.UUID(int=1), decimal.Decimal('1.5'), P(1),"
        " object()], default=lambda o: type(o).__name__))\n"
        "assert 'pydantic' not in sys.modules, 'imported pydantic'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '["2024-01-01","00000000-0000-0000-0000-000000000001",1.5,{"x":1},"object"]'


def test_native_types_never_reach_default() -> None:
    seen: list[Any] = []

    def spy(obj: Any) -> Any:
        seen.append(obj)
        return "converted"

    value = [
        datetime.datetime(2024, 1, 1),
        datetime.date(2024, 1, 1),
        datetime.time(1),
        uuid.UUID(int=1),
        decimal.Decimal("1"),
        Color.RED,
        Point(1, 2),
        {1, 2},
    ]
    assert json.loads(dumps(value, default=spy))[-1] == "converted"
    assert seen == [{1, 2}]


# -- converters on the sends: encode_message(message, default)


def test_encode_message_wraps_what_a_converter_raises_in_a_type_error() -> None:
    def refuse(obj: Any) -> Any:
        raise KeyError("nope")

    with pytest.raises(
        TypeError, match=r"default\(\) raised KeyError for an object of type set: 'nope'"
    ) as raised:
        encode_message({"x": [{1}]}, refuse)
    assert isinstance(raised.value.__cause__, KeyError)
    # dumps keeps json.dumps's behaviour: the converter's own exception
    with pytest.raises(KeyError):
        dumps({"x": [{1}]}, default=refuse)


def test_encode_message_keeps_type_recursion_and_base_exceptions() -> None:
    own = TypeError("mine")

    class Stop(BaseException):
        pass

    def raise_(exc: BaseException) -> Any:
        def convert(obj: Any) -> Any:
            raise exc

        return convert

    with pytest.raises(TypeError) as raised:
        encode_message({1j}, raise_(own))
    assert raised.value is own
    with pytest.raises(RecursionError):
        encode_message(object(), raise_(RecursionError("deep")))
    with pytest.raises(Stop):
        encode_message(object(), raise_(Stop()))
    with pytest.raises(TypeError, match="default must be callable or None, not str"):
        encode_message({}, "str")  # type: ignore[arg-type]
    assert encode_message({"a": datetime.date(2024, 1, 1)}, None) == '{"a":"2024-01-01"}'


def test_hook_errors_leave_refcounts_unchanged() -> None:
    bad = {1}
    when = datetime.datetime(2024, 1, 1, tzinfo=BadOffset(LookupError("x")))
    payload = {"a": [bad, when]}
    before = (sys.getrefcount(bad), sys.getrefcount(when), sys.getrefcount(payload))

    def refuse(obj: Any) -> Any:
        raise KeyError(obj.__class__.__name__)

    for _ in range(500):
        with pytest.raises(TypeError):
            encode_message(payload, refuse)
        with pytest.raises(TypeError):
            encode_message({"w": when}, None)
    assert (sys.getrefcount(bad), sys.getrefcount(when), sys.getrefcount(payload)) == before


def test_the_new_types_keep_memory_flat() -> None:
    msg = {
        "at": datetime.datetime(2024, 1, 1, tzinfo=tz(hours=1)),
        "id": uuid.UUID(int=7),
        "price": decimal.Decimal("1.25"),
        "color": Color.PAIR,
        "p": Point(1, 2),
    }

    def run(n: int) -> None:
        for _ in range(n):
            dumps(msg)
            with contextlib.suppress(TypeError):
                encode_message({"x": [{1}]}, lambda obj: 1 / 0)

    run(1000)
    gc.collect()
    tracemalloc.start()
    try:
        start, _ = tracemalloc.get_traced_memory()
        run(10_000)
        gc.collect()
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert end - start < 64 * 1024


# -- the sends: ConnectionManager(json_default=...), default= per send


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


def as_cents(obj: Any) -> Any:
    if isinstance(obj, Money):
        return {"cents": obj.cents}
    raise TypeError(f"cannot send {type(obj).__name__}")


async def joined(m: ConnectionManager, lobby: str, user: str) -> FakePeer:
    peer = FakePeer()
    assert await m.connect(peer.ws, lobby, user) is True
    return peer


def test_sends_encode_the_new_types_natively() -> None:
    when = datetime.datetime(2024, 11, 28, 12, 30, tzinfo=UTC)

    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        alice = await joined(m, "L", "alice")
        assert await m.broadcast_to_lobby("L", {"at": when, "id": uuid.UUID(int=1)}) == 1
        assert await m.send_to_user("alice", [Color.RED, Point(1, 2), decimal.Decimal("2.50")])
        assert [f["text"] for f in alice.frames if f["type"] == "websocket.send"] == [
            '{"at":"2024-11-28T12:30:00+00:00","id":"00000000-0000-0000-0000-000000000001"}',
            '["red",{"x":1,"y":2},2.50]',
        ]

    asyncio.run(main())


def test_a_converter_per_send_and_manager_wide() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=None, json_default=as_cents)
        assert m.json_default is as_cents
        alice = await joined(m, "L", "alice")
        assert await m.broadcast_to_lobby("L", {"price": Money(250)}) == 1
        assert await m.send_to_user("alice", {"price": Money(1)})
        # per send overrides the manager's
        assert await m.broadcast_to_lobby("L", Money(5), default=lambda obj: obj.cents) == 1
        assert await m.send_to_user("alice", [Money(6)], default=lambda obj: str(obj.cents))
        assert alice.texts() == [{"price": {"cents": 250}}, {"price": {"cents": 1}}, 5, ["6"]]
        m.json_default = None
        with pytest.raises(TypeError, match="Object of type Money is not JSON serializable"):
            await m.broadcast_to_lobby("L", Money(1))
        assert await m.send_to_user("alice", Money(7), default=as_cents)
        assert alice.texts()[-1] == {"cents": 7}

    asyncio.run(main())


def test_a_converter_must_be_callable() -> None:
    with pytest.raises(TypeError, match="json_default must be callable or None, not int"):
        ConnectionManager(json_default=1)  # type: ignore[arg-type]
    m = ConnectionManager()
    assert m.json_default is None
    with pytest.raises(TypeError, match="json_default must be callable"):
        m.json_default = "str"  # type: ignore[assignment]

    async def main() -> None:
        await joined(m, "L", "alice")
        with pytest.raises(TypeError, match="default must be callable or None"):
            await m.broadcast_to_lobby("L", {}, default=5)  # type: ignore[arg-type]

    asyncio.run(main())


def test_a_converter_that_raises_fails_the_send_before_anything_is_sent() -> None:
    def broken(obj: Any) -> Any:
        raise ZeroDivisionError("division by zero")

    async def main() -> None:
        m = ConnectionManager(ping_interval=None, json_default=broken)
        peers = [await joined(m, "L", f"u{i}") for i in range(3)]
        # the bad object is last: a half-written broadcast would show here
        message = {"type": "chat", "text": "hi", "extra": [Money(1)]}
        with pytest.raises(
            TypeError, match=r"default\(\) raised ZeroDivisionError for an object of type Money"
        ):
            await m.broadcast_to_lobby("L", message)
        with pytest.raises(TypeError) as raised:
            await m.send_to_user("u0", message)
        assert isinstance(raised.value.__cause__, ZeroDivisionError)
        assert all(p.texts() == [] for p in peers)
        assert len(m) == 3  # the clients did nothing wrong
        assert await m.broadcast_to_lobby("L", message, default=as_cents) == 3

    asyncio.run(main())


def test_connection_send_takes_a_converter_too() -> None:
    done = asyncio.Event()

    async def handler(conn: Connection, data: dict[str, Any]) -> None:
        await conn.send({"echo": Money(data["cents"])}, default=as_cents)
        await conn.send({"manager": Money(2)})
        with pytest.raises(TypeError, match="KeyError"):
            await conn.send({"bad": Money(3)}, default=lambda obj: {"k": 1}[type(obj).__name__])
        await conn.send({"at": datetime.date(2024, 1, 2)})
        done.set()

    async def main() -> None:
        m = ConnectionManager(ping_interval=None, json_default=lambda obj: obj.cents)
        peer = FakePeer()
        task = asyncio.create_task(m.serve(peer.ws, "L", "alice", handler))
        peer.send_json({"cents": 1})
        await asyncio.wait_for(done.wait(), 5)
        peer.leave()
        await asyncio.wait_for(task, 5)
        assert peer.texts() == [{"echo": {"cents": 1}}, {"manager": 2}, {"at": "2024-01-02"}]

    asyncio.run(main())


def test_broadcast_of_a_datetime_over_a_real_testclient_socket() -> None:
    m = ConnectionManager(ping_interval=None, json_default=as_cents)
    app = FastAPI()
    when = datetime.datetime(2024, 11, 28, 12, 30, 5, 250_000, tzinfo=tz(hours=1))
    order = uuid.UUID("12345678-1234-5678-1234-567812345678")

    @app.websocket("/ws/{lobby}")
    async def ws(websocket: WebSocket, lobby: str, user: str) -> None:
        async def handle(lobby_code: str, user_id: str, data: dict[str, Any]) -> None:
            await m.broadcast_to_lobby(
                lobby_code, {"from": user_id, "at": when, "order": order, "total": Money(1999)}
            )

        await m.serve(websocket, lobby, user, handle)

    expected = (
        '{"from":"bob","at":"2024-11-28T12:30:05.250000+01:00",'
        '"order":"12345678-1234-5678-1234-567812345678","total":{"cents":1999}}'
    )
    with (
        TestClient(app) as client,
        client.websocket_connect("/ws/L?user=alice") as alice,
        client.websocket_connect("/ws/L?user=bob") as bob,
    ):
        bob.send_json({"type": "go"})
        assert alice.receive_text() == expected
        assert bob.receive_text() == expected
    assert json.loads(expected)["at"] == when.isoformat()


# ------------------------------------------- hooks of the new types that free what is encoded
#
# Each hook below runs Python code in the middle of an encode: it empties the
# container being walked (dropping the last reference to its other items),
# resizes a dict, and runs a GC pass. The encoder holds what it encodes and
# keeps no pointer into the container or its own buffer across the call.


def _hostile_values(box: Any) -> dict[str, Callable[[], Any]]:
    """name -> a factory of an object whose conversion hook wrecks ``box``
    (a list or a dict holding it, the only other reference to everything)."""

    def wreck() -> None:
        if isinstance(box, list):
            box.clear()
        else:
            box.clear()
            box.update({f"new{i}": [object()] for i in range(64)})  # a resize
        gc.collect()

    class Iso(datetime.datetime):
        def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
            wreck()
            return super().isoformat(sep, timespec)

    class Zone(datetime.tzinfo):
        def utcoffset(self, dt: Any) -> datetime.timedelta:
            wreck()
            return datetime.timedelta(hours=1)

        def dst(self, dt: Any) -> None:
            return None

        def tzname(self, dt: Any) -> None:
            return None

    class Id(uuid.UUID):
        def __str__(self) -> str:
            wreck()
            return super().__str__()

    class Price(decimal.Decimal):
        def __str__(self) -> str:
            wreck()
            return super().__str__()

    class Tone(enum.Enum):
        LOW = 1

        def __getattribute__(self, name: str) -> Any:
            if name == "_value_":
                wreck()
            return super().__getattribute__(name)

    class Model(pydantic.BaseModel):
        n: int = 1

        def model_dump(self, **kwargs: Any) -> Any:
            wreck()
            return super().model_dump(**kwargs)

    class Failing(pydantic.BaseModel):
        def model_dump(self, **kwargs: Any) -> Any:
            class Loud(RuntimeError):
                def __str__(self) -> str:  # run by encode_message's wrapping
                    wreck()
                    return "loud"

            raise Loud()

    return {
        "isoformat": lambda: Iso(2024, 1, 2, 3, 4, 5),
        "utcoffset_datetime": lambda: datetime.datetime(2024, 1, 2, 3, tzinfo=Zone()),
        "utcoffset_time": lambda: datetime.time(3, 4, tzinfo=Zone()),
        "uuid_str": lambda: Id(int=7),
        "decimal_str": lambda: Price("1.50"),
        "enum_value": lambda: Tone.LOW,
        "model_dump": lambda: Model(),
        "exception_str": lambda: Failing(),
    }


HOSTILE_NAMES = sorted(_hostile_values([]))


@pytest.mark.parametrize("wrap", [False, True], ids=["dumps", "encode_message"])
@pytest.mark.parametrize("container", ["list", "dict"])
@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_hook_of_a_new_type_that_empties_its_container(name: str, container: str, wrap: bool) -> None:
    box: Any = [] if container == "list" else {}
    make = _hostile_values(box)[name]
    items = [{"k": [object(), "x" * 5000]}, make(), {"big": list(range(2000))}, make(), object()]
    if isinstance(box, list):
        box.extend(items)
    else:
        box.update({f"k{i}": item for i, item in enumerate(items)})
    del items, make
    try:
        out = (
            encode_message(box, lambda o: "converted") if wrap else dumps(box, default=lambda o: "converted")
        )
    except (TypeError, RuntimeError) as exc:  # the failing model_dump
        assert name == "exception_str"
        assert wrap is (type(exc) is TypeError)
        assert "loud" in str(exc) or not wrap
    else:
        assert name != "exception_str"
        json.loads(out)


def test_a_default_that_frees_the_object_it_converts() -> None:
    """default() drops every other reference to the object it was given
    (and to the list it sat in): the encoder's own reference keeps it."""
    box: list[Any] = []

    class Gone:
        pass

    def convert(obj: Any) -> Any:
        box.clear()
        gc.collect()
        return {"was": type(obj).__name__, "more": [object()]}

    box.extend([Gone(), Gone(), {"k": [object()]}])
    assert json.loads(dumps(box, default=lambda o: convert(o) if isinstance(o, Gone) else None)) == [
        {"was": "Gone", "more": [None]}
    ]
    mapping: dict[str, Any] = {"a": Gone(), "b": Gone()}

    def convert_mapping(obj: Any) -> Any:
        mapping.clear()
        gc.collect()
        return "x"

    assert json.loads(dumps(mapping, default=convert_mapping)) == {"a": "x"}


def test_a_class_lookup_that_changes_the_class_of_the_object() -> None:
    """The encoder finds uuid.UUID, decimal.Decimal, ... in sys.modules the
    first time it needs them, which may run Python code (an object in
    sys.modules with a __getattr__): that code may give the object being
    encoded another class and free the old one. Its class is read again
    after each lookup (use after free before). A fresh interpreter: the
    classes are looked up once per process, with the debug allocator (freed
    memory is overwritten, so reading the freed class crashes)."""
    code = (
        "import gc, sys, weakref, decimal\n"
        "from wsmanager import dumps\n"
        "class Plain:\n"
        "    pass\n"
        "def make():\n"
        "    class Doomed:\n"
        "        pass\n"
        "    return Doomed()\n"
        "obj = make()\n"
        "dead = weakref.ref(type(obj))\n"
        "class Hostile:\n"
        "    def __getattr__(self, name):\n"
        "        obj.__class__ = Plain\n"
        "        gc.collect()\n"
        "        assert dead() is None, 'the old class is still alive'\n"
        "        raise AttributeError(name)\n"
        "saved = sys.modules.get('uuid')\n"
        "sys.modules['uuid'] = Hostile()\n"
        "try:\n"
        "    print(dumps([obj], default=lambda o: type(o).__name__))\n"
        "finally:\n"
        "    if saved is not None:\n"
        "        sys.modules['uuid'] = saved\n"
    )
    env = {**os.environ, "PYTHONMALLOC": "malloc_debug"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == '["Plain"]'
