"""ZMTP 3.0 by hand (NULL mechanism) for tests that must send what libzmq never would: a
multipart message that never ends (libzmq's own sockets keep an unfinished message in the
sender until its last frame), frames split at any byte, or a handshake that stops half-way."""

from __future__ import annotations

import select
import socket
import struct

# libzmq's own greeting: 0xFF, padding, 0x7F; version 3.0; mechanism NULL; as-server 0
GREETING = b"\xff" + bytes(7) + b"\x01\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32)
FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04


def command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes([len(name)]) + name + body
    if len(data) < 256:
        return bytes([FLAG_COMMAND, len(data)]) + data
    return bytes([FLAG_COMMAND | FLAG_LONG]) + struct.pack(">Q", len(data)) + data


def ready(socket_type: bytes = b"DEALER") -> bytes:
    return command(b"READY", bytes([11]) + b"Socket-Type" + struct.pack(">I", len(socket_type))
                   + socket_type)


def frame(data: bytes, more: bool = False) -> bytes:
    flags = FLAG_MORE if more else 0
    if len(data) < 256:
        return bytes([flags, len(data)]) + data
    return bytes([flags | FLAG_LONG]) + struct.pack(">Q", len(data)) + data


def message(frames: list[bytes]) -> bytes:
    return b"".join(frame(f, more=i < len(frames) - 1) for i, f in enumerate(frames))


def connect(endpoint: str, timeout_s: float = 5.0, handshake: bool = True) -> socket.socket:
    """A TCP connection to a ZeroMQ ROUTER at `endpoint` (tcp://HOST:PORT), greeted as a
    DEALER and past the handshake (or left silent with handshake=False). Every call on it has
    `timeout_s`. Raises OSError / TimeoutError."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    if handshake:
        # libzmq refuses a message that comes before its own READY went out (a race it loses
        # when everything arrives in one read): greet, read its greeting and READY, then talk
        sock.sendall(GREETING + ready())
        _read_exactly(sock, len(GREETING))
        flags, size = _read_exactly(sock, 2)
        if flags & FLAG_LONG:
            size = struct.unpack(">Q", bytes([size]) + _read_exactly(sock, 7))[0]
        _read_exactly(sock, size)
    return sock


def _read_exactly(sock: socket.socket, nbytes: int) -> bytes:
    data = b""
    while len(data) < nbytes:
        chunk = sock.recv(nbytes - len(data))
        if not chunk:
            raise ConnectionResetError("closed during the handshake")
        data += chunk
    return data


def hung_up(sock: socket.socket) -> bool:
    """Whether the peer closed `sock`; what it sent before (greetings, heartbeats) is dropped."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536):
                return True
    except OSError:
        return True
    return False
