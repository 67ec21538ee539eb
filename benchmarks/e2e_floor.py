"""The floor of bench_e2e.py: the least a server can do per delivered message.

    python benchmarks/e2e_floor.py PORT [CPU]

A selector loop over raw non-blocking sockets (no asyncio, no ASGI, no JSON).
It answers the WebSocket handshake (RFC 6455 section 4.2.2) of
``GET /ws/<lobby>?...``; for each text frame a member sends, it frames the
payload once, unchanged, and writes that one pre-built frame to every member
of the sender's lobby with one ``socket.send()`` each. Its server CPU per
delivered message is what that send loop costs on this machine: bench_e2e.py
prints a real server's figure against it, measured in the same run.
"""

from __future__ import annotations

import base64
import hashlib
import os
import selectors
import socket
import struct
import sys

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class Conn:
    __slots__ = ("buf", "lobby", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.lobby: str | None = None  # None until the handshake is done


def server_frame(payload: bytes, opcode: int = 1) -> bytes:
    """An unmasked, final frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def unmask(payload: bytes, mask: bytes) -> bytes:
    if mask == b"\0\0\0\0":
        return payload
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def send_one(sock: socket.socket, data: bytes) -> None:
    """One ``send()``; the rare short write (a full socket buffer) finishes blocking."""
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        return
    if sent < len(data):
        sock.setblocking(True)
        try:
            sock.sendall(data[sent:])
        except OSError:
            pass
        finally:
            sock.setblocking(False)


def handshake(conn: Conn, lobbies: dict[str, list[socket.socket]]) -> bool:
    """Answer the upgrade request once it is complete; False until then."""
    end = conn.buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = bytes(conn.buf[:end]).decode("latin-1").split("\r\n")
    del conn.buf[: end + 4]
    path = head[0].split(" ")[1]
    key = ""
    for line in head[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    conn.sock.sendall(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
        ).encode()
    )
    conn.lobby = path.split("?", 1)[0].rsplit("/", 1)[-1]
    lobbies.setdefault(conn.lobby, []).append(conn.sock)
    return True


def frames(conn: Conn, lobbies: dict[str, list[socket.socket]]) -> bool:
    """Handle the complete client frames in the buffer; False once the client closed."""
    buf = conn.buf
    pos, n = 0, len(buf)
    alive = True
    while n - pos >= 6:
        b0, b1 = buf[pos], buf[pos + 1]
        size, hl = b1 & 0x7F, 2
        if size == 126:
            if n - pos < 8:
                break
            size, hl = struct.unpack_from("!H", buf, pos + 2)[0], 4
        elif size == 127:
            if n - pos < 14:
                break
            size, hl = struct.unpack_from("!Q", buf, pos + 2)[0], 10
        if n - pos < hl + 4 + size:
            break
        mask = bytes(buf[pos + hl : pos + hl + 4])
        start = pos + hl + 4
        payload = unmask(bytes(buf[start : start + size]), mask)
        pos = start + size
        opcode = b0 & 0x0F
        if opcode == 1 and conn.lobby is not None:
            frame = server_frame(payload)  # once per broadcast
            for member in lobbies.get(conn.lobby, ()):
                send_one(member, frame)  # one send() per member
        elif opcode == 9:
            send_one(conn.sock, server_frame(payload, 10))
        elif opcode == 8:
            send_one(conn.sock, server_frame(payload[:2], 8))
            alive = False
            break
    del buf[:pos]
    return alive


def drop(sel: selectors.BaseSelector, conn: Conn, lobbies: dict[str, list[socket.socket]]) -> None:
    sel.unregister(conn.sock)
    if conn.lobby is not None:
        members = lobbies.get(conn.lobby, [])
        if conn.sock in members:
            members.remove(conn.sock)
    conn.sock.close()


def serve(port: int) -> None:
    lobbies: dict[str, list[socket.socket]] = {}
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", port), backlog=4096)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is None:
                while True:
                    try:
                        sock, _addr = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio does
                    sel.register(sock, selectors.EVENT_READ, Conn(sock))
                continue
            conn: Conn = key.data
            try:
                data = conn.sock.recv(262_144)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                drop(sel, conn, lobbies)
                continue
            conn.buf += data
            if conn.lobby is None and not handshake(conn, lobbies):
                continue
            if not frames(conn, lobbies):
                drop(sel, conn, lobbies)


if __name__ == "__main__":
    if len(sys.argv) > 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(sys.argv[2])})
    serve(int(sys.argv[1]))
