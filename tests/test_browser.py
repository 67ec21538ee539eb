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
        # the server panel is fed by /stats
        expect(alice.locator("#srv-connections")).to_have_text("2 / 500")
        expect(alice.locator("#srv-lobby-list")).to_contain_text("chat: 2")
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
        # server is down its attempts fail with 1006
        assert alice.evaluate("window.wsmClient.lastClose.code") in (1001, 1006, 1012)
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
