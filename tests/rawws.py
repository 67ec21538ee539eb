"""Raw-socket WebSocket clients for misbehaving on purpose: never reading,
dropping TCP without a close frame."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct


async def handshake(port: int, path: str, *, rcvbuf: int | None = None) -> socket.socket:
    """Open a WebSocket to 127.0.0.1:port/path and return the raw non-blocking socket.

    ``rcvbuf`` shrinks the kernel receive buffer (set before connecting, so
    the advertised TCP window stays small): a client that then never reads
    stalls the server's sends quickly.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 1)  # byte by byte: leave frames unread
            if not chunk:
                raise ConnectionError("closed during the handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
    except BaseException:
        sock.close()
        raise
    return sock


def frame(payload: bytes, opcode: int = 1, *, mask: bytes | None = None) -> bytes:
    """A masked client frame (a random mask unless one is given; an all-zero
    mask is legal and leaves the payload as is, which load generators use)."""
    mask = os.urandom(4) if mask is None else mask
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    if mask == ZERO_MASK:
        return head + mask + payload
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


ZERO_MASK = b"\0\0\0\0"


async def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """Read one unfragmented server frame: ``(opcode, payload)`` (8 is a
    close: its payload starts with the code, 2 bytes big-endian)."""
    loop = asyncio.get_running_loop()

    async def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await loop.sock_recv(sock, n - len(data))
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        return data

    b0, b1 = await exactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await exactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await exactly(8))
    return b0 & 0x0F, await exactly(n)


def reset(sock: socket.socket) -> None:
    """Drop the TCP connection with an RST: no close frame, no FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
