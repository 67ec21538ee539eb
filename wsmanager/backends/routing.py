"""Where a lobby's or a user's messages travel in a Redis backplane: channel
names, and which of several Redis servers carries a channel.

Shared by :class:`wsmanager.backends.redis.RedisBackend` (the nodes) and
:class:`wsmanager.backends.redis.Publisher` (any process), so that both agree
on every channel without talking to each other.

* Channel of lobby ``L`` in namespace ``ns``: ``ns:l:L``; of user ``U``:
  ``ns:u:U`` (UTF-8 bytes; no ``{hash tag}``, so that a Redis Cluster could
  spread them over its slots).
* Shard: with several Redis URLs, a channel lives on the URL chosen by
  rendezvous (highest random weight) hashing: the URL whose
  ``blake2b(url + "\\0" + channel)`` is highest. Adding or removing a URL
  moves only the channels of that URL, and every process computes the same
  answer from the same list of URLs (the order does not matter).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

__all__ = [
    "RECORD",
    "frame_head",
    "lobby_channel",
    "lobby_record",
    "parse_urls",
    "shard_of",
    "user_channel",
    "user_record",
]

# The messages on lobby and user channels: b"M" + u32 length + sender id
# (frame_head), then one or more records in the order sent: kind (b"L" lobby,
# b"U" user), u32 lengths of target, excluded user, text; then the target
# id, the excluded user id (lobby only) and the text (UTF-8). A receiver skips
# the messages of its own sender id.
RECORD = struct.Struct("!cIII")
_U32 = struct.Struct("!I")


def frame_head(sender: bytes) -> bytes:
    """The start of every message a sender (a node, a Publisher) publishes."""
    return b"M" + _U32.pack(len(sender)) + sender


def lobby_record(lobby: str, text: str, exclude_user_id: str | None) -> bytes:
    """One broadcast to ``lobby`` (``text``: the serialized message)."""
    target = lobby.encode()
    excl = exclude_user_id.encode() if exclude_user_id is not None else b""
    data = text.encode()
    return RECORD.pack(b"L", len(target), len(excl), len(data)) + target + excl + data


def user_record(user: str, text: str) -> bytes:
    """One direct message to ``user``."""
    target = user.encode()
    data = text.encode()
    return RECORD.pack(b"U", len(target), 0, len(data)) + target + data


def lobby_channel(namespace: str, lobby: str) -> bytes:
    """The pub/sub channel that carries ``lobby``'s broadcasts."""
    return f"{namespace}:l:{lobby}".encode()


def user_channel(namespace: str, user: str) -> bytes:
    """The pub/sub channel that carries ``user``'s direct messages."""
    return f"{namespace}:u:{user}".encode()


def shard_of(channel: bytes, urls: Sequence[str]) -> int:
    """Index in ``urls`` of the Redis that carries ``channel`` (rendezvous
    hashing; 0 when there is one URL). Raises ValueError for no URL."""
    if not urls:
        raise ValueError("no Redis URL")
    if len(urls) == 1:
        return 0
    best, best_score = 0, b""
    for i, url in enumerate(urls):
        score = hashlib.blake2b(url.encode() + b"\0" + channel, digest_size=8).digest()
        if score > best_score:
            best, best_score = i, score
    return best


def parse_urls(url: str | Sequence[str]) -> list[str]:
    """One or several Redis URLs: a list, or a string with URLs separated by
    commas (``WSMANAGER_REDIS_URL="redis://a:6379/0,redis://b:6379/0"``).
    The first is the primary. Raises ValueError when there is none, TypeError
    for anything but a str or a sequence of str."""
    if isinstance(url, str):
        urls = [u.strip() for u in url.split(",")]
    elif isinstance(url, Sequence) and all(isinstance(u, str) for u in url):
        urls = [u.strip() for u in url]
    else:
        raise TypeError(f"url must be a str or a sequence of str, got {type(url).__name__}")
    urls = [u for u in urls if u]
    if not urls:
        raise ValueError("url: at least one Redis URL is needed")
    if len(set(urls)) != len(urls):
        raise ValueError(f"url: the same Redis URL is given twice: {urls}")
    return urls
