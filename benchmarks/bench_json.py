"""wsmanager.dumps against orjson and json.dumps on what chat and dashboard apps send.

    python benchmarks/bench_json.py            # a markdown table with ratios
    python benchmarks/bench_json.py --json     # the same numbers as JSON

Payloads: a plain chat message, a chat message with a tz-aware datetime and a
UUID, a dashboard tile as a dataclass (nested dataclass, datetimes, Enum,
floats), a pydantic v2 model (an order with items), and an order whose prices
are Decimals. Each encoder gets what it needs to produce the same JSON:

* wsmanager.dumps(obj): everything natively (pydantic through
  model_dump(mode="json"), Decimal as an exact number);
* orjson.dumps(obj, default=...).decode(): datetime, UUID, Enum and
  dataclasses natively; pydantic models through model_dump(mode="json") and
  Decimals as orjson.Fragment(str(d)) in ``default`` (orjson has neither);
  .decode() because a WebSocket text frame is sent from a str;
* json.dumps(obj, default=..., separators=(",", ":"), ensure_ascii=False):
  every non-JSON type in ``default`` (Decimal as str: json.dumps cannot write
  a raw number, so its text differs there).

wsmanager's and orjson's texts are checked equal before timing. Every number is
the best of ``--repeat`` runs of N calls (a run lasts about ``--target-ms``),
the encoders alternating so that all see the same machine load; the garbage
collector is off while timing (as ``timeit`` does).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import decimal
import enum
import gc
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import orjson  # noqa: E402
import pydantic  # noqa: E402

from wsmanager import dumps  # noqa: E402

UTC = datetime.timezone.utc
NOW = datetime.datetime(2024, 11, 28, 12, 30, 5, 123456, tzinfo=UTC)


class Status(enum.Enum):
    OK = "ok"
    WARN = "warn"


@dataclasses.dataclass
class Point:
    at: datetime.datetime
    value: float


@dataclasses.dataclass
class Tile:
    id: uuid.UUID
    title: str
    status: Status
    updated: datetime.datetime
    series: list[Point]
    unit: str = "req/s"


class Item(pydantic.BaseModel):
    sku: str
    quantity: int
    price: decimal.Decimal


class Order(pydantic.BaseModel):
    id: uuid.UUID
    customer: str
    created: datetime.datetime
    items: list[Item]
    note: str | None = None


def payloads() -> dict[str, Any]:
    uid = uuid.UUID("5f0c6a8e-3d1b-4f7e-9a2c-8b1d2e3f4a5b")
    return {
        "plain chat": {
            "type": "chat",
            "user_id": "alice",
            "text": "anyone up for a game?",
            "timestamp": 1732797005.123,
            "seq": 1042,
        },
        "chat + datetime + UUID": {
            "type": "chat",
            "id": uid,
            "user_id": "alice",
            "text": "anyone up for a game?",
            "sent_at": NOW,
            "edited_at": None,
        },
        "dashboard dataclass": Tile(
            id=uid,
            title="API throughput",
            status=Status.OK,
            updated=NOW,
            series=[Point(NOW - datetime.timedelta(minutes=i), 1000.0 + i * 12.5) for i in range(10)],
        ),
        "pydantic model": Order(
            id=uid,
            customer="alice",
            created=NOW,
            items=[Item(sku=f"SKU-{i}", quantity=i + 1, price=decimal.Decimal(f"{i}9.90")) for i in range(5)],
        ),
        "Decimal prices": {
            "type": "order_update",
            "order": "A-1042",
            "prices": [decimal.Decimal(f"{i}.{i:02d}") for i in range(1, 11)],
            "total": decimal.Decimal("495.45"),
        },
    }


def orjson_default(obj: Any) -> Any:
    if isinstance(obj, pydantic.BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, decimal.Decimal):
        return orjson.Fragment(str(obj))
    raise TypeError(type(obj).__name__)


def json_default(obj: Any) -> Any:
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (uuid.UUID, decimal.Decimal)):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, pydantic.BaseModel):
        return obj.model_dump(mode="json")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(type(obj).__name__)


def encoders() -> dict[str, Callable[[Any], str]]:
    or_dumps, std_dumps = orjson.dumps, json.dumps

    def with_orjson(obj: Any) -> str:
        return or_dumps(obj, default=orjson_default).decode()

    def with_json(obj: Any) -> str:
        return std_dumps(obj, default=json_default, separators=(",", ":"), ensure_ascii=False)

    return {"json.dumps": with_json, "orjson": with_orjson, "wsmanager": dumps}


def best_ns(fns: list[Callable[[Any], str]], obj: Any, repeat: int, target_ms: float) -> list[float]:
    """Best ns per call of each fn on obj, the runs alternating."""
    sizes = []
    for fn in fns:
        n = 1
        while True:
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fn(obj)
            elapsed = time.perf_counter_ns() - t0
            if elapsed > target_ms * 1e5 or n >= 10**6:
                break
            n *= 10
        sizes.append(max(3, min(10**6, int(target_ms * 1e6 / max(elapsed / n, 1.0)))))
    best = [float("inf")] * len(fns)
    gc.disable()
    try:
        for _ in range(repeat):
            for i, (fn, n) in enumerate(zip(fns, sizes, strict=True)):
                t0 = time.perf_counter_ns()
                for _ in range(n):
                    fn(obj)
                best[i] = min(best[i], (time.perf_counter_ns() - t0) / n)
    finally:
        gc.enable()
    return best


@dataclasses.dataclass
class Row:
    payload: str
    bytes: int
    json_ns: float
    orjson_ns: float
    wsmanager_ns: float

    @property
    def vs_json(self) -> float:
        return self.json_ns / self.wsmanager_ns

    @property
    def vs_orjson(self) -> float:
        return self.orjson_ns / self.wsmanager_ns


def fmt_ns(ns: float) -> str:
    return f"{ns / 1000:,.2f} µs" if ns >= 10_000 else f"{ns:,.0f} ns"


def fmt_ratio(r: float) -> str:
    return f"{r:.1f}x faster" if r >= 1 else f"{1 / r:.1f}x slower"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--target-ms", type=float, default=40.0)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()

    enc = encoders()
    rows: list[Row] = []
    for name, obj in payloads().items():
        text = dumps(obj)
        if enc["orjson"](obj) != text:
            raise AssertionError(f"{name}: orjson wrote {enc['orjson'](obj)!r}, wsmanager {text!r}")
        std_ns, or_ns, w_ns = best_ns(list(enc.values()), obj, args.repeat, args.target_ms)
        rows.append(Row(name, len(text.encode()), std_ns, or_ns, w_ns))
    if args.json:
        doc = {
            "python": platform.python_version(),
            "orjson": orjson.__version__,
            "rows": [{**dataclasses.asdict(r), "vs_json": r.vs_json, "vs_orjson": r.vs_orjson} for r in rows],
        }
        print(json.dumps(doc))
        return
    print(
        f"JSON encoding, Python {platform.python_version()}, orjson {orjson.__version__}, "
        f"pydantic {pydantic.VERSION}; best of {args.repeat} runs\n"
    )
    print("| payload | bytes | json.dumps | orjson .decode() | wsmanager.dumps | vs json.dumps | vs orjson |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.payload} | {r.bytes} | {fmt_ns(r.json_ns)} | {fmt_ns(r.orjson_ns)} | "
            f"{fmt_ns(r.wsmanager_ns)} | {fmt_ratio(r.vs_json)} | {fmt_ratio(r.vs_orjson)} |"
        )


if __name__ == "__main__":
    main()
