"""wsmanager.dumps: the compact JSON encoder of the C core.

The reference is json.dumps(x, ensure_ascii=False, separators=(",", ":"),
allow_nan=False): same text for everything it can encode, except lone
surrogates, which dumps escapes so that its output is always valid UTF-8.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import enum
import gc
import json
import math
import random
import sys
import tracemalloc
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsmanager import dumps


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
