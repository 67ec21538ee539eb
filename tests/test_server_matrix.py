"""One conformance suite of the public behaviour, run against every ASGI server.

The same app (tests/serve_app.py: ``serve()`` on /ws, the seed's refusals
before ``accept()`` on /seed) runs under uvicorn with each of its WebSocket
protocols, hypercorn, granian and daphne (tests/servers.py starts each on a
free 127.0.0.1 port and stops it by its PID), and the same real clients check
admission and refusal codes, broadcast, direct messages, order, a member that
never reads, shutdown, and that every count returns to zero.

On uvicorn's websockets-sansio protocol a broadcast is written as one pre-built
frame per recipient (direct frames); everywhere else it goes through the ASGI
``send``: the checks are the same for both paths. Where a server behaves
differently, :data:`EXPECT` says so, for that server, and the tests assert
exactly that (README, "Servers").
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests import rawws
from tests.servers import asgi_server, http_stats

pytestmark = pytest.mark.slow

APP = "tests.serve_app:app"
#: The app's limits for the suite: a lobby of 3; a backlog of 16 messages or
#: 512 KiB, above what one "blast" below queues for a client that reads.
ENV = {
    "WSM_MAX_PER_LOBBY": "3",
    "WSM_MAX_BACKLOG": "16",
    "WSM_MAX_BACKLOG_BYTES": str(512 * 1024),
    "WSM_CLOSE_TIMEOUT": "1",
    "WSM_SHUTDOWN_TIMEOUT": "5",
}
ROUND = 10  # broadcasts of ~32 KB per round: 320 KB
BLAST = {"type": "blast", "n": ROUND, "size": 32_000}
MAX_ROUNDS = 40  # 12.8 MB: far beyond the kernel's socket buffers (4 MB send + the stuck client's 4 KB)


@dataclass(frozen=True)
class Expect:
    """What one server shows a client, where servers differ."""

    #: the close reason reaches the client (daphne sends the code alone)
    close_reasons: bool = True
    #: broadcasts go out as pre-built frames (uvicorn's websockets-sansio only)
    direct_frames: bool = False
    #: a send to a client that stopped reading eventually suspends, so the
    #: manager sees the backlog and closes the client with 4006 (daphne's send
    #: never suspends: Twisted buffers whatever a client does not read)
    backpressure: bool = True
    #: what an open client gets when the server is sent SIGTERM
    shutdown: tuple[int, str] = (1001, "server_shutdown")
    #: another outcome the server sometimes gives instead (see EXPECT's comments)
    shutdown_sometimes: tuple[int, str] | None = None
    #: every send suspends (granian completes it on its own threads), so a
    #: burst of more than ``max_backlog`` messages in one event-loop turn
    #: fills the backlog of every recipient, reading or not: 4006 for all
    burst_closes_readers: bool = False


#: Every server of the matrix, by its key in tests.servers.SERVER_COMMANDS.
EXPECT: dict[str, Expect] = {
    "uvicorn-websockets-sansio": Expect(direct_frames=True),
    "uvicorn-websockets": Expect(),  # deprecated by uvicorn 0.35+ (a warning at startup), still supported
    "uvicorn-wsproto": Expect(),
    # hypercorn runs the app in a worker process that no signal reaches (the
    # supervisor sets a multiprocessing Event): the lifespan's shutdown()
    # runs only after hypercorn's --graceful-timeout (3 s), once hypercorn
    # cancelled the endpoints, which it closes with 1011 and no reason
    "hypercorn": Expect(shutdown=(1011, "")),
    # granian writes frames from its own threads: on SIGTERM it sometimes ends
    # the TCP connection before the 1001 that shutdown() sent is written (seen
    # in about 1 of 20 runs, under load), so a client may see 1006 instead
    "granian": Expect(burst_closes_readers=True, shutdown_sometimes=(1006, "")),
    # daphne has no lifespan (manager.lifespan never runs) and drops the
    # connections on SIGTERM without a close frame (1006); close reasons are
    # not sent; its send never waits for a client
    "daphne": Expect(close_reasons=False, backpressure=False, shutdown=(1006, "")),
}
SERVERS = list(EXPECT)


@dataclass
class Running:
    name: str
    port: int
    expect: Expect

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def reason(self, reason: str) -> str:
        """The close reason a client of this server receives for ``reason``."""
        return reason if self.expect.close_reasons else ""


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[Running]:
    name: str = request.param
    with asgi_server(name, APP, env=ENV) as (port, _proc):
        yield Running(name, port, EXPECT[name])


async def recv_json(ws: ClientConnection, timeout: float = 10.0) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def refusal(url: str) -> tuple[str, int, str]:
    """How a handshake to ``url`` ends: ("http", status, "") when refused
    before the WebSocket opened, ("close", code, reason) when it opened and
    was closed."""
    try:
        ws = await connect(url)
    except InvalidStatus as exc:
        return ("http", exc.response.status_code, "")
    try:
        got = await asyncio.wait_for(ws.recv(), 10)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, exc
        return ("close", exc.rcvd.code, exc.rcvd.reason)
    raise AssertionError(f"{url} was admitted and got {got!r}")


async def wait_stats(port: int, check: Any, what: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        s = await http_stats(port)
        if check(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened: {s}")
        await asyncio.sleep(0.05)


async def back_to_zero(port: int) -> dict[str, Any]:
    """Wait until nothing is registered, pending or backlogged."""
    return await wait_stats(
        port,
        lambda s: (
            (s["total_connections"], s["pending_connections"], s["active_lobbies"]) == (0, 0, 0)
            and s["connected_users"] == 0
            and s["backlogged_connections"] == 0
        ),
        "counts back to zero",
    )


def test_admission_and_refusal_codes(server: Running) -> None:
    async def main() -> None:
        before = (await http_stats(server.port))["refused"]
        # serve() accepts, then closes: the client sees the code (and reason, where the server sends it)
        assert await refusal(server.url("/ws/gate")) == ("close", 4001, server.reason("unauthorized"))
        # the seed's endpoint closes before accept(): every server answers the handshake with HTTP 403
        assert await refusal(server.url("/seed/gate")) == ("http", 403, "")
        members = [await connect(server.url(f"/ws/gate?token=m{i}")) for i in range(3)]
        await wait_stats(server.port, lambda s: s["total_connections"] == 3, "3 admitted")
        assert await refusal(server.url("/ws/gate?token=late")) == (
            "close",
            4002,
            server.reason("lobby_full"),
        )
        assert await refusal(server.url("/seed/gate?token=late")) == ("http", 403, "")
        s = await http_stats(server.port)
        assert s["total_connections"] == 3
        assert s["refused"]["unauthorized"] - before["unauthorized"] == 1
        assert s["refused"]["lobby_full"] - before["lobby_full"] == 2
        for ws in members:
            await ws.close()
        await back_to_zero(server.port)

    asyncio.run(main())


def test_broadcast_direct_message_and_order(server: Running) -> None:
    async def main() -> None:
        a, b, c = [await connect(server.url(f"/ws/room?token={u}")) for u in "abc"]
        await wait_stats(server.port, lambda s: s["total_connections"] == 3, "3 admitted")
        await a.send(json.dumps({"type": "chat", "text": "héllo"}))
        for ws in (a, b, c):
            assert await recv_json(ws) == {"type": "chat", "from": "a", "text": "héllo"}
        # a direct message reaches its user only, in order with the broadcasts around it
        await a.send(json.dumps({"type": "dm", "to": "b", "text": "psst"}))
        await a.send(json.dumps({"type": "blast", "n": 12, "size": 10}))  # within max_backlog (16)
        assert await recv_json(b) == {"type": "dm", "from": "a", "text": "psst"}
        for ws in (a, b, c):
            assert [(await recv_json(ws))["i"] for _ in range(12)] == list(range(12))
        # the server answers the protocol's own ping
        await asyncio.wait_for(await c.ping(), 10)
        # which send path the broadcasts took: pre-built frames only on uvicorn's websockets-sansio
        direct = (await http_stats(server.port, "/debug"))["direct"]
        assert direct == (3 if server.expect.direct_frames else 0)
        for ws in (a, b, c):
            await ws.close()
        await back_to_zero(server.port)

    asyncio.run(main())


def test_a_member_that_never_reads_does_not_stall_the_others(server: Running) -> None:
    async def main() -> None:
        stuck = await rawws.handshake(server.port, "/ws/stuck?token=stuck", rcvbuf=4096)
        a = await connect(server.url("/ws/stuck?token=a"), max_size=None)
        b = await connect(server.url("/ws/stuck?token=b"), max_size=None)
        await wait_stats(server.port, lambda s: s["total_connections"] == 3, "3 admitted")
        closed = False
        for _ in range(MAX_ROUNDS):
            await a.send(json.dumps(BLAST))
            for ws in (
                a,
                b,
            ):  # the members that read get every broadcast, in order, whatever the stuck one does
                assert [(await recv_json(ws))["i"] for _ in range(ROUND)] == list(range(ROUND))
            s = await http_stats(server.port)
            if s["closed"].get("slow_consumer"):
                closed = True
                break
        assert closed is server.expect.backpressure, s
        assert s["total_connections"] == (2 if closed else 3)
        if closed:
            assert s["closed"]["slow_consumer"] == 1
        rawws.reset(stuck)
        await a.send(json.dumps({"type": "chat", "text": "still here"}))
        assert (await recv_json(b))["text"] == "still here"
        await a.close()
        await b.close()
        await back_to_zero(server.port)

    asyncio.run(main())


@pytest.mark.parametrize("name", SERVERS)
def test_sigterm_closes_open_connections(name: str) -> None:
    expect = EXPECT[name]

    async def main(port: int, proc: Any) -> None:
        clients = [await connect(f"ws://127.0.0.1:{port}/ws/end?token=u{i}") for i in range(3)]
        await wait_stats(port, lambda s: s["total_connections"] == 3, "3 admitted")
        proc.send_signal(signal.SIGTERM)
        for ws in clients:
            await asyncio.wait_for(ws.wait_closed(), 20)
            rcvd = ws.protocol.close_rcvd  # None: the TCP connection ended without a close frame
            got = (rcvd.code, rcvd.reason) if rcvd is not None else (1006, "")
            assert got in (expect.shutdown, expect.shutdown_sometimes), (name, got, ws.protocol.close_exc)

    with asgi_server(name, APP, env=ENV) as (port, proc):
        asyncio.run(main(port, proc))
        assert proc.wait(20) is not None


def test_a_burst_over_max_backlog_in_one_turn(server: Running) -> None:
    """50 broadcasts from one handler call, none of which waits: on a server
    whose sends complete at once the readers get all 50; on granian, whose
    every send suspends, the 17th queued message closes each of them as a
    slow consumer (size bursts under ``max_backlog`` there)."""

    async def main() -> None:
        a = await connect(server.url("/ws/burst?token=a"))
        b = await connect(server.url("/ws/burst?token=b"))
        await wait_stats(server.port, lambda s: s["total_connections"] == 2, "2 admitted")
        await a.send(json.dumps({"type": "blast", "n": 50, "size": 10}))
        if server.expect.burst_closes_readers:
            for ws in (a, b):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await recv_json(ws)
                assert closed.value.rcvd is not None
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4006, "slow_consumer")
            s = await back_to_zero(server.port)
            assert s["closed"]["slow_consumer"] >= 2
        else:
            for ws in (a, b):
                assert [(await recv_json(ws))["i"] for _ in range(50)] == list(range(50))
            await a.close()
            await b.close()
            await back_to_zero(server.port)

    asyncio.run(main())
