"""serve()'s lobby requests: lobby_join / lobby_leave, the on_join hook, their bad input."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from tests.asgi_fakes import FakePeer
from wsmanager import Connection, ConnectionManager
from wsmanager.joining import DEFAULT_MAX_LOBBIES_PER_CONNECTION


async def settle() -> None:
    for _ in range(30):
        await asyncio.sleep(0)


class App:
    """serve() with a recording handler and (optionally) an on_join hook."""

    def __init__(self, m: ConnectionManager, on_join: Any = None, **serve_kw: Any) -> None:
        self.m = m
        self.on_join = on_join
        self.serve_kw = serve_kw
        self.handled: list[dict[str, Any]] = []
        self.asked: list[tuple[str, str]] = []

    async def handler(self, lobby: str, user: str, data: dict[str, Any]) -> None:
        self.handled.append(data)

    async def open(self, user: str = "alice", lobby: str = "home") -> tuple[FakePeer, asyncio.Task[None]]:
        peer = FakePeer()
        kw = dict(self.serve_kw)
        if self.on_join is not None:
            kw["on_join"] = self.on_join
        task = asyncio.create_task(self.m.serve(peer.ws, lobby, user, self.handler, **kw))
        await settle()
        return peer, task


def answers(peer: FakePeer) -> list[dict[str, Any]]:
    return [t for t in peer.texts() if str(t.get("type", "")).startswith(("lobby_", "error"))]


async def close(peer: FakePeer, task: asyncio.Task[None]) -> None:
    peer.leave()
    await asyncio.wait_for(task, 1)


def open_only(conn: Connection, lobby: str) -> bool | str:
    if lobby.startswith("open-"):
        return True
    if lobby.startswith("vip-"):
        return "vip_only"
    return False


def test_without_on_join_client_joins_and_leaves_are_refused() -> None:
    async def main() -> None:
        m = ConnectionManager()
        app = App(m)
        peer, task = await app.open()
        peer.send_json({"type": "lobby_join", "lobby": "open-1", "ref": 1})
        peer.send_json({"type": "lobby_leave", "lobby": "home", "ref": 2})
        await settle()
        assert answers(peer) == [
            {"type": "lobby_join_refused", "lobby": "open-1", "reason": "forbidden", "ref": 1},
            {"type": "lobby_leave_refused", "lobby": "home", "reason": "forbidden", "ref": 2},
        ]
        assert m.lobbies_of(peer.ws) == {"home"}
        assert app.handled == []  # the library's messages never reach the handler
        await close(peer, task)

    asyncio.run(main())


def test_a_join_sent_during_the_handshake_is_answered_once_registered() -> None:
    async def main() -> None:
        m = ConnectionManager()
        peer = FakePeer(accept_yields=5)
        peer.send_json({"type": "lobby_join", "lobby": "open-early", "ref": 1})  # before accept()
        seen: list[bool] = []

        def hook(conn: Connection, lobby: str) -> bool:
            seen.append(conn.websocket in m)
            return True

        task = asyncio.create_task(m.serve(peer.ws, "home", "alice", App(m).handler, on_join=hook))
        await settle()
        assert seen == [True]
        assert answers(peer) == [{"type": "lobby_joined", "lobby": "open-early", "ref": 1}]
        assert m.lobbies_of(peer.ws) == {"home", "open-early"}
        await close(peer, task)

    asyncio.run(main())


def test_on_join_decides_and_a_joined_lobby_gets_its_broadcasts() -> None:
    async def main() -> None:
        m = ConnectionManager()
        app = App(m, on_join=open_only)
        peer, task = await app.open()
        peer.send_json({"type": "lobby_join", "lobby": "open-1", "ref": "a"})
        peer.send_json({"type": "lobby_join", "lobby": "vip-1", "ref": "b"})
        peer.send_json({"type": "lobby_join", "lobby": "other"})  # no ref: none in the answer
        await settle()
        assert answers(peer) == [
            {"type": "lobby_joined", "lobby": "open-1", "ref": "a"},
            {"type": "lobby_join_refused", "lobby": "vip-1", "reason": "vip_only", "ref": "b"},
            {"type": "lobby_join_refused", "lobby": "other", "reason": "forbidden"},
        ]
        assert m.lobbies_of(peer.ws) == {"home", "open-1"}
        assert await m.broadcast_to_lobby("open-1", {"type": "news"}) == 1
        assert await m.broadcast_to_lobby("vip-1", {"type": "news"}) == 0
        assert peer.texts()[-1] == {"type": "news"}
        await close(peer, task)
        assert m.get_lobby_users("open-1") == set()

    asyncio.run(main())


def test_an_async_hook_sees_the_connection_and_only_true_admits() -> None:
    async def main() -> None:
        m = ConnectionManager()
        seen: list[tuple[str, str, set[str]]] = []
        verdicts: dict[str, Any] = {
            "yes": True,
            "no": False,
            "none": None,
            "one": 1,
            "empty": "",
            "why": "because",
        }

        async def hook(conn: Connection, lobby: str) -> Any:
            await asyncio.sleep(0)
            seen.append((conn.user_id, conn.lobby_code, conn.lobbies))
            return verdicts[lobby]

        app = App(m, on_join=hook)
        peer, task = await app.open()
        for lobby in verdicts:
            peer.send_json({"type": "lobby_join", "lobby": lobby})
        await settle()
        got = {a["lobby"]: a.get("reason", "joined") for a in answers(peer)}
        assert got == {
            "yes": "joined",
            "no": "forbidden",
            "none": "forbidden",
            "one": "forbidden",
            "empty": "forbidden",
            "why": "because",
        }
        assert seen[0] == ("alice", "home", {"home"})
        assert seen[1] == ("alice", "home", {"home", "yes"})
        await close(peer, task)

    asyncio.run(main())


def test_joining_a_lobby_again_needs_no_hook_and_leave_answers_was_member() -> None:
    async def main() -> None:
        m = ConnectionManager()
        asked: list[str] = []

        def hook(conn: Connection, lobby: str) -> bool:
            asked.append(lobby)
            return True

        app = App(m, on_join=hook)
        peer, task = await app.open()
        for msg in [
            {"type": "lobby_join", "lobby": "home", "ref": 1},  # its first lobby
            {"type": "lobby_join", "lobby": "x", "ref": 2},
            {"type": "lobby_join", "lobby": "x", "ref": 3},
            {"type": "lobby_leave", "lobby": "x", "ref": 4},
            {"type": "lobby_leave", "lobby": "x", "ref": 5},
            {"type": "lobby_leave", "lobby": "", "ref": 6},
        ]:
            peer.send_json(msg)
        await settle()
        assert asked == ["x"]
        assert answers(peer) == [
            {"type": "lobby_joined", "lobby": "home", "ref": 1},
            {"type": "lobby_joined", "lobby": "x", "ref": 2},
            {"type": "lobby_joined", "lobby": "x", "ref": 3},
            {"type": "lobby_left", "lobby": "x", "was_member": True, "ref": 4},
            {"type": "lobby_left", "lobby": "x", "was_member": False, "ref": 5},
            {"type": "lobby_left", "lobby": "", "was_member": False, "ref": 6},
        ]
        await close(peer, task)

    asyncio.run(main())


def test_leaving_the_first_lobby_keeps_the_connection_and_its_user() -> None:
    async def main() -> None:
        m = ConnectionManager()
        app = App(m, on_join=open_only)
        peer, task = await app.open()
        peer.send_json({"type": "lobby_leave", "lobby": "home", "ref": 1})
        await settle()
        assert answers(peer) == [{"type": "lobby_left", "lobby": "home", "was_member": True, "ref": 1}]
        assert m.lobbies_of(peer.ws) == set()
        assert m.get_lobby_users("home") == set()
        assert m.is_user_connected("alice")
        assert await m.send_to_user("alice", {"type": "dm"})
        peer.send_json({"type": "chat"})
        await settle()
        assert app.handled == [{"type": "chat"}]
        await close(peer, task)
        assert len(m) == 0

    asyncio.run(main())


def test_memberships_per_connection_are_capped() -> None:
    async def main() -> None:
        m = ConnectionManager()
        app = App(m, on_join=open_only, max_lobbies_per_connection=3)
        peer, task = await app.open()
        for i in range(5):
            peer.send_json({"type": "lobby_join", "lobby": f"open-{i}", "ref": i})
        await settle()
        got = [(a["lobby"], a["type"], a.get("reason")) for a in answers(peer)]
        assert got == [
            ("open-0", "lobby_joined", None),
            ("open-1", "lobby_joined", None),
            ("open-2", "lobby_join_refused", "too_many_lobbies"),  # home + 2 = 3
            ("open-3", "lobby_join_refused", "too_many_lobbies"),
            ("open-4", "lobby_join_refused", "too_many_lobbies"),
        ]
        peer.send_json({"type": "lobby_leave", "lobby": "open-0"})
        peer.send_json({"type": "lobby_join", "lobby": "open-4"})
        await settle()
        assert answers(peer)[-1] == {"type": "lobby_joined", "lobby": "open-4"}
        assert m.lobbies_of(peer.ws) == {"home", "open-1", "open-4"}
        await close(peer, task)

    asyncio.run(main())


def test_a_flood_of_joins_ends_at_the_default_cap_without_an_error_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        m = ConnectionManager()
        app = App(m, on_join=lambda conn, lobby: True)
        peer, task = await app.open()
        for i in range(500):
            peer.send_json({"type": "lobby_join", "lobby": f"l{i}", "ref": i})
        await asyncio.sleep(0.05)
        await settle()
        got = answers(peer)
        assert len(got) == 500
        assert sum(a["type"] == "lobby_joined" for a in got) == DEFAULT_MAX_LOBBIES_PER_CONNECTION - 1
        assert len(m.lobbies_of(peer.ws)) == DEFAULT_MAX_LOBBIES_PER_CONNECTION
        assert peer.close_code is None
        await close(peer, task)

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_empty_or_oversized_lobbies_are_refused_before_the_hook() -> None:
    async def main() -> None:
        m = ConnectionManager(max_id_bytes=8)
        asked: list[str] = []

        def hook(conn: Connection, lobby: str) -> bool:
            asked.append(lobby)
            return True

        app = App(m, on_join=hook)
        peer, task = await app.open()
        for lobby in ["", "123456789", "ééééé", "12345678", "\ud800"]:
            peer.send_json({"type": "lobby_join", "lobby": lobby})
        await settle()
        got = [(a["lobby"], a.get("reason", "joined")) for a in answers(peer)]
        assert got == [
            ("", "invalid_lobby"),
            ("123456789", "invalid_lobby"),
            ("ééééé", "invalid_lobby"),  # 10 bytes in UTF-8
            ("12345678", "joined"),
            ("\ud800", "invalid_lobby"),  # JSON text can carry a lone surrogate: not UTF-8
        ]
        assert asked == ["12345678"]
        await close(peer, task)

    asyncio.run(main())


@pytest.mark.parametrize(
    "request_",
    [
        {"type": "lobby_join"},
        {"type": "lobby_join", "lobby": None},
        {"type": "lobby_join", "lobby": 7},
        {"type": "lobby_join", "lobby": ["a"]},
        {"type": "lobby_leave", "lobby": {"a": 1}},
        {"type": "lobby_join", "lobby": "a", "ref": 1.5},
        {"type": "lobby_join", "lobby": "a", "ref": True},
        {"type": "lobby_join", "lobby": "a", "ref": 2**53},
        {"type": "lobby_join", "lobby": "a", "ref": "r" * 129},
        {"type": "lobby_leave", "lobby": "a", "ref": {"x": 1}},
    ],
)
def test_malformed_requests_get_bad_message_and_count_toward_the_close(
    request_: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        m = ConnectionManager(max_bad_messages=3)
        app = App(m, on_join=open_only)
        peer, task = await app.open()
        for _ in range(2):
            peer.send_json(request_)
        await settle()
        errors = answers(peer)
        assert [e["error"] for e in errors] == ["bad_message", "bad_message"]
        assert errors[0]["detail"]
        assert m.lobbies_of(peer.ws) == {"home"}
        peer.send_json(request_)
        await asyncio.wait_for(task, 1)
        assert (peer.close_code, peer.close_reason) == (4007, "bad_message")

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_the_largest_accepted_refs_come_back_exactly() -> None:
    async def main() -> None:
        m = ConnectionManager()
        app = App(m, on_join=open_only)
        peer, task = await app.open()
        for ref in [2**53 - 1, -(2**53 - 1), "r" * 128, "\u00e9\ud83d\ude00", None]:
            peer.send_json({"type": "lobby_join", "lobby": "open-1", "ref": ref})
        await settle()
        assert [a.get("ref") for a in answers(peer)] == [
            2**53 - 1,
            -(2**53 - 1),
            "r" * 128,
            "\u00e9\U0001f600",
            None,
        ]
        await close(peer, task)

    asyncio.run(main())


def test_a_full_lobby_refuses_the_join_with_lobby_full() -> None:
    async def main() -> None:
        m = ConnectionManager(max_per_lobby=1)
        app = App(m, on_join=open_only)
        bob, bob_task = await app.open("bob", "open-1")
        peer, task = await app.open()
        peer.send_json({"type": "lobby_join", "lobby": "open-1", "ref": 1})
        await settle()
        assert answers(peer) == [
            {"type": "lobby_join_refused", "lobby": "open-1", "reason": "lobby_full", "ref": 1}
        ]
        assert m.get_lobby_users("open-1") == {"bob"}
        await close(bob, bob_task)
        peer.send_json({"type": "lobby_join", "lobby": "open-1", "ref": 2})
        await settle()
        assert answers(peer)[-1] == {"type": "lobby_joined", "lobby": "open-1", "ref": 2}
        await close(peer, task)

    asyncio.run(main())


def test_a_failing_hook_refuses_with_internal_error_logs_it_and_keeps_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        m = ConnectionManager()

        def hook(conn: Connection, lobby: str) -> bool:
            raise RuntimeError("permission service down")

        app = App(m, on_join=hook)
        peer, task = await app.open()
        peer.send_json({"type": "lobby_join", "lobby": "x", "ref": 1})
        peer.send_json({"type": "chat"})
        await settle()
        assert answers(peer) == [
            {"type": "lobby_join_refused", "lobby": "x", "reason": "internal_error", "ref": 1}
        ]
        assert app.handled == [{"type": "chat"}]
        assert peer.close_code is None
        await close(peer, task)

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failures] == ["on_join hook failed; the join is refused"]
    assert failures[0].exc_info is not None


def test_a_connection_removed_while_the_hook_runs_joins_nothing() -> None:
    async def main() -> None:
        m = ConnectionManager()
        gate = asyncio.Event()
        entered = asyncio.Event()

        async def hook(conn: Connection, lobby: str) -> bool:
            entered.set()
            await gate.wait()
            return True

        app = App(m, on_join=hook)
        peer, task = await app.open()
        peer.send_json({"type": "lobby_join", "lobby": "x", "ref": 1})
        await entered.wait()
        await m.close_connection(peer.ws, "stale")
        gate.set()
        await asyncio.wait_for(task, 1)
        assert answers(peer) == []
        assert m.get_lobby_users("x") == set() and len(m) == 0

    asyncio.run(main())


def test_the_apps_own_join_is_not_subject_to_the_hook() -> None:
    async def main() -> None:
        m = ConnectionManager()
        asked: list[str] = []

        def hook(conn: Connection, lobby: str) -> bool:
            asked.append(lobby)
            return False

        async def on_connect(conn: Connection) -> None:
            assert await m.join(conn.websocket, "announcements")

        peer = FakePeer()
        task = asyncio.create_task(
            m.serve(peer.ws, "home", "alice", App(m).handler, on_connect=on_connect, on_join=hook)
        )
        await settle()
        assert m.lobbies_of(peer.ws) == {"home", "announcements"}
        assert asked == []
        await close(peer, task)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-1, ValueError),
        (1.5, TypeError),
        (True, TypeError),
        ("3", TypeError),
        (None, TypeError),
    ],
)
def test_max_lobbies_per_connection_is_checked_before_anything_is_sent(
    value: Any, error: type[Exception]
) -> None:
    async def main() -> None:
        m = ConnectionManager()
        peer = FakePeer()
        with pytest.raises(error, match=r"^max_lobbies_per_connection"):
            await m.serve(peer.ws, "home", "alice", App(m).handler, max_lobbies_per_connection=value)
        assert peer.frames == [] and len(m) == 0

    asyncio.run(main())
