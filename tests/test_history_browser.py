"""The browser client's recovery in Chromium: the server drops the socket, N messages are
broadcast while the page is offline, and the page then shows exactly those N, in order, then
live ones (tests/history_app.py in uvicorn; Playwright driving Debian's chromium); the same
with Redis, the page reconnecting to the other node (tests/history_browser_cluster_app.py)."""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

from tests.redis_server import redis_server
from tests.servers import uvicorn_server
from tests.test_browser import browser, shot

__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with tests/test_browser.py

pytestmark = [pytest.mark.slow, pytest.mark.browser]

expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with uvicorn_server("tests.history_app:app") as (p, _proc):
        yield p


def get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return dict(json.loads(r.read()))


def test_a_page_offline_for_n_messages_shows_exactly_those_in_order_then_live_ones(
    browser: Browser, port: int
) -> None:
    page = browser.new_context().new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/?user=olga")
        expect(page.locator("#status")).to_have_attribute("data-state", "open")
        # it has received no message yet, but knows where the lobby stands
        page.wait_for_function("window.wsmClient.positions.home !== undefined")
        assert page.evaluate("window.wsmClient.positions.home.offset") == 0
        page.evaluate(
            "window.closes = []; wsmClient.addEventListener('close', (e) => closes.push(e.detail.code))"
        )

        # the server drops the socket and broadcasts 5 while the page is offline
        assert get(port, "/drop/olga?then=5")["dropped"] is True
        page.wait_for_function("window.closes.length === 1")
        expect(page.locator("#status")).to_have_attribute("data-state", "open")
        expect(page.locator("#notes li")).to_have_text(["1", "2", "3", "4", "5"])
        expect(page.locator("#recoveries li")).to_have_text(["home true"])
        assert page.evaluate("window.closes") == [1006]

        assert get(port, "/announce/home?n=2")["delivered"] == 2  # 2 messages, 1 connection
        expect(page.locator("#notes li")).to_have_text(["1", "2", "3", "4", "5", "6", "7"])
        items = page.locator("#notes li")
        assert [items.nth(i).get_attribute("data-offset") for i in range(7)] == [str(n) for n in range(1, 8)]
        # the app's handlers never see the position member
        assert {items.nth(i).get_attribute("data-has-pos") for i in range(7)} == {"false"}
        assert shot(page, "history-recovered").stat().st_size > 0
    finally:
        page.context.close()


@pytest.fixture(scope="module")
def cluster_ports() -> Iterator[tuple[int, int]]:
    env = {"WSMANAGER_REDIS_URL": "", "WSMANAGER_REDIS_NAMESPACE": "hb", "WSMANAGER_LEASE_SECONDS": "2"}
    with redis_server() as redis, contextlib.ExitStack() as stack:
        env["WSMANAGER_REDIS_URL"] = redis.url
        a, _ = stack.enter_context(uvicorn_server("tests.history_browser_cluster_app:app", env=env))
        b, _ = stack.enter_context(uvicorn_server("tests.history_browser_cluster_app:app", env=env))
        yield a, b


def test_a_page_that_reconnects_to_the_other_node_shows_exactly_what_it_missed_then_live_ones(
    browser: Browser, cluster_ports: tuple[int, int]
) -> None:
    """With Redis: the page on node A loses its socket, 5 messages are
    broadcast from node B while it is offline, it reconnects to node B
    (the client's ``url`` as a function) and shows exactly those 5, in
    order, then live ones from either node."""
    a, b = cluster_ports
    page = browser.new_context().new_page()
    try:
        page.goto(f"http://127.0.0.1:{a}/?user=pia&ports={a},{b}")
        expect(page.locator("#status")).to_have_attribute("data-state", "open")
        page.wait_for_function("window.wsmClient.positions.home !== undefined")
        get(b, "/announce/home?start=1&n=2")
        expect(page.locator("#notes li")).to_have_text(["1", "2"])
        # the page may not reconnect until the test says so
        page.evaluate("window.gate = new Promise((r) => { window.openGate = r; }); 0")  # not awaited
        assert get(a, "/drop/pia")["dropped"] is True
        expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        appended = get(b, "/stats")["history"]["appended"]
        get(b, "/announce/home?start=3&n=5")  # while the page is offline
        deadline = time.monotonic() + 15
        while get(b, "/stats")["history"]["appended"] < appended + 5:  # kept in Redis
            assert time.monotonic() < deadline, "node B's messages were never kept"
            time.sleep(0.02)
        page.evaluate("window.openGate()")
        expect(page.locator("#status")).to_have_attribute("data-state", "open")
        expect(page.locator("#notes li")).to_have_text([str(n) for n in range(1, 8)])
        expect(page.locator("#recoveries li")).to_have_text(["home true"])
        assert page.evaluate("window.ports") == [str(a), str(b)]  # reconnected to node B
        get(a, "/announce/home?start=8&n=1")
        get(b, "/announce/home?start=9&n=1")
        expect(page.locator("#notes li")).to_have_text([str(n) for n in range(1, 10)])
        items = page.locator("#notes li")
        assert [items.nth(i).get_attribute("data-offset") for i in range(9)] == [str(n) for n in range(1, 10)]
        assert shot(page, "history-recovered-other-node").stat().st_size > 0
    finally:
        page.context.close()
