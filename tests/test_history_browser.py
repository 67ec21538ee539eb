"""The browser client's recovery in Chromium: the server drops the socket, N messages are
broadcast while the page is offline, and the page then shows exactly those N, in order, then
live ones (tests/history_app.py in uvicorn; Playwright driving Debian's chromium)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, expect

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
