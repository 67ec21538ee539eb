"""The demo page and the browser client in a real browser: Playwright driving Debian's chromium.

The demo app runs in uvicorn on 127.0.0.1 with a lobby size of 2 and a fast
heartbeat. Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.servers import ROOT, free_port, uvicorn_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts"
APP = "examples.lobby_chat.app:app"
# A lobby holds 2; a silent connection is pinged after 0.5 s and closed 1.5 s later.
SERVER_ENV = {
    "LOBBY_CHAT_MAX_PER_LOBBY": "2",
    "LOBBY_CHAT_PING_INTERVAL": "0.5",
    "LOBBY_CHAT_PING_TIMEOUT": "1.5",
}
# Reconnect quickly in tests (the page reads these from its query string).
FAST = "&base_delay=200&max_delay=1000&retry_later=500"

expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Debian's chromium is missing: run `make apt-test` (apt-get install chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with uvicorn_server(APP, env=SERVER_ENV) as (p, _proc):
        yield p


def open_page(browser: Browser, port: int, name: str, lobby: str) -> Page:
    """A fresh browser context (its own tab) that joins ``lobby`` as ``name``."""
    context = browser.new_context(viewport={"width": 1000, "height": 640})
    page = context.new_page()
    page.goto(f"http://127.0.0.1:{port}/?name={name}&lobby={lobby}{FAST}")
    return page


def expect_joined(page: Page, *users: str) -> None:
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    for user in users:
        expect(page.locator(f'#members li[data-user="{user}"]')).to_be_visible()


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return dict(json.loads(r.read()))


def shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def test_two_pages_chat_and_send_a_direct_message(browser: Browser, port: int) -> None:
    alice = open_page(browser, port, "alice", "chat")
    bob = open_page(browser, port, "bob", "chat")
    try:
        expect_joined(alice, "alice", "bob")
        expect_joined(bob, "alice", "bob")

        alice.fill("#text", "hello bob")
        alice.click("#send-btn")
        expect(bob.locator('#log .msg[data-kind="chat"]')).to_contain_text("alicehello bob")
        expect(alice.locator('#log .msg[data-kind="chat"]')).to_contain_text("hello bob")

        bob.locator('#members li[data-user="alice"]').click()  # picks alice as the recipient
        expect(bob.locator("#to")).to_have_value("alice")
        bob.fill("#text", "psst, only you")
        bob.press("#text", "Enter")
        expect(alice.locator('#log .msg[data-kind="dm"]')).to_contain_text("psst, only you")
        expect(alice.locator('#log .msg[data-kind="dm"] .from')).to_have_text("bob (private)")

        # the heartbeat measured both pages: each member shows a latency in ms
        expect(alice.locator('#members li[data-user="bob"] .ms')).to_contain_text("ms")
        expect(alice.locator("#latency")).to_contain_text("ms")
        # one source of truth: the header shows the latency of the member list's own entry
        mine = alice.locator('#members li[data-user="alice"] .ms')
        expect(mine).to_contain_text("ms")
        expect(alice.locator("#latency")).to_have_text(f"latency {mine.text_content()}")
        # the server panel is pushed over the page's WebSocket: the lobby with its capacity
        expect(alice.locator("#live")).to_have_attribute("data-live", "true")
        expect(alice.locator("#srv-connections")).to_have_text("2 / 500")
        expect(alice.locator('#srv-lobby-list li[data-lobby="chat"]')).to_contain_text("2 / 2")
        assert shot(alice, "chat-alice").stat().st_size > 0
        assert shot(bob, "chat-bob").stat().st_size > 0
    finally:
        alice.context.close()
        bob.context.close()


def test_third_page_sees_lobby_full_then_gets_in_when_a_seat_frees(browser: Browser, port: int) -> None:
    alice = open_page(browser, port, "alice", "full")
    bob = open_page(browser, port, "bob", "full")
    carol = None
    try:
        expect_joined(alice, "alice", "bob")
        expect_joined(bob, "alice", "bob")
        carol = open_page(browser, port, "carol", "full")
        info = carol.locator("#close-info")
        expect(info).to_contain_text("This lobby is full (4002)")
        expect(info).to_have_attribute("data-code", "4002")
        expect(info).to_contain_text("retrying in")
        shot(carol, "lobby-full-carol")
        assert carol.evaluate("window.wsmClient.lastClose.reason") == "lobby_full"
        expect(alice.locator("#members li")).to_have_count(2)

        bob.context.close()  # a seat frees: carol's client retries later and gets in
        expect_joined(carol, "alice", "carol")
        expect_joined(alice, "alice", "carol")
        expect(alice.locator('#members li[data-user="bob"]')).to_have_count(0)
    finally:
        for page in (alice, bob, carol):
            if page is not None:
                page.context.close()


def test_pages_reconnect_by_themselves_after_a_server_restart(browser: Browser) -> None:
    port = free_port()
    with uvicorn_server(APP, env=SERVER_ENV, port=port) as (_p, proc):
        alice = open_page(browser, port, "alice", "restart")
        bob = open_page(browser, port, "bob", "restart")
        expect_joined(alice, "alice", "bob")
        expect_joined(bob, "alice", "bob")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
        for page in (alice, bob):
            expect(page.locator("#status")).to_have_attribute("data-state", "reconnecting")
        # the demo's lifespan (manager.lifespan) closes every connection with 1001 on SIGINT
        # (uvicorn alone would close with 1012); the client reconnects at once, and while the
        # server is down its attempts fail with 1006: the page keeps saying why it went away
        for page in (alice, bob):
            info = page.locator("#close-info")
            expect(info).to_contain_text("The server is shutting down (1001)")
            expect(info).to_contain_text("server unreachable")
            expect(info).to_have_attribute("data-code", "1001")
            # the server panel shows no stale numbers while the server is down
            expect(page.locator("#live")).to_have_attribute("data-live", "false")
            expect(page.locator("#srv-connections")).to_have_text("—")
        shot(alice, "restart-down-alice")
    try:
        with uvicorn_server(APP, env=SERVER_ENV, port=port):
            expect_joined(alice, "alice", "bob")
            expect_joined(bob, "alice", "bob")
            alice.fill("#text", "back again")
            alice.click("#send-btn")
            expect(bob.locator('#log .msg[data-kind="chat"]').last).to_contain_text("back again")
            assert stats(port)["total_connections"] == 2
    finally:
        alice.context.close()
        bob.context.close()


def test_a_paused_page_is_closed_as_stale_and_leaves_the_member_list(browser: Browser, port: int) -> None:
    alice = open_page(browser, port, "alice", "stale")
    zed = open_page(browser, port, "zed", "stale")
    try:
        expect_joined(alice, "alice", "zed")
        expect_joined(zed, "alice", "zed")
        cdp = zed.context.new_cdp_session(zed)
        cdp.send("Debugger.enable")
        cdp.send("Debugger.pause")  # zed's script stops at its next statement: no more pongs
        expect(alice.locator('#members li[data-user="zed"]')).to_have_count(0)
        expect(alice.locator("#log")).to_contain_text("zed left")
        expect(alice.locator("#members li")).to_have_count(1)
        assert stats(port)["lobbies"].get("stale") == 1
        shot(alice, "stale-alice")
        cdp.send("Debugger.resume")
        # once resumed, zed learns why it was closed (4004 stale) and comes back by itself
        expect(zed.locator("#close-info")).to_have_attribute("data-code", "4004")
        expect_joined(alice, "alice", "zed")
    finally:
        alice.context.close()
        zed.context.close()


def test_the_feed_shows_each_protection_act_on_a_simulated_client(browser: Browser, port: int) -> None:
    page = open_page(browser, port, "alice", "sims")
    stats_requests: list[str] = []
    page.on("request", lambda r: stats_requests.append(r.url) if "/stats" in r.url else None)
    try:
        expect_joined(page, "alice")
        page.click('#simulate button[data-kind="flooder"]')
        # the flooder's first messages get through, then the rate limit closes it
        expect(page.locator('#log .msg[data-kind="chat"]').first).to_contain_text("spam #1")
        closed = page.locator('#feed li[data-reason="rate_limited"]', has_text="flooder-1")
        expect(closed).to_contain_text("4005")
        expect(closed).to_contain_text("flooder-1 closed in sims: rate_limited")
        expect(page.locator('#members li[data-user="flooder-1"]')).to_have_count(0)
        page.click('#simulate button[data-kind="frozen"]')
        expect(page.locator('#members li[data-user="frozen-2"] .tag')).to_have_text("simulated")
        expect(page.locator('#feed li[data-reason="stale"]', has_text="frozen-2")).to_contain_text("4004")
        page.click('#simulate button[data-kind="nonreader"]')
        expect(page.locator('#feed li[data-reason="slow_consumer"]', has_text="nonreader-3")).to_contain_text(
            "4006"
        )
        expect(page.locator("#lat-summary")).to_contain_text("p50")
        expect(page.locator("#srv-backlogged")).to_have_text("0")  # its backlog went with it
        assert shot(page, "feed-desktop").stat().st_size > 0
        page.screenshot(path=str(ARTIFACTS / "feed-desktop-full.png"), full_page=True)
        assert stats_requests == []  # everything arrived over the WebSocket
    finally:
        page.context.close()


def test_at_375_px_nothing_overflows(browser: Browser, port: int) -> None:
    context = browser.new_context(
        viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True
    )
    page = context.new_page()
    try:
        page.goto(f"http://127.0.0.1:{port}/?name=alice&lobby=mobile{FAST}")
        expect_joined(page, "alice")
        page.click('#simulate button[data-kind="flooder"]')
        expect(page.locator('#feed li[data-reason="rate_limited"]', has_text="in mobile")).to_contain_text(
            "4005"
        )
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"the page is {width} px wide at 375 px"
        shot(page, "mobile-375-top")
        page.screenshot(path=str(ARTIFACTS / "mobile-375-full.png"), full_page=True)
    finally:
        context.close()


def test_leave_shows_a_neutral_state_and_the_favicon_is_served(browser: Browser, port: int) -> None:
    page = open_page(browser, port, "alice", "leave")
    icons: list[int] = []
    page.on("response", lambda r: icons.append(r.status) if r.url.endswith("/favicon.ico") else None)
    try:
        expect_joined(page, "alice")
        page.reload()  # the icon is fetched once per context; a reload asks again
        expect_joined(page, "alice")
        expect(page.locator("#latency")).to_contain_text("ms")
        page.click("#leave-btn")
        expect(page.locator("#status")).to_have_attribute("data-state", "idle")
        expect(page.locator("#status")).to_have_text("not connected")
        expect(page.locator("#latency")).to_have_text("latency —")
        expect(page.locator("#close-info")).to_have_text("")
        expect(page.locator("#live")).to_have_attribute("data-live", "false")
        expect(page.locator("#members li")).to_have_count(0)
        shot(page, "left-desktop")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/favicon.ico", timeout=5) as r:
            assert r.status == 200
        assert all(status == 200 for status in icons)
    finally:
        page.context.close()


def test_presence_joins_and_leaves_show_in_the_member_list(browser: Browser, port: int) -> None:
    alice = open_page(browser, port, "alice", "presence")
    bob = None
    try:
        expect_joined(alice, "alice")
        bob = open_page(browser, port, "bob", "presence")
        expect_joined(bob, "alice", "bob")
        expect(alice.locator('#members li[data-user="bob"][data-presence="joined"]')).to_be_visible()
        expect(alice.locator("#log")).to_contain_text("bob joined")
        bob.context.close()
        bob = None
        expect(alice.locator("#members li.left")).to_have_text("bob left")
        shot(alice, "presence-alice")
        expect(alice.locator("#log")).to_contain_text("bob left")
    finally:
        alice.context.close()
        if bob is not None:
            bob.context.close()
