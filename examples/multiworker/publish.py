"""Publish into the multi-worker chat from any process: a script, a cron job,
a Celery task. It holds no socket and takes no capacity.

    REDIS_URL=redis://127.0.0.1:6379/0 python -m examples.multiworker.publish room "maintenance at 5"
    python -m examples.multiworker.publish --sync --user alice room "just for alice"

Every worker serving a member of ``room`` (or a connection of ``alice``)
delivers the message; the others never see it. ``--sync`` uses
``SyncPublisher`` (no event loop: what a Celery task or a plain script
calls); without it, ``Publisher`` (asyncio). Prints what the call returned:
the number of connections the broadcast was handed to, or whether the user
was online. Same ``REDIS_URL`` (a comma list for several Redis servers) and
``CHAT_NAMESPACE`` as ``examples/multiworker/app.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from wsmanager.backends.redis import Publisher, SyncPublisher

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = os.environ.get("CHAT_NAMESPACE", "chat")


def announce_sync(lobby: str, text: str, user: str | None) -> str:
    with SyncPublisher(REDIS_URL, namespace=NAMESPACE) as publisher:
        message = {"type": "chat", "from": "server", "text": text}
        if user is not None:
            return f"online: {publisher.send_to_user(user, {**message, 'type': 'dm'})}"
        users = sorted(publisher.get_lobby_users(lobby))
        return f"delivered to {publisher.broadcast_to_lobby(lobby, message)} connection(s) of {users}"


async def announce(lobby: str, text: str, user: str | None) -> str:
    async with Publisher(REDIS_URL, namespace=NAMESPACE) as publisher:
        message = {"type": "chat", "from": "server", "text": text}
        if user is not None:
            return f"online: {await publisher.send_to_user(user, {**message, 'type': 'dm'})}"
        users = sorted(await publisher.get_lobby_users(lobby))
        return f"delivered to {await publisher.broadcast_to_lobby(lobby, message)} connection(s) of {users}"


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("lobby")
    parser.add_argument("text")
    parser.add_argument("--user", help="send to this user instead of the lobby")
    parser.add_argument("--sync", action="store_true", help="use SyncPublisher (no event loop)")
    args = parser.parse_args()
    if args.sync:
        print(announce_sync(args.lobby, args.text, args.user))
    else:
        print(asyncio.run(announce(args.lobby, args.text, args.user)))


if __name__ == "__main__":
    main()
