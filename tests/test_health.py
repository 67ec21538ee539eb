"""Heartbeat and stale-connection cleanup (wsmanager/health.py, Core._sweep).

Sweep logic runs on an injected clock without sleeping; the background
monitor, event loops and the seed's endpoint run on the real clock with
intervals of a fraction of a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import wsmanager
from tests import seed_app
from tests.asgi_fakes import FakePeer
from wsmanager import CloseCode, ConnectionManager


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await coro_fn()

    asyncio.run(main())


def pings(peer: FakePeer) -> int:
    return sum(1 for m in peer.texts() if m.get("type") == "health_ping")


async def connect(m: ConnectionManager, lobby: str, user: str) -> FakePeer:
    peer = FakePeer()
    assert await m.connect(peer.ws, lobby, user)
    return peer


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def wait_until_sync(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


# ---------------------------------------------------------------- settings


def test_settings_defaults_validation_and_off_switch() -> None:
    m = ConnectionManager()
    assert (m.ping_interval, m.ping_timeout) == (20.0, 10.0)
    m2 = ConnectionManager(ping_interval=0.25, ping_timeout=1)
    assert (m2.ping_interval, m2.ping_timeout) == (0.25, 1.0)
    m2.ping_interval = None
    assert m2.ping_interval is None
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            ConnectionManager(ping_interval=bad)
        with pytest.raises(ValueError):
            m2.ping_timeout = bad
    for wrong in ("20", True):
        with pytest.raises(TypeError):
            ConnectionManager(ping_timeout=wrong)  # type: ignore[arg-type]
    params = inspect.signature(ConnectionManager).parameters
    assert params["ping_interval"].kind is params["ping_timeout"].kind is inspect.Parameter.KEYWORD_ONLY
    stats = m.get_stats()
    assert stats["stale_closed"] == {"no_pong": 0, "send_failed": 0, "handler_exited": 0}
    assert stats["latency_ms"]["p50"] is None


# -------------------------------------------------------- fake-clock sweeps


def test_sweep_pings_in_order_of_silence_then_closes_after_timeout() -> None:
    clock = FakeClock()
    m = ConnectionManager(clock=clock, ping_interval=10, ping_timeout=5)

    async def main() -> None:
        a = await connect(m, "l", "a")  # t=0
        clock.advance(1)
        b = await connect(m, "l", "b")  # t=1
        clock.advance(1)
        c = await connect(m, "l", "c")  # t=2
        clock.advance(1)
        assert m.touch(a.ws)  # t=3: a received something
        assert not m.health.running  # an injected clock: sweeps are driven here

        clock.t = 1010.5  # nobody silent for 10 s yet
        assert (await m.health.sweep(wait=True)).pinged == 0
        clock.t = 1011.0  # b's 10 s of silence are up, exactly
        r = await m.health.sweep(wait=True)
        assert (r.pinged, r.expired) == (1, 0) and pings(b) == 1 and pings(a) == pings(c) == 0
        ping = b.texts()[0]
        assert ping["type"] == "health_ping" and isinstance(ping["timestamp"], float)
        clock.t = 1012.5
        assert (await m.health.sweep(wait=True)).pinged == 1 and pings(c) == 1
        clock.t = 1013.5
        assert (await m.health.sweep(wait=True)).pinged == 1 and pings(a) == 1
        clock.t = 1014.0
        assert m.record_pong_ws(b.ws) == pytest.approx(3000.0)  # pinged at 1011
        clock.t = 1017.4  # c was pinged at 1012.5: 5 s are not up
        r = await m.health.sweep(wait=True)
        assert (r.pinged, r.expired) == (0, 0)
        clock.t = 1017.5
        r = await m.health.sweep(wait=True)
        assert (r.pinged, r.expired) == (0, 1)
        assert (c.close_code, c.close_reason) == (CloseCode.STALE, "stale") == (4004, "stale")
        assert c.ws not in m and m.get_lobby_users("l") == {"a", "b"}
        clock.t = 1018.5
        assert (await m.health.sweep(wait=True)).expired == 1 and a.close_code == 4004
        assert m.get_lobby_users("l") == {"b"} and b.close_code is None
        s = m.get_stats()
        assert s["total_connections"] == 1 and s["pings_sent"] == 3 and s["pongs_received"] == 1
        assert s["stale_closed"] == {"no_pong": 2, "send_failed": 0, "handler_exited": 0}
        assert s["latency_ms"]["p50"] == pytest.approx(3000.0) and s["latency_ms"]["samples"] == 1
        # b answered at 1014: pinged again at 1024, not before
        clock.t = 1023.9
        assert (await m.health.sweep(wait=True)).pinged == 0
        clock.t = 1024.0
        assert (await m.health.sweep(wait=True)).pinged == 1 and pings(b) == 2
        m.disconnect(b.ws)

    run(main)


def test_any_message_counts_as_liveness_but_only_a_pong_gives_a_latency() -> None:
    clock = FakeClock()
    m = ConnectionManager(clock=clock, ping_interval=10, ping_timeout=5)

    async def main() -> None:
        a = await connect(m, "l", "a")
        b = await connect(m, "l", "b")
        clock.advance(10)
        assert (await m.health.sweep(wait=True)).pinged == 2
        clock.advance(4)
        m.touch(a.ws)  # a chat message on a, per websocket
        m.update_last_message("b")  # the seed's per-user report, for b
        clock.advance(2)  # both pings are 6 s old now
        assert (await m.health.sweep(wait=True)).expired == 0
        assert len(m) == 2 and m.get_stats()["latency_ms"]["samples"] == 0
        m.disconnect(a.ws)
        m.disconnect(b.ws)

    run(main)


def test_dead_tab_is_found_while_the_other_tab_of_the_user_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="wsmanager")
    clock = FakeClock()
    m = ConnectionManager(clock=clock, ping_interval=10, ping_timeout=5)

    async def main() -> None:
        live = await connect(m, "l", "u")
        dead = await connect(m, "l", "u")
        for _ in range(3):  # the live tab answers each ping; the dead one never
            clock.advance(10)
            await m.health.sweep(wait=True)
            clock.advance(1)
            assert m.record_pong_ws(live.ws) == pytest.approx(1000.0)
            clock.advance(4)
            await m.health.sweep(wait=True)
        assert (dead.close_code, dead.close_reason) == (4004, "stale")
        assert live.close_code is None and m.is_user_connected("u")
        assert m._user_targets("u") == [live.ws]
        assert m.get_stats()["stale_closed"]["no_pong"] == 1
        [record] = [r for r in caplog.records if getattr(r, "reason", None) == "no_pong"]
        assert (record.lobby, record.user, record.code) == ("l", "u", 4004)  # type: ignore[attr-defined]
        m.disconnect(live.ws)

    run(main)


def test_per_user_reports_keep_every_tab_of_the_user_alive() -> None:
    # The seed's record_pong(user_id) cannot tell tabs apart: it vouches for all.
    clock = FakeClock()
    m = ConnectionManager(clock=clock, ping_interval=10, ping_timeout=5)

    async def main() -> None:
        tabs = [await connect(m, "l", "u"), await connect(m, "l", "u")]
        clock.advance(10)
        await m.health.sweep(wait=True)
        clock.advance(2)
        m.record_pong("u")
        clock.advance(4)
        await m.health.sweep(wait=True)
        assert len(m) == 2 and all(t.close_code is None for t in tabs)
        assert m.get_stats()["latency_ms"]["p50"] == pytest.approx(2000.0)
        for t in tabs:
            m.disconnect(t.ws)

    run(main)


def test_ping_timeout_none_pings_but_never_closes() -> None:
    clock = FakeClock()
    m = ConnectionManager(clock=clock, ping_interval=10, ping_timeout=None)

    async def main() -> None:
        a = await connect(m, "l", "a")
        clock.advance(10)
        assert (await m.health.sweep(wait=True)).pinged == 1
        clock.advance(10_000)
        assert (await m.health.sweep(wait=True)).expired == 0 and a.ws in m
        m.ping_interval = None  # heartbeat off: a sweep does nothing
        m.ping_timeout = 1
        assert (await m.health.sweep()).expired == 0 and a.ws in m
        m.disconnect(a.ws)

    run(main)


def test_ping_that_cannot_be_sent_removes_the_connection() -> None:
    clock = FakeClock()
    m = ConnectionManager(clock=clock, ping_interval=10, ping_timeout=5)

    async def main() -> None:
        a = await connect(m, "l", "a")
        a.fail_sends = True  # the socket died under us
        clock.advance(10)
        await m.health.sweep(wait=True)
        assert a.ws not in m and m.get_stats()["stale_closed"]["send_failed"] == 1

    run(main)


def test_record_pong_ws_answers_ping_user_and_concurrent_pings_share() -> None:
    m = ConnectionManager(ping_interval=None)

    async def main() -> None:
        a = await connect(m, "l", "a")
        calls = [asyncio.ensure_future(m.ping_user("a", timeout=5.0)) for _ in range(3)]
        await a.got_text.wait()
        assert pings(a) == 1  # one shared ping for three callers
        assert m.record_pong_ws(a.ws) is not None
        results = await asyncio.gather(*calls)
        assert all(ok and latency is not None and latency >= 0 for ok, latency in results)
        m.disconnect(a.ws)

    run(main)


def test_sweep_batches_and_next_deadline() -> None:
    clock = FakeClock(0.0)
    m = ConnectionManager(3000, 3000, clock=clock)
    socks = [object() for _ in range(1500)]
    assert m._next_deadline(10, 5) is None
    for i, ws in enumerate(socks):
        assert m._reserve(ws, "l", f"u{i}") == ""
        m._commit(ws)
        clock.advance(0.001)
    assert m._next_deadline(10, 5) == pytest.approx(10.0)
    clock.t = 100.0
    to_ping, expired = m._sweep(10, 5, 1024)
    assert to_ping == socks[:1024] and expired == []
    assert m._sweep(10, 5, 1024)[0] == socks[1024:]
    assert m._next_deadline(10, 5) == pytest.approx(105.0)  # the first ping's timeout
    clock.t = 105.0
    to_ping, expired = m._sweep(10, 5)
    assert [e[0] for e in expired] == socks and to_ping == [] and len(m) == 0
    assert expired[0][1:] == ("l", "u0")
    with pytest.raises(ValueError):
        m._sweep(-1, 5)
    with pytest.raises(ValueError):
        m._reap(object(), "bored")
    assert m._reap(object(), "send_failed") is None  # counted, nothing to remove


# A model of the sweep: every op on the core and on a plain-Python model must agree.
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("connect"), st.integers(0, 5)),
        st.tuples(st.just("touch"), st.integers(0, 5)),
        st.tuples(st.just("pong"), st.integers(0, 5)),
        st.tuples(st.just("leave"), st.integers(0, 5)),
        st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 3.0, 7.0])),
        st.just(("sweep", 0)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_sweep_agrees_with_a_plain_python_model(ops: list[tuple[str, float]]) -> None:
    interval, timeout = 4.0, 2.0
    clock = FakeClock(0.0)
    m = ConnectionManager(100, 100, clock=clock)
    socks = [object() for _ in range(6)]
    # model: index -> [last_rx, ping_sent or None, seq of its last list move,
    #                  time of the ping a pong would answer, or None]
    model: dict[int, list[Any]] = {}
    seq = 0
    for op, arg in ops:
        i = int(arg)
        if op == "connect" and i not in model:
            assert m._reserve(socks[i], "l", f"u{i}") == ""
            m._commit(socks[i])
            seq += 1
            model[i] = [clock.t, None, seq, None]
        elif op == "touch":
            assert m.touch(socks[i]) == (i in model)
            if i in model:
                seq += 1
                model[i][:3] = [clock.t, None, seq]
        elif op == "pong":
            rtt = m.record_pong_ws(socks[i])
            if i in model and model[i][3] is not None and clock.t <= model[i][3] + timeout:
                # (a pong after its ping's deadline proves liveness but is no round trip)
                assert rtt == pytest.approx((clock.t - model[i][3]) * 1000.0)
            else:
                assert rtt is None
            if i in model:
                seq += 1
                model[i] = [clock.t, None, seq, None]
        elif op == "leave":
            assert (m.disconnect(socks[i]) is not None) == (i in model)
            model.pop(i, None)
        elif op == "advance":
            clock.advance(float(arg))
        elif op == "sweep":
            to_ping, expired = m._sweep(interval, timeout)
            now = clock.t
            want_expired = sorted(
                (v[1], v[2], k) for k, v in model.items() if v[1] is not None and v[1] + timeout <= now
            )
            for *_, k in want_expired:
                del model[k]
            want_ping = sorted(
                (v[0], v[2], k) for k, v in model.items() if v[1] is None and v[0] + interval <= now
            )
            for *_, k in want_ping:
                seq += 1
                model[k][1:] = [now, seq, now]
            assert [e[0] for e in expired] == [socks[k] for *_, k in want_expired]
            assert to_ping == [socks[k] for *_, k in want_ping]
        assert len(m) == len(model)
        due = [v[1] + timeout if v[1] is not None else v[0] + interval for v in model.values()]
        assert m._next_deadline(interval, timeout) == (min(due) if due else None)
    stats = m.get_stats()
    assert stats["total_connections"] == len(model)


# ------------------------------------------------- reclaiming leaked entries


def test_seed_endpoint_fed_malformed_json_leaves_no_entry_after_one_sweep(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = ConnectionManager(max_connections=5, max_per_lobby=1, ping_interval=0.5, ping_timeout=0.5)
    monkeypatch.setattr(seed_app, "manager", m)
    client = TestClient(seed_app.app)  # no `with`: every session has its own event loop
    with (
        pytest.raises(json.JSONDecodeError),
        client.websocket_connect("/ws/r?token=user:a") as ws,
    ):
        ws.send_text("{not json")
        ws.receive_json()
    asyncio.run(m.health.sweep(wait=True))
    s = m.get_stats()
    assert s["total_connections"] == 0 and s["active_lobbies"] == 0
    assert s["stale_closed"]["handler_exited"] == 1
    assert m.can_accept_connection("r") == (True, "")  # the lobby of one is free again
    assert not m.health.running


def test_endpoint_cancelled_without_disconnect_is_reclaimed() -> None:
    m = ConnectionManager(ping_interval=None)

    async def main() -> None:
        peer = FakePeer()

        async def endpoint() -> None:
            await m.connect(peer.ws, "l", "u")
            await asyncio.Event().wait()  # never calls disconnect()

        task = asyncio.ensure_future(endpoint())
        await wait_until(lambda: peer.ws in m)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await settle()
        assert len(m) == 0 and m.get_stats()["stale_closed"]["handler_exited"] == 1

    run(main)


def test_one_task_that_connected_several_websockets_ends_each_is_reclaimed() -> None:
    """The endpoint watch keeps one done-callback per task: a task that
    connected three websockets (one disconnected and reconnected meanwhile,
    one disconnected for good) and is cancelled reclaims the two left."""
    m = ConnectionManager(ping_interval=None)

    async def main() -> None:
        peers = [FakePeer() for _ in range(3)]

        async def endpoint() -> None:
            for i, peer in enumerate(peers):
                await m.connect(peer.ws, "l", f"u{i}")
            m.disconnect(peers[0].ws)
            await m.connect(peers[0].ws, "l", "u0")
            m.disconnect(peers[1].ws)
            await asyncio.Event().wait()  # never calls disconnect() for the others

        task = asyncio.ensure_future(endpoint())
        await wait_until(lambda: len(m) == 2 and peers[0].ws in m)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await settle()
        assert len(m) == 0 and m.get_stats()["stale_closed"]["handler_exited"] == 2

    run(main)


def test_connect_from_a_helper_task_is_not_mistaken_for_a_dead_endpoint() -> None:
    m = ConnectionManager(ping_interval=None)

    async def main() -> None:
        peer = FakePeer()
        # wait_for / gather / create_task run connect() in a task of its own,
        # which ends at once while the connection lives on
        assert await asyncio.wait_for(asyncio.ensure_future(m.connect(peer.ws, "l", "u")), 5)
        other = FakePeer()

        async def helper() -> None:
            await m.connect(other.ws, "l", "v")

        await asyncio.ensure_future(helper())  # a helper of another name: probed
        await settle()
        assert peer.ws in m and other.ws in m
        assert pings(other) == 1 and pings(peer) == 0
        assert m.get_stats()["stale_closed"]["handler_exited"] == 0
        m.disconnect(peer.ws)
        m.disconnect(other.ws)

    run(main)


# -------------------------------------------------- the monitor, real clock


def make_endpoint(m: ConnectionManager) -> FastAPI:
    """An endpoint that reports activity per websocket."""
    app = FastAPI()

    @app.websocket("/ws/{lobby}/{user}")
    async def ws_endpoint(websocket: WebSocket, lobby: str, user: str) -> None:
        if not await m.connect(websocket, lobby, user):
            return
        try:
            while True:
                data = await websocket.receive_json()
                if data.get("type") == "health_pong":
                    m.record_pong_ws(websocket)
                else:
                    m.touch(websocket)
        except WebSocketDisconnect:
            m.disconnect(websocket)

    return app


def answer_pings(session: Any, stop: threading.Event, answered: list[int]) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while not stop.is_set():
            msg = session.receive_json()
            if msg.get("type") == "health_ping":
                session.send_json({"type": "health_pong", "timestamp": msg["timestamp"]})
                answered.append(1)


@pytest.mark.parametrize("app_kind", ["seed", "per_websocket"])
def test_testclient_silent_client_is_closed_and_answering_client_stays(
    monkeypatch: pytest.MonkeyPatch, app_kind: str
) -> None:
    m = ConnectionManager(ping_interval=0.1, ping_timeout=1.0)
    if app_kind == "seed":
        monkeypatch.setattr(seed_app, "manager", m)
        app, url = seed_app.app, "/ws/room?token=user:{}"
    else:
        app, url = make_endpoint(m), "/ws/room/{}"
    client = TestClient(app)  # no `with`: two sessions, two event loops at once
    answered: list[int] = []
    stop = threading.Event()
    with (
        client.websocket_connect(url.format("good")) as good,
        client.websocket_connect(url.format("bad")) as bad,
    ):
        helper = threading.Thread(target=answer_pings, args=(good, stop, answered), daemon=True)
        helper.start()
        assert bad.receive_json()["type"] == "health_ping"  # it never answers
        with pytest.raises(WebSocketDisconnect) as info:
            bad.receive_json()
        assert (info.value.code, info.value.reason) == (4004, "stale")
        assert m.get_lobby_users("room") == {"good"}
        answered_then = len(answered)
        assert answered_then >= 2  # good was pinged, and answered, all along
        wait_until_sync(lambda: len(answered) >= answered_then + 3)  # and still is
        assert m.get_lobby_users("room") == {"good"}
        assert m.get_stats()["stale_closed"] == {"no_pong": 1, "send_failed": 0, "handler_exited": 0}
        stop.set()
        helper.join(10)
        assert not helper.is_alive()
    wait_until_sync(lambda: len(m) == 0)
    latency = m.get_stats()["latency_ms"]
    p50, p99 = latency["p50"], latency["p99"]
    assert latency["samples"] >= 6 and p50 is not None and p99 is not None and p50 <= p99
    wait_until_sync(lambda: not m.health.running)  # both loops closed, no monitor left


def test_lifespan_starts_and_stops_the_monitor() -> None:
    m = ConnectionManager(ping_interval=0.05, ping_timeout=5)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with m:
            yield

    app = FastAPI(lifespan=lifespan)
    with TestClient(app) as client:
        assert m.health.running  # before any connection
        assert client.get("/").status_code == 404
    assert not m.health.running


def test_successive_event_loops_each_get_a_monitor_and_keep_none() -> None:
    m = ConnectionManager(ping_interval=0.05, ping_timeout=5)
    loops: list[asyncio.AbstractEventLoop] = []

    async def session() -> None:
        loops.append(asyncio.get_running_loop())
        peer = FakePeer()

        async def endpoint() -> None:
            await m.connect(peer.ws, "l", "u")
            await asyncio.Event().wait()  # the loop's shutdown cancels it

        task = asyncio.ensure_future(endpoint())
        await wait_until(lambda: pings(peer) >= 1)
        assert m.health.running
        del task

    for _ in range(3):
        asyncio.run(session())
        assert not m.health.running and len(m) == 0 and m.health._states == {}
    assert len({id(lp) for lp in loops}) == 3
    assert m.get_stats()["stale_closed"]["handler_exited"] == 3


def test_module_level_manager_across_testclient_sessions() -> None:
    # The seed's app on the real module-level manager; each session without
    # `with` runs in an event loop of its own, closed when the session ends.
    client = TestClient(seed_app.app)
    for name in ("a", "b"):
        with client.websocket_connect(f"/ws/loops?token=user:{name}") as ws:
            ws.send_json({"type": "chat", "text": "hi"})
            assert ws.receive_json()["from"] == name
            assert wsmanager.manager.health.running
        wait_until_sync(lambda: not wsmanager.manager.health.running)
        assert wsmanager.manager.health._states == {}
    assert wsmanager.manager.get_lobby_users("loops") == set()


def test_a_manager_nobody_holds_is_freed_and_its_monitor_ends() -> None:
    async def main() -> None:
        m = ConnectionManager(ping_interval=0.05, ping_timeout=5)
        health = m.health
        await connect(m, "l", "u")
        assert health.running
        alive = weakref.ref(m)
        del m
        assert alive() is None  # the monitor holds no reference to it
        await wait_until(lambda: not health.running)

    run(main)


def test_stop_cancels_the_monitor_and_connect_restarts_it() -> None:
    m = ConnectionManager(ping_interval=0.05, ping_timeout=5)

    async def main() -> None:
        await m.start()
        assert m.health.running
        await m.stop()
        assert not m.health.running
        peer = await connect(m, "l", "u")  # auto-start again
        assert m.health.running
        await wait_until(lambda: pings(peer) >= 1)
        m.ping_interval = None  # turned off at runtime: the monitor ends
        await wait_until(lambda: not m.health.running)
        m.disconnect(peer.ws)

    run(main)


def test_monitor_sleeps_until_the_next_deadline_not_a_fixed_tick() -> None:
    # a long interval: connect, then nothing is due for 30 s, and the monitor
    # must not wake up (sweep) in the meantime
    m = ConnectionManager(ping_interval=30, ping_timeout=30)
    sweeps: list[int] = []

    async def main() -> None:
        peer = await connect(m, "l", "u")
        real = m.health.sweep

        async def counting(*, wait: bool = False) -> Any:
            sweeps.append(1)
            return await real(wait=wait)

        m.health.sweep = counting  # type: ignore[method-assign]
        await asyncio.sleep(0.3)
        assert sweeps == []
        m.ping_interval = 0.05  # a setting change wakes it to reschedule
        await wait_until(lambda: pings(peer) >= 1)
        assert sweeps
        m.disconnect(peer.ws)

    run(main)


def test_health_ping_carries_the_connections_last_round_trip() -> None:
    """The browser client shows ``latency_ms`` of each health_ping as its latency."""
    clock = FakeClock()
    m = ConnectionManager(clock=clock, ping_interval=10, ping_timeout=5)

    async def main() -> None:
        a = await connect(m, "l", "a")
        b = await connect(m, "l", "b")
        assert m.latency_ms(a.ws) is None and m.latency_ms(object()) is None
        clock.advance(10)
        await m.health.sweep(wait=True)
        assert [p["latency_ms"] for p in a.texts()] == [None]  # nothing measured yet
        clock.advance(0.125)
        assert m.record_pong_ws(a.ws) == pytest.approx(125.0)
        m.touch(b.ws)  # b answers with a chat message: alive, but no round trip
        assert m.latency_ms(a.ws) == pytest.approx(125.0) and m.latency_ms(b.ws) is None
        clock.advance(10)
        await m.health.sweep(wait=True)
        assert [p["latency_ms"] for p in a.texts()] == [None, 125.0]
        assert [p["latency_ms"] for p in b.texts()] == [None, None]
        clock.advance(0.25)
        m.record_pong("a")  # the seed's per-user report measures the ping it answers too
        assert m.latency_ms(a.ws) == pytest.approx(250.0)
        clock.advance(10)
        await m.health.sweep(wait=True)
        assert a.texts()[-1]["latency_ms"] == 250.0
        m.disconnect(a.ws)
        assert m.latency_ms(a.ws) is None  # not registered any more
        m.disconnect(b.ws)

    run(main)


def test_latency_listeners_see_every_measured_round_trip(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    m = ConnectionManager(clock=clock, ping_interval=10, ping_timeout=5)
    seen: list[tuple[Any, float]] = []

    def broken(_ws: Any, _ms: float) -> None:
        raise ValueError("listener bug")

    async def main() -> None:
        a = await connect(m, "l", "a")
        remove_broken = m.add_latency_listener(broken)
        remove = m.add_latency_listener(lambda ws, ms: seen.append((ws, ms)))
        clock.advance(10)
        await m.health.sweep(wait=True)
        clock.advance(0.02)
        assert m.record_pong_ws(a.ws) == pytest.approx(20.0)  # the broken listener does not get in the way
        m.record_pong_ws(a.ws)  # no ping outstanding: no round trip, nothing to report
        clock.advance(10)
        await m.health.sweep(wait=True)
        clock.advance(0.03)
        m.record_pong("a")  # per user: no websocket to name
        assert [ws for ws, _ in seen] == [a.ws, None]
        assert [ms for _, ms in seen] == pytest.approx([20.0, 30.0])
        remove()
        remove()  # idempotent
        remove_broken()
        clock.advance(10)
        await m.health.sweep(wait=True)
        m.record_pong_ws(a.ws)
        assert len(seen) == 2
        m.disconnect(a.ws)

    with caplog.at_level(logging.ERROR, logger="wsmanager"):
        run(main)
    assert caplog.text.count("latency listener failed") == 2
