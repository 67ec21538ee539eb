"""serve() and recovery (issue 12): the client's position in the URL's lobby
(``?wsm_since=<epoch>:<offset>``) and in ``lobby_join`` (``"since"``), the
position message on entering a lobby, and bad positions from clients."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.asgi_fakes import FakePeer
from tests.servers import uvicorn_server
from wsmanager import Connection, ConnectionManager


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


async def nothing(conn: Connection, data: dict[str, Any]) -> None:
    pass


def admit(conn: Connection, lobby: str) -> bool:
    return True


async def open_peer(
    m: ConnectionManager, query: bytes = b"", user: str = "alice", lobby: str = "home"
) -> tuple[FakePeer, asyncio.Task[None]]:
    peer = FakePeer(query_string=query)
    task = asyncio.create_task(m.serve(peer.ws, lobby, user, nothing, on_join=admit))
    await settle()
    return peer, task


async def close(peer: FakePeer, task: asyncio.Task[None]) -> None:
    peer.leave()
    await asyncio.wait_for(task, 1)


def kinds(peer: FakePeer) -> list[str]:
    return [str(t.get("type")) for t in peer.texts()]


def notes(peer: FakePeer) -> list[int]:
    return [t["n"] for t in peer.texts() if t.get("type") == "note"]


async def note(m: ConnectionManager, lobby: str, n: int, **kw: Any) -> None:
    await m.broadcast_to_lobby(lobby, {"type": "note", "n": n}, **kw)


def test_a_client_that_received_nothing_gets_the_5_sent_while_it_was_offline() -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=100)
        await note(m, "home", 0)
        peer, task = await open_peer(m)
        # nothing of the lobby yet, but its position, first
        [pos] = peer.texts()
        assert pos["type"] == "lobby_position" and pos["lobby"] == "home" and pos["offset"] == 1
        await close(peer, task)
        for n in range(1, 6):
            await note(m, "home", n)
        query = f"token=x&wsm_since={pos['epoch']}:{pos['offset']}".encode()
        again, task = await open_peer(m, query)
        await note(m, "home", 6)
        assert notes(again) == [1, 2, 3, 4, 5, 6]
        assert kinds(again) == ["note"] * 5 + ["recovery", "note"]
        rec = again.texts()[5]
        assert rec == {
            "type": "recovery",
            "lobby": "home",
            "recovered": True,
            "epoch": pos["epoch"],
            "offset": 6,
        }
        await close(again, task)

    asyncio.run(main())


BAD_PARAMS = [
    b"wsm_since=",
    b"wsm_since=abc",
    b"wsm_since=e:",
    b"wsm_since=e:-1",
    b"wsm_since=e:%2B1",
    b"wsm_since=e:1.5",
    b"wsm_since=e:NaN",
    b"wsm_since=e:1e3",
    b"wsm_since=e:9007199254740992",
    b"wsm_since=e:" + b"9" * 400,
    b"wsm_since=e:%D9%A1",  # an Arabic-Indic digit one: str.isdigit() says yes
    b"wsm_since=" + b"x" * 65 + b":1",
    b"wsm_since=%FF%FE:1",  # not UTF-8: Starlette decodes it with U+FFFD, a well-formed epoch
    b"wsm_since=e%00:1",  # well-formed: an epoch that matches nothing
]
WELL_FORMED = {b"wsm_since=%FF%FE:1", b"wsm_since=e%00:1"}


@pytest.mark.parametrize("query", BAD_PARAMS)
def test_a_bad_wsm_since_is_answered_with_recovered_false_and_the_connection_stays(
    query: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=10)
        await note(m, "home", 1)
        await note(m, "home", 2)
        caplog.set_level(logging.INFO, logger="wsmanager")
        peer, task = await open_peer(m, query)
        [rec] = peer.texts()
        assert rec["type"] == "recovery" and rec["recovered"] is False and rec["offset"] == 2
        assert peer.ws in m and peer.close_message is None
        await note(m, "home", 3)
        assert notes(peer) == [3]
        await close(peer, task)

    asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    if query not in WELL_FORMED:
        assert any(getattr(r, "reason", None) == "bad_since" for r in caplog.records)


def test_a_wsm_since_with_history_off_is_answered_not_recovered_and_no_position_otherwise() -> None:
    async def main() -> None:
        m = ConnectionManager()
        peer, task = await open_peer(m, b"wsm_since=abc:3")
        assert peer.texts() == [
            {"type": "recovery", "lobby": "home", "recovered": False, "epoch": "", "offset": 0}
        ]
        plain, task2 = await open_peer(m, b"", user="bob")
        await note(m, "home", 1)
        assert plain.texts() == [{"type": "note", "n": 1}]  # off: the bytes on the wire are unchanged
        await close(peer, task)
        await close(plain, task2)

    asyncio.run(main())


def test_lobby_join_with_since_replays_before_lobby_joined_and_without_sends_the_position() -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=100)
        peer, task = await open_peer(m)
        peer.send_json({"type": "lobby_join", "lobby": "R", "ref": 1})
        await settle()
        assert kinds(peer)[-2:] == ["lobby_position", "lobby_joined"]
        start = peer.texts()[-2]
        assert start["lobby"] == "R" and start["offset"] == 0
        peer.send_json({"type": "lobby_leave", "lobby": "R", "ref": 2})
        await settle()
        await note(m, "R", 1)
        await note(m, "R", 2, exclude_user_id="alice")
        await note(m, "R", 3)
        since = {"epoch": start["epoch"], "offset": start["offset"]}
        peer.send_json({"type": "lobby_join", "lobby": "R", "ref": 3, "since": since})
        await settle()
        await note(m, "R", 4)
        # what alice missed of R (not the one broadcast without her), the recovery, the answer, then live
        assert notes(peer) == [1, 3, 4]
        assert kinds(peer)[-5:] == ["note", "note", "recovery", "lobby_joined", "note"]
        assert [t for t in peer.texts() if t.get("type") == "recovery"] == [
            {"type": "recovery", "lobby": "R", "recovered": True, "epoch": start["epoch"], "offset": 3}
        ]
        await close(peer, task)

    asyncio.run(main())


@pytest.mark.parametrize(
    "since",
    [
        5,
        "e:1",
        [],
        ["e", 1],
        {"epoch": "e"},
        {"epoch": "e", "offset": 1, "more": 1},
        {"epoch": 1, "offset": 1},
        {"epoch": "e", "offset": -1},
        {"epoch": "e", "offset": 1.5},
        {"epoch": "e", "offset": 1.0},
        {"epoch": "e", "offset": True},
        {"epoch": "e", "offset": "1"},
        {"epoch": "e", "offset": 2**53},
        {"epoch": "e", "offset": 10**300},
        {"epoch": "x" * 65, "offset": 1},
    ],
)
def test_a_lobby_join_with_a_bad_since_is_a_bad_message_and_joins_nothing(since: Any) -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=10)
        peer, task = await open_peer(m)
        peer.send_json({"type": "lobby_join", "lobby": "R", "ref": 1, "since": since})
        await settle()
        last = peer.texts()[-1]
        assert last["type"] == "error" and last["error"] == "bad_message" and "since" in last["detail"]
        assert m.lobbies_of(peer.ws) == {"home"}
        await close(peer, task)

    asyncio.run(main())


def test_a_lobby_join_whose_epoch_is_a_lone_surrogate_is_not_recovered() -> None:
    async def main() -> None:
        m = ConnectionManager(history_size=10)
        peer, task = await open_peer(m)
        peer.to_app.put_nowait(
            {
                "type": "websocket.receive",
                "text": '{"type":"lobby_join","lobby":"R","since":{"epoch":"\\ud800","offset":0}}',
            }
        )
        await settle()
        assert kinds(peer)[-2:] == ["recovery", "lobby_joined"]
        assert peer.texts()[-2]["recovered"] is False
        await close(peer, task)

    asyncio.run(main())


# -- a real server ------------------------------------------------------------


def get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return dict(json.loads(r.read()))


@pytest.mark.slow
def test_over_real_sockets_recovery_after_a_dropped_connection_and_bad_bytes_in_the_url() -> None:
    async def main(port: int) -> None:
        url = f"ws://127.0.0.1:{port}/ws/home?token=alice"
        async with connect(url) as ws:
            pos = json.loads(await ws.recv())
            assert pos["type"] == "lobby_position"
            assert (await asyncio.to_thread(get, port, "/drop/alice?then=5"))["dropped"] is True
        async with connect(f"{url}&wsm_since={pos['epoch']}:{pos['offset']}") as ws:
            got = [json.loads(await ws.recv()) for _ in range(6)]
            assert [g.get("n") for g in got[:5]] == [1, 2, 3, 4, 5]
            assert got[5]["type"] == "recovery" and got[5]["recovered"] is True and got[5]["offset"] == 5
            await asyncio.to_thread(get, port, "/announce/home?n=1")
            live = json.loads(await ws.recv())
            assert live["n"] == 6 and live["_pos"]["offset"] == 6
        async with connect(f"{url}&wsm_since=%ff%c3:1") as ws:  # percent-escaped bytes that are not UTF-8
            rec = json.loads(await ws.recv())
            assert rec["type"] == "recovery" and rec["recovered"] is False

    with uvicorn_server("tests.history_app:app") as (port, _proc):
        asyncio.run(main(port))
