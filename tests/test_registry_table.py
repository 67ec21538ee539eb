"""The registry's open-addressed tables (csrc/table.c) at sizes where they
grow several times and deletions shift long probe runs back.

Ids are looked up through equal but distinct str objects of every storage
kind (ASCII, Latin-1, UCS-2, UCS-4), so the key comparison cannot rely on
identity; run it under the ASan build too (DESIGN.md).
"""

from __future__ import annotations

import random

from wsmanager import ConnectionManager

N = 3000
# one id of each PEP 393 kind, so equal ids of different objects are compared
KINDS = ("u", "é", "ü\u20ac", "\U0001f600")


class Sock:
    """A websocket stand-in: the core keys connections by identity."""


def uid(i: int) -> str:
    return f"{KINDS[i % len(KINDS)]}{i}"


def copy(text: str) -> str:
    """An equal str that is another object."""
    return (text + ".")[:-1]


def test_many_entries_survive_growth_and_random_removal() -> None:
    m = ConnectionManager(max_connections=N, max_per_lobby=N, ping_interval=None)
    rng = random.Random(7)
    socks = [Sock() for _ in range(N)]
    for i, ws in enumerate(socks):
        assert m._reserve(ws, copy(f"L{i % 37}"), copy(uid(i))) == ""
        assert m._commit(ws)
    assert len(m) == N
    order = list(range(N))
    rng.shuffle(order)
    gone: set[int] = set()
    for step, i in enumerate(order):
        assert m.disconnect(socks[i]) == (f"L{i % 37}", uid(i))
        gone.add(i)
        if step % 97 == 0:
            # every entry is still found (or not) after the shifts so far
            for j in range(N):
                assert (socks[j] in m) == (j not in gone)
                assert m.is_user_connected(copy(uid(j))) == (j not in gone)
    assert len(m) == 0
    assert m.get_stats()["active_lobbies"] == 0
    assert not m.is_user_connected(uid(0))


def test_lobby_members_found_by_equal_ids_of_every_kind() -> None:
    m = ConnectionManager(max_connections=100, max_per_lobby=100, ping_interval=None)
    for k, kind in enumerate(KINDS):
        ws = Sock()
        assert m._reserve(ws, copy(f"lobby{kind}"), copy(f"user{kind}")) == ""
        assert m._commit(ws)
        assert m.get_lobby_users(copy(f"lobby{kind}")) == {f"user{kind}"}
        assert m.is_user_connected(copy(f"user{kind}"))
        # same length and kind, other code units: no match
        assert not m.is_user_connected(f"usex{kind}")
        assert m.get_stats()["connected_users"] == k + 1
