"""The browser client's lobbies in Chromium: join, presence, and memberships restored after the
server drops the socket (tests/rooms_app.py in uvicorn; Playwright driving Debian's chromium)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.servers import uvicorn_server
from tests.test_browser import browser, shot

__all__ = ["browser"]  # the module-scoped Chromium fixture, shared with tests/test_browser.py

pytestmark = [pytest.mark.slow, pytest.mark.browser]

expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with uvicorn_server("tests.rooms_app:app", env={"ROOMS_PRESENCE_INTERVAL": "0.05"}) as (p, _proc):
        yield p


def get(port: int, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return dict(json.loads(r.read()))


def open_page(browser: Browser, port: int, user: str) -> Page:
    page = browser.new_context().new_page()
    page.goto(f"http://127.0.0.1:{port}/?user={user}")
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    return page


def join(page: Page, lobby: str) -> Any:
    return page.evaluate("(lobby) => window.wsmClient.join(lobby)", lobby)


def test_memberships_and_presence_come_back_after_the_server_drops_the_socket(
    browser: Browser, port: int
) -> None:
    carol = open_page(browser, port, "carol")
    dave = open_page(browser, port, "dave")
    try:
        assert join(carol, "open-a") == {"lobby": "open-a", "joined": True}
        assert join(carol, "open-b") == {"lobby": "open-b", "joined": True}
        assert join(carol, "vip-c") == {"lobby": "vip-c", "joined": False, "reason": "vip_only"}
        assert join(dave, "open-a") == {"lobby": "open-a", "joined": True}
        expect(carol.locator("#lobbies li")).to_have_text(["open-a", "open-b"])
        expect(carol.locator('#members ul[data-lobby="open-a"] li')).to_have_text(["carol", "dave"])

        carol.evaluate(
            "window.closes = []; wsmClient.addEventListener('close', (e) => closes.push(e.detail.code))"
        )
        assert get(port, "/drop/carol") == {"dropped": True}
        expect(carol.locator("#status")).to_have_attribute("data-state", "reconnecting")
        expect(carol.locator("#status")).to_have_attribute("data-state", "open")
        assert carol.evaluate("window.closes") == [1006]

        # the new connection joined both lobbies again, by itself
        expect(carol.locator("#lobbies li")).to_have_text(["open-a", "open-b"])
        for _ in range(100):
            if get(port, "/lobbies/carol")["lobbies"] == ["home", "open-a", "open-b"]:
                break
            carol.wait_for_timeout(50)
        assert get(port, "/lobbies/carol")["lobbies"] == ["home", "open-a", "open-b"]
        carol.evaluate("void wsmClient.on('announce', (m) => { window.announced = m.lobby; })")
        assert get(port, "/announce/open-b")["delivered"] == 1
        carol.wait_for_function("window.announced === 'open-b'")
        # and the presence state came again with the re-join: dave is still there, then leaves
        expect(carol.locator('#members ul[data-lobby="open-a"] li')).to_have_text(["carol", "dave"])
        assert dave.evaluate("window.wsmClient.leave('open-a')") is True
        expect(carol.locator('#members ul[data-lobby="open-a"] li')).to_have_text(["carol"])
        assert shot(carol, "rooms-restored-carol").stat().st_size > 0
    finally:
        carol.context.close()
        dave.context.close()
