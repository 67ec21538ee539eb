"""The lobby chat demo under TestClient: page, client module, /stats, /metrics and the endpoint."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient, WebSocketTestSession
from starlette.websockets import WebSocketDisconnect

from examples.lobby_chat.app import create_app
from wsmanager import ConnectionManager
from wsmanager.client import CLIENT_DIR, mount_client


@pytest.fixture(autouse=True)
def collect_garbage() -> Iterator[None]:
    """An app and its TestClient leave reference cycles; collect them here rather than in
    a later test that counts references (tests/test_memory.py)."""
    yield
    gc.collect()


def receive_until(ws: WebSocketTestSession, kind: str) -> dict[str, Any]:
    """The next message of type ``kind`` (pings and other messages are skipped)."""
    for _ in range(50):
        message = dict(ws.receive_json())
        if message.get("type") == kind:
            return message
    raise AssertionError(f"no {kind!r} message")


def test_page_and_client_module_are_served() -> None:
    with TestClient(create_app(ConnectionManager())) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert '<script type="module" src="/static/app.js">' in page.text
        app_js = client.get("/static/app.js")
        assert 'from "/wsmanager/wsmanager.js"' in app_js.text
        module = client.get("/wsmanager/wsmanager.js")
        assert module.status_code == 200
        assert module.headers["content-type"].startswith("text/javascript")
        assert "export class WSManagerClient" in module.text
        assert module.text == (CLIENT_DIR / "wsmanager.js").read_text()
        dts = client.get("/wsmanager/wsmanager.d.ts")
        assert dts.status_code == 200
        assert "export declare class WSManagerClient" in dts.text


def test_mount_client_on_any_starlette_app_and_refuses_other_objects() -> None:
    app = Starlette()
    mount_client(app, "/js")
    with TestClient(app) as client:
        assert "WSManagerClient" in client.get("/js/wsmanager.js").text
        assert client.get("/js/missing.js").status_code == 404
    with pytest.raises(TypeError, match="Starlette or FastAPI app"):
        mount_client(object())


def test_chat_direct_message_stats_and_metrics() -> None:
    manager = ConnectionManager(50, 2)
    with TestClient(create_app(manager)) as client:
        with (
            client.websocket_connect("/ws/room?token=alice") as alice,
            client.websocket_connect("/ws/room?token=bob") as bob,
        ):
            assert receive_until(alice, "welcome") == {"type": "welcome", "user": "alice", "lobby": "room"}
            assert [m["user"] for m in receive_until(bob, "members")["members"]] == ["alice", "bob"]
            alice.send_json({"type": "chat", "text": "hi"})
            chat = receive_until(bob, "chat")
            assert (chat["from"], chat["text"]) == ("alice", "hi")
            bob.send_json({"type": "dm", "to": "alice", "text": "psst"})
            dm = receive_until(alice, "dm")
            assert (dm["from"], dm["to"], dm["text"]) == ("bob", "alice", "psst")
            bob.send_json({"type": "dm", "to": "nobody", "text": "?"})
            assert receive_until(bob, "error")["text"] == "nobody is not in this lobby"
            bob.send_text("{not json")  # a bad message is answered, not a crash
            assert receive_until(bob, "error")["error"] == "bad_json"
            for _ in range(manager.max_bad_messages - 1):  # persistent garbage ends that connection only
                bob.send_text("{not json")
            with pytest.raises(WebSocketDisconnect) as exc:
                receive_until(bob, "never")
            assert (exc.value.code, exc.value.reason) == (4007, "bad_message")
            members = receive_until(alice, "members")["members"]
            while [m["user"] for m in members] != ["alice"]:
                members = receive_until(alice, "members")["members"]

            stats = client.get("/stats").json()
            assert stats["total_connections"] == 1
            assert stats["max_per_lobby"] == 2
            assert stats["lobbies"] == {"room": 1}
            metrics = client.get("/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            assert "wsmanager_connections 1.0" in metrics.text
            assert "wsmanager_messages_sent_total" in metrics.text
        assert manager.get_stats()["total_connections"] == 0


def test_refusals_carry_their_close_code_and_reason() -> None:
    manager = ConnectionManager(50, 1)
    with TestClient(create_app(manager)) as client:
        with (
            client.websocket_connect("/ws/room?token=bad!name") as ws,
            pytest.raises(WebSocketDisconnect) as exc,
        ):
            ws.receive_json()
        assert (exc.value.code, exc.value.reason) == (4001, "unauthorized")

        with client.websocket_connect("/ws/room?token=alice") as alice:
            receive_until(alice, "welcome")
            with (
                client.websocket_connect("/ws/room?token=bob") as bob,
                pytest.raises(WebSocketDisconnect) as exc,
            ):
                bob.receive_json()
            assert (exc.value.code, exc.value.reason) == (4002, "lobby_full")
        text = client.get("/metrics").text
        assert 'wsmanager_refusals_total{reason="lobby_full"} 1.0' in text
        assert 'wsmanager_refusals_total{reason="unauthorized"} 1.0' in text


def test_heartbeat_pings_silent_members_and_closes_the_stale_one() -> None:
    """The demo runs on the manager's built-in heartbeat (here on a fake clock,
    swept in the app's loop through the TestClient's portal)."""
    now = [1000.0]
    manager = ConnectionManager(clock=lambda: now[0])
    with TestClient(create_app(manager, ping_interval=1.0, ping_timeout=1.0)) as client:
        assert (manager.ping_interval, manager.ping_timeout) == (1.0, 1.0)
        assert client.portal is not None
        portal = client.portal

        def sweep() -> None:
            portal.call(manager.health.sweep)

        with (
            client.websocket_connect("/ws/hb?token=alice") as alice,
            client.websocket_connect("/ws/hb?token=zed") as zed,
        ):
            receive_until(alice, "welcome")
            receive_until(zed, "welcome")
            members = receive_until(alice, "members")["members"]
            while len(members) != 2:
                members = receive_until(alice, "members")["members"]
            assert [m["latency_ms"] for m in members] == [None, None]
            now[0] += 1.5  # both silent for longer than ping_interval
            sweep()
            ping = receive_until(alice, "health_ping")
            assert ping["latency_ms"] is None  # nothing measured yet
            receive_until(zed, "health_ping")
            now[0] += 0.05
            alice.send_json({"type": "health_pong", "timestamp": ping["timestamp"]})
            # alice's pong gives her a latency (50 ms on the fake clock), announced to the lobby
            members = receive_until(alice, "members")["members"]
            assert members == [{"user": "alice", "latency_ms": 50.0}, {"user": "zed", "latency_ms": None}]
            now[0] += 1.5  # zed never answered: closed as stale, alice is pinged again
            sweep()
            # zed leaves the member list at once, before its client even took the close,
            # and the next ping tells alice her own latency (the browser client's `latency`)
            pings: list[dict[str, Any]] = []
            members = []
            while not (pings and [m["user"] for m in members] == ["alice"]):
                message = dict(alice.receive_json())
                if message["type"] == "health_ping":
                    pings.append(message)
                elif message["type"] == "members":
                    members = message["members"]
            assert [p["latency_ms"] for p in pings] == [50.0]
            with pytest.raises(WebSocketDisconnect) as exc:
                receive_until(zed, "never")
            assert (exc.value.code, exc.value.reason) == (4004, "stale")
        text = client.get("/metrics").text
        assert "wsmanager_stale_closes_total 1.0" in text
        assert "wsmanager_latency_seconds_count 1.0" in text  # the histogram saw alice's round trip
        assert 'wsmanager_stale_removals_total{reason="no_pong"} 1.0' in text


def fast_app(manager: ConnectionManager, **kw: Any) -> Any:
    """The demo with its dashboard pushed at once and simulated clients at full speed."""
    return create_app(manager, push_interval=0.0, sim_interval=0.0, **kw)


def dashboard_until(ws: WebSocketTestSession, check: Any) -> dict[str, Any]:
    """The first pushed dashboard for which ``check(dashboard)`` is true."""
    for _ in range(2000):
        message = dict(ws.receive_json())
        if message.get("type") == "dashboard" and check(message):
            return message
    raise AssertionError("no such dashboard")


def feed_has(reason: str, user_prefix: str = "") -> Any:
    def check(d: dict[str, Any]) -> bool:
        return any(
            e.get("reason") == reason and str(e.get("user", "")).startswith(user_prefix) for e in d["feed"]
        )

    return check


def test_favicon_is_served() -> None:
    with TestClient(create_app(ConnectionManager())) as client:
        icon = client.get("/favicon.ico")
        assert icon.status_code == 200
        assert icon.headers["content-type"].startswith("image/svg+xml")
        assert "<svg" in icon.text
        assert 'rel="icon"' in client.get("/").text


def test_the_dashboard_is_pushed_to_every_page_when_something_changes() -> None:
    manager = ConnectionManager(50, 4)
    with TestClient(fast_app(manager)) as client, client.websocket_connect("/ws/main?token=alice") as alice:
        receive_until(alice, "welcome")
        first = receive_until(alice, "dashboard")  # sent with the welcome, without asking
        assert first["stats"]["total_connections"] == 1
        assert first["lobbies"] == [{"lobby": "main", "connections": 1, "capacity": 4}]
        with client.websocket_connect("/ws/other?token=bob") as bob:
            receive_until(bob, "welcome")
            # alice is in another lobby and still hears of bob's arrival, pushed
            pushed = dashboard_until(alice, lambda d: d["stats"]["total_connections"] == 2)
            assert {row["lobby"]: row["connections"] for row in pushed["lobbies"]} == {
                "main": 1,
                "other": 1,
            }
            assert pushed["stats"]["max_connections"] == 50
        dashboard_until(alice, lambda d: d["stats"]["total_connections"] == 1)


def test_a_refusal_reaches_the_feed_of_the_members() -> None:
    manager = ConnectionManager(50, 1)
    with TestClient(fast_app(manager)) as client, client.websocket_connect("/ws/room?token=alice") as alice:
        receive_until(alice, "welcome")
        with client.websocket_connect("/ws/room?token=bob") as bob, pytest.raises(WebSocketDisconnect):
            bob.receive_json()
        pushed = dashboard_until(alice, feed_has("lobby_full"))
        event = next(e for e in pushed["feed"] if e["reason"] == "lobby_full")
        assert (event["kind"], event["code"], event["user"], event["lobby"]) == (
            "refused",
            4002,
            "bob",
            "room",
        )
        assert pushed["stats"]["refused"]["lobby_full"] == 1


def test_a_simulated_flooder_is_rate_limited_then_closed_with_4005() -> None:
    manager = ConnectionManager(50, 4)
    with TestClient(fast_app(manager, rate_limit=10.0, rate_burst=5.0, rate_limit_close_after=10)) as client:
        with client.websocket_connect("/ws/main?token=alice") as alice:
            receive_until(alice, "welcome")
            alice.send_json({"type": "simulate", "kind": "flooder"})
            # its first messages get through as chat (the burst)...
            assert receive_until(alice, "chat")["from"] == "flooder-1"
            # ...then it is dropped and closed: the feed shows it
            pushed = dashboard_until(alice, feed_has("rate_limited", "flooder-1"))
            event = next(e for e in pushed["feed"] if e["reason"] == "rate_limited")
            assert (event["kind"], event["code"], event["lobby"]) == ("closed", 4005, "main")
            assert any(e["kind"] == "simulation" and e.get("user") == "flooder-1" for e in pushed["feed"])
            dashboard_until(alice, lambda d: d["simulated"] == [] and d["stats"]["total_connections"] == 1)
        stats = manager.get_stats()
        assert stats["closed"]["rate_limited"] == 1
        assert stats["rate_limited_messages"] >= 10


def test_a_simulated_non_reader_becomes_a_slow_consumer_and_the_others_get_everything() -> None:
    manager = ConnectionManager(50, 4)
    with TestClient(fast_app(manager, max_backlog=20)) as client:
        with client.websocket_connect("/ws/main?token=alice") as alice:
            receive_until(alice, "welcome")
            alice.send_json({"type": "simulate", "kind": "nonreader"})
            pushed = dashboard_until(alice, feed_has("slow_consumer", "nonreader-1"))
            event = next(e for e in pushed["feed"] if e["reason"] == "slow_consumer")
            assert (event["code"], event["lobby"]) == (4006, "main")
            # its backlog went with it
            dashboard_until(alice, lambda d: d["stats"]["backlogged_connections"] == 0 and not d["simulated"])
            alice.send_json({"type": "chat", "text": "still here"})
            assert receive_until(alice, "chat")["text"] == "still here"  # alice was never held up
        assert manager.get_stats()["closed"]["slow_consumer"] == 1


def test_a_simulated_frozen_client_is_closed_as_stale_and_the_histogram_counts_round_trips() -> None:
    now = [1000.0]
    manager = ConnectionManager(50, 4, clock=lambda: now[0])
    with TestClient(fast_app(manager, ping_interval=1.0, ping_timeout=1.0)) as client:
        assert client.portal is not None
        portal = client.portal
        with client.websocket_connect("/ws/hb?token=alice") as alice:
            receive_until(alice, "welcome")
            alice.send_json({"type": "simulate", "kind": "frozen"})
            members = receive_until(alice, "members")["members"]
            while [m["user"] for m in members] != ["alice", "frozen-1"]:
                members = receive_until(alice, "members")["members"]
            now[0] += 1.5
            portal.call(manager.health.sweep)
            ping = receive_until(alice, "health_ping")
            now[0] += 0.004
            alice.send_json({"type": "health_pong", "timestamp": ping["timestamp"]})
            # alice's round trip (4 ms on the fake clock) lands in the 2-5 ms bucket
            pushed = dashboard_until(alice, lambda d: d["latency"]["samples"] == 1)
            assert pushed["latency"]["counts"][2] == 1 and pushed["latency"]["p50"] == 4.0
            now[0] += 1.5  # frozen-1 never answered its ping
            portal.call(manager.health.sweep)
            pushed = dashboard_until(alice, feed_has("stale", "frozen-1"))
            event = next(e for e in pushed["feed"] if e["reason"] == "stale")
            assert (event["kind"], event["code"]) == ("closed", 4004)
            members = receive_until(alice, "members")["members"]
            while [m["user"] for m in members] != ["alice"]:
                members = receive_until(alice, "members")["members"]


def test_simulations_are_bounded_and_unknown_kinds_answered() -> None:
    manager = ConnectionManager(50, 10)
    with TestClient(fast_app(manager)) as client, client.websocket_connect("/ws/main?token=alice") as alice:
        receive_until(alice, "welcome")
        alice.send_json({"type": "simulate", "kind": "rocket"})
        assert receive_until(alice, "error")["error"] == "bad_simulation"
        for _ in range(7):
            alice.send_json({"type": "simulate", "kind": "frozen"})
        pushed = dashboard_until(alice, lambda d: any("run already" in e["text"] for e in d["feed"]))
        assert len(pushed["simulated"]) == 6
    assert manager.get_stats()["total_connections"] == 0  # the app's shutdown stopped them


def test_with_presence_events_members_hear_joins_and_leaves_once_per_user() -> None:
    manager = ConnectionManager(50, 4, presence_events=True, presence_interval=0.01)
    with TestClient(fast_app(manager)) as client, client.websocket_connect("/ws/p?token=alice") as alice:
        receive_until(alice, "welcome")
        with (
            client.websocket_connect("/ws/p?token=bob") as bob,
            client.websocket_connect("/ws/p?token=bob") as tab,
        ):
            receive_until(bob, "welcome")
            receive_until(tab, "welcome")
            presence = receive_until(alice, "presence")
            while presence.get("state") or "bob" not in presence["joins"]:  # (alice may join with bob)
                presence = receive_until(alice, "presence")
            assert (presence["lobby"], presence["leaves"]) == ("p", [])
        presence = receive_until(alice, "presence")  # both of bob's tabs closed: one leave
        assert (presence["joins"], presence["leaves"]) == ([], ["bob"])
