"""get_stats() is typed: its keys are wsmanager.Stats's, and a typo is a mypy error."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, get_type_hints

from mypy import api as mypy_api

import wsmanager
from tests.asgi_fakes import FakePeer
from tests.redis_server import redis_server
from wsmanager import ConnectionManager, Stats
from wsmanager.backends.redis import RedisBackend

ROOT = Path(__file__).resolve().parent.parent
TYPING = ROOT / "tests" / "typing_check"


def typed_keys(cls: Any) -> dict[str, Any]:
    """The keys a TypedDict declares, nested TypedDicts as dicts of their keys."""
    shape: dict[str, Any] = {}
    for key, hint in get_type_hints(cls).items():
        shape[key] = typed_keys(hint) if hasattr(hint, "__required_keys__") else None
    return shape


def actual_keys(value: dict[str, Any], shape: dict[str, Any]) -> dict[str, Any]:
    return {k: actual_keys(v, shape[k]) if isinstance(shape.get(k), dict) else None for k, v in value.items()}


def test_every_key_of_get_stats_is_declared_and_every_required_key_is_there() -> None:
    shape = typed_keys(Stats)
    m = ConnectionManager()
    got = actual_keys(dict(m.get_stats()), shape)
    # in memory: the clustered keys are absent, every other declared key present
    assert set(Stats.__optional_keys__) == {"local", "backplane"}
    expected = {k: v for k, v in shape.items() if k in Stats.__required_keys__}
    assert got == expected


def test_the_clustered_keys_are_declared_too() -> None:
    shape = typed_keys(Stats)

    async def main() -> dict[str, Any]:
        with redis_server() as redis:
            m = ConnectionManager(backend=RedisBackend(redis.url, namespace="stats", connect_timeout=5.0))
            await m.start()
            try:
                peer = FakePeer()
                assert await m.connect(peer.ws, "lobby", "ann")
                stats = m.get_stats()
                local = m.get_stats(local=True)
                assert "backplane" not in local and "local" not in local
                assert stats.get("local", {}).get("total_connections") == 1
                return dict(stats)
            finally:
                await m.stop()

    got = actual_keys(asyncio.run(main()), shape)
    assert got == shape


def test_the_stats_types_are_public() -> None:
    for name in ("Stats", "CoreStats", "ClusterStats", "RefusedStats", "LatencyStats", "StaleClosedStats"):
        assert name in wsmanager.__all__
    assert get_type_hints(ConnectionManager.get_stats)["return"] is Stats


def run_mypy(path: Path) -> tuple[str, int]:
    out, err, status = mypy_api.run(
        ["--config-file", str(ROOT / "pyproject.toml"), "--no-error-summary", "--show-error-codes", str(path)]
    )
    return out + err, status


def test_a_misspelt_key_or_a_wrong_type_is_a_mypy_error() -> None:
    path = TYPING / "stats_typos.py"
    marked = {n for n, line in enumerate(path.read_text().splitlines(), start=1) if line.endswith("# error")}
    assert len(marked) == 6
    out, status = run_mypy(path)
    assert status == 1, out
    reported = {int(m.group(1)) for m in re.finditer(r"stats_typos\.py:(\d+): error", out)}
    assert reported == marked, out
    assert "total_conections" in out and "server_ful" in out


def test_reading_stats_as_documented_type_checks() -> None:
    out, status = run_mypy(TYPING / "stats_ok.py")
    assert status == 0, out
