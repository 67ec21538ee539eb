"""ClusterView: the connection counts of every node of a cluster, kept by a
clustered backend (``wsmanager.backends.redis``) and re-exported by
:mod:`wsmanager.backends`. Its own module so that the backends import it
without importing each other."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ClusterView"]


class ClusterView:
    """Connections of every node: node -> cid -> (user, lobbies), with counts.

    A connection (``cid``, unique per node) has one user and is a member of
    zero or more lobbies (rooms: its first lobby, the ones it joined).
    ``total`` and ``users`` count connections; ``lobbies`` and
    ``lobby_users`` count memberships. Kept by a clustered backend from the
    bus' presence events; every count is maintained on change, so reads are
    O(1) (``lobby_users`` is O(users in the lobby)). The methods that change
    memberships return the lobbies whose membership changed, for presence.
    """

    __slots__ = ("lobbies", "lobby_users", "nodes", "total", "users")

    def __init__(self) -> None:
        #: node -> cid -> (user, lobbies of that connection, in joining order)
        self.nodes: dict[str, dict[str, tuple[str, list[str]]]] = {}
        self.total = 0
        self.lobbies: dict[str, int] = {}
        self.users: dict[str, int] = {}
        self.lobby_users: dict[str, dict[str, int]] = {}

    def add(self, node: str, cid: str, lobby: str | Iterable[str], user: str) -> list[str]:
        """A connection of ``user`` in ``lobby`` (one lobby, or several); the
        lobbies it entered (none when ``cid`` is already known)."""
        conns = self.nodes.get(node)
        if conns is None:
            conns = self.nodes[node] = {}
        elif cid in conns:
            return []
        lobbies: list[str] = []
        conns[cid] = (user, lobbies)
        self.total += 1
        self.users[user] = self.users.get(user, 0) + 1
        for name in (lobby,) if isinstance(lobby, str) else lobby:
            if name not in lobbies:
                lobbies.append(name)
                self._enter(name, user)
        return list(lobbies)

    def join(self, node: str, cid: str, lobby: str) -> bool:
        """Connection ``cid`` of ``node`` entered ``lobby``: True if it was not
        a member (False also for an unknown connection)."""
        entry = self.nodes.get(node, {}).get(cid)
        if entry is None or lobby in entry[1]:
            return False
        entry[1].append(lobby)
        self._enter(lobby, entry[0])
        return True

    def leave(self, node: str, cid: str, lobby: str) -> bool:
        """Connection ``cid`` of ``node`` left ``lobby`` (it stays connected):
        True if it was a member."""
        entry = self.nodes.get(node, {}).get(cid)
        if entry is None or lobby not in entry[1]:
            return False
        entry[1].remove(lobby)
        self._exit(lobby, entry[0])
        return True

    def remove(self, node: str, cid: str) -> list[str]:
        """Connection ``cid`` of ``node`` is gone; the lobbies it was in."""
        conns = self.nodes.get(node)
        if conns is None:
            return []
        entry = conns.pop(cid, None)
        if entry is None:
            return []
        if not conns:
            del self.nodes[node]
        self._unaccount(*entry)
        return entry[1]

    def lobbies_of(self, node: str) -> set[str]:
        """The lobbies in which ``node`` has at least one member."""
        return {lobby for _user, lobbies in self.nodes.get(node, {}).values() for lobby in lobbies}

    def _enter(self, lobby: str, user: str) -> None:
        self.lobbies[lobby] = self.lobbies.get(lobby, 0) + 1
        members = self.lobby_users.get(lobby)
        if members is None:
            members = self.lobby_users[lobby] = {}
        members[user] = members.get(user, 0) + 1

    def _exit(self, lobby: str, user: str) -> None:
        if self.lobbies[lobby] <= 1:
            del self.lobbies[lobby]
        else:
            self.lobbies[lobby] -= 1
        members = self.lobby_users[lobby]
        if members[user] <= 1:
            del members[user]
            if not members:
                del self.lobby_users[lobby]
        else:
            members[user] -= 1

    def _unaccount(self, user: str, lobbies: list[str]) -> None:
        self.total -= 1
        if self.users[user] <= 1:
            del self.users[user]
        else:
            self.users[user] -= 1
        for lobby in lobbies:
            self._exit(lobby, user)

    def drop_node(self, node: str) -> set[str]:
        """Forget every connection of ``node``; the lobbies they were in."""
        changed: set[str] = set()
        for user, lobbies in self.nodes.pop(node, {}).values():
            self._unaccount(user, lobbies)
            changed.update(lobbies)
        return changed

    def replace_node(self, node: str, entries: Iterable[tuple[str, str | Iterable[str], str]]) -> set[str]:
        """Make ``node``'s connections exactly ``entries`` ((cid, lobby or
        lobbies, user) each); the lobbies whose membership may have changed."""
        changed = self.drop_node(node)
        for cid, lobby, user in entries:
            changed.update(self.add(node, cid, lobby, user))
        return changed

    def lobby_user_count(self, lobby: str, user: str) -> int:
        """Memberships of ``user``'s connections in ``lobby``."""
        members = self.lobby_users.get(lobby)
        return members.get(user, 0) if members else 0
