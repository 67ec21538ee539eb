"""A client like the seed's TypeScript one, run as a subprocess: it answers every
``health_ping`` with a ``health_pong`` and prints what happens on stdout.

    python -m tests.pong_client ws://127.0.0.1:PORT/ws/lobby?token=user:x
"""

from __future__ import annotations

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


async def main(url: str) -> None:
    # no protocol-level keepalive: only the application's heartbeat is tested
    async with connect(url, ping_interval=None) as ws:
        print("connected", flush=True)
        try:
            async for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "health_ping":
                    await ws.send(json.dumps({"type": "health_pong", "timestamp": message["timestamp"]}))
                    print("pong", flush=True)
        except ConnectionClosed:
            pass
        print("closed", ws.close_code, ws.close_reason, flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
