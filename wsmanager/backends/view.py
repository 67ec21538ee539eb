"""ClusterView: the connection counts of every node of a cluster, kept by a
clustered backend (``wsmanager.backends.redis``) and re-exported by
:mod:`wsmanager.backends`. Its own module so that the backends import it
without importing each other."""

from __future__ import annotations

__all__ = ["ClusterView"]


class ClusterView:
    """Connections of every node: node -> cid -> (lobby, user), with counts.

    Kept by a clustered backend from the bus' presence events; every count is
    maintained on change, so reads are O(1) (``lobby_users`` is O(users in the
    lobby)).
    """

    __slots__ = ("lobbies", "lobby_users", "nodes", "total", "users")

    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, tuple[str, str]]] = {}
        self.total = 0
        self.lobbies: dict[str, int] = {}
        self.users: dict[str, int] = {}
        self.lobby_users: dict[str, dict[str, int]] = {}

    def add(self, node: str, cid: str, lobby: str, user: str) -> None:
        conns = self.nodes.get(node)
        if conns is None:
            conns = self.nodes[node] = {}
        elif cid in conns:
            return
        conns[cid] = (lobby, user)
        self.total += 1
        self.lobbies[lobby] = self.lobbies.get(lobby, 0) + 1
        self.users[user] = self.users.get(user, 0) + 1
        members = self.lobby_users.get(lobby)
        if members is None:
            members = self.lobby_users[lobby] = {}
        members[user] = members.get(user, 0) + 1

    def remove(self, node: str, cid: str) -> None:
        conns = self.nodes.get(node)
        if conns is None:
            return
        entry = conns.pop(cid, None)
        if entry is None:
            return
        if not conns:
            del self.nodes[node]
        self._unaccount(*entry)

    def _unaccount(self, lobby: str, user: str) -> None:
        self.total -= 1
        if self.lobbies[lobby] <= 1:
            del self.lobbies[lobby]
        else:
            self.lobbies[lobby] -= 1
        if self.users[user] <= 1:
            del self.users[user]
        else:
            self.users[user] -= 1
        members = self.lobby_users[lobby]
        if members[user] <= 1:
            del members[user]
            if not members:
                del self.lobby_users[lobby]
        else:
            members[user] -= 1

    def drop_node(self, node: str) -> None:
        for lobby, user in self.nodes.pop(node, {}).values():
            self._unaccount(lobby, user)

    def replace_node(self, node: str, entries: list[tuple[str, str, str]]) -> None:
        self.drop_node(node)
        for cid, lobby, user in entries:
            self.add(node, cid, lobby, user)

    def lobby_user_count(self, lobby: str, user: str) -> int:
        members = self.lobby_users.get(lobby)
        return members.get(user, 0) if members else 0
