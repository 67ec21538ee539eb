"""Problems an attacker / new user found in what was merged for issue 9.

Each test asserts what the issue or the README promises and fails on the
merged code; none is skipped. One test per problem.
"""

from __future__ import annotations

import asyncio
import json
import math
from decimal import Decimal
from typing import Any

import pytest

from tests.asgi_fakes import FakePeer
from wsmanager import Connection, ConnectionManager, dumps
from wsmanager.backends.redis import RedisBackend

# --------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_connections", 10**400),
        ("max_per_lobby", 2**63),
        ("max_per_user", 2**70),
        ("max_id_bytes", 2**64),
        ("rate_limit_close_after", 10**30),
    ],
    ids=["max_connections", "max_per_lobby", "max_per_user", "max_id_bytes", "rate_limit_close_after"],
)
def test_a_count_beyond_the_c_range_raises_value_error_naming_the_setting(name: str, value: int) -> None:
    # README: "an out-of-range value ... raises ValueError / TypeError whose
    # message starts with the setting's name, and the old value stays".
    # Merged: OverflowError "Python int too large to convert to C ssize_t".
    with pytest.raises(ValueError, match=f"^{name}"):
        kwargs: dict[str, Any] = {name: value}
        ConnectionManager(**kwargs)
    m = ConnectionManager()
    old = getattr(m, name)
    with pytest.raises(ValueError, match=f"^{name}"):
        setattr(m, name, value)
    assert getattr(m, name) == old


def test_a_redis_lease_whose_milliseconds_overflow_raises_value_error_naming_lease() -> None:
    # 1e308 s is finite, so seconds() passes it; int(lease * 1000) then raises
    # OverflowError "cannot convert float infinity to integer".
    with pytest.raises(ValueError, match=r"^lease"):
        RedisBackend(lease=1e308)


def test_a_subclass_attribute_does_not_switch_off_the_setting_checks() -> None:
    # A subclass that sets a default as a class attribute (the usual Python
    # way to configure a class) shadows the Setting descriptor: assignments on
    # its instances are then stored unchecked, and NaN turns the size limit
    # off again (the max_message_bytes=nan case).
    class MyManager(ConnectionManager):
        max_message_bytes = 1024

    m = MyManager(ping_interval=None)
    with pytest.raises(TypeError, match=r"^max_message_bytes"):
        m.max_message_bytes = float("nan")  # type: ignore[assignment]


def test_shutdown_refuses_a_nan_timeout() -> None:
    # shutdown(timeout=nan) is taken silently and behaves as timeout=0 (every
    # client gets only ~10 ms for its close); NaN is rejected everywhere else.
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        with pytest.raises(ValueError, match="timeout"):
            await m.shutdown(timeout=float("nan"))

    asyncio.run(main())


def test_ping_user_with_a_nan_timeout_does_not_wait_forever() -> None:
    # ping_user(u, timeout=nan) never returns (asyncio never fires a NaN
    # timer). It must refuse the value (ValueError naming timeout).
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        peer = FakePeer()
        assert await m.connect(peer.ws, "L", "u")
        with pytest.raises(ValueError, match="timeout"):
            # the outer wait_for only keeps the test from hanging
            await asyncio.wait_for(m.ping_user("u", timeout=float("nan")), 5)
        m.disconnect(peer.ws)

    asyncio.run(main())


# ------------------------------------------------------------------ serve()


def test_lowering_max_message_bytes_at_run_time_applies_to_open_serve_connections() -> None:
    # README: "manager.max_message_bytes = 1 << 20 applies at once". serve()
    # reads the limit once, when the connection starts: an open connection
    # keeps the old limit and a 500-byte message still reaches the handler.
    async def main() -> None:
        m = ConnectionManager(ping_interval=None)
        peer = FakePeer()
        got: list[Any] = []

        async def handler(conn: Connection, data: dict[str, Any]) -> None:
            got.append(data)

        task = asyncio.create_task(m.serve(peer.ws, "L", "u", handler))
        for _ in range(20):
            await asyncio.sleep(0)
        assert peer.ws in m
        m.max_message_bytes = 100
        peer.send_text(json.dumps({"t": "x" * 500}))
        peer.leave()
        await asyncio.wait_for(task, 5)
        assert got == []
        assert peer.close_message is not None
        assert (peer.close_message["code"], peer.close_message["reason"]) == (1009, "message_too_big")

    asyncio.run(main())


# --------------------------------------------------------------------- JSON


def test_a_decimal_beyond_the_double_range_is_not_sent_as_infinity() -> None:
    # README: Decimal NaN and Infinity raise ValueError "as floats do"
    # (browsers cannot parse them). Decimal("1E+400") is written as the number
    # 1E+400, which JSON.parse and json.loads read as Infinity: the client gets
    # the value the encoder promises never to send. Either refuse it or send
    # something a client reads as finite.
    try:
        text = dumps({"price": Decimal("1E+400")})
    except ValueError:
        return
    assert math.isfinite(json.loads(text)["price"]), text
