"""A minimal gRPC-over-HTTP/2 client on a raw ``ssl`` socket, for TLS tests.

gRPC's own client cannot be held to one TLS version, so the TLS tests speak
HTTP/2 themselves: the connection preface, one unary call, and just enough
HPACK to read the answer (static-table names, literal strings; gRPC core does
not Huffman-code the status fields it sends, and a Huffman string fails loudly).
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass, field

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _GOAWAY = 0, 1, 3, 4, 7
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
# The entries of the HPACK static table (RFC 7541, appendix A) that gRPC answers use.
_STATIC = {8: (":status", "200"), 31: ("content-type", ""), 13: (":status", "500")}


@dataclass
class Answer:
    """What the server sent on the call's stream (headers and trailers merged)."""

    version: str | None = None
    alpn: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    frames: list[int] = field(default_factory=list)
    closed_without_answer: bool = False

    @property
    def grpc_status(self) -> int | None:
        value = self.headers.get("grpc-status")
        return None if value is None else int(value)


def tls_context(*, version: ssl.TLSVersion, ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A client context pinned to one TLS version, offering ALPN h2, with a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = context.maximum_version = version
    context.load_verify_locations(ca)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream)
        + payload
    )


def _literal(index: int, value: bytes) -> bytes:
    # Literal header field without indexing, indexed name (4-bit prefix; index < 15 here).
    return bytes([index, len(value)]) + value


def _request_headers(path: str, authority: str) -> bytes:
    return (
        b"\x83"  # :method POST
        + b"\x87"  # :scheme https
        + _literal(4, path.encode())  # :path
        + _literal(1, authority.encode())  # :authority
        + b"\x0f\x10"  # content-type (static index 31) ...
        + bytes([16])
        + b"application/grpc"
        + b"\x00\x02te\x08trailers"
    )


def _integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    mask = (1 << prefix_bits) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _string(data: bytes, pos: int) -> tuple[str, int]:
    huffman = bool(data[pos] & 0x80)
    length, pos = _integer(data, pos, 7)
    if huffman:
        raise AssertionError("a Huffman-coded header arrived; extend tests/h2_raw.py")
    return data[pos : pos + length].decode(), pos + length


def decode_headers(block: bytes, table: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Decode an HPACK block (no Huffman), updating the dynamic `table` in place."""

    def entry(index: int) -> tuple[str, str]:
        if index in _STATIC:
            return _STATIC[index]
        if index > 61:
            return table[index - 62]
        raise AssertionError(f"static table index {index} is not in tests/h2_raw.py")

    fields = []
    pos = 0
    while pos < len(block):
        byte = block[pos]
        if byte & 0x80:  # indexed field
            index, pos = _integer(block, pos, 7)
            fields.append(entry(index))
            continue
        if byte & 0xE0 == 0x20:  # dynamic table size update
            _, pos = _integer(block, pos, 5)
            continue
        indexing = bool(byte & 0x40)
        index, pos = _integer(block, pos, 6 if indexing else 4)
        if index:
            name = entry(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        fields.append((name, value))
        if indexing:
            table.insert(0, (name, value))
    return fields


def unary_call(
    context: ssl.SSLContext, port: int, path: str, message: bytes = b"", *, timeout_s: float = 10
) -> Answer:
    """Connect, handshake, send one unary gRPC call on stream 1 and read its answer.

    A server that closes the connection before answering gives
    ``closed_without_answer``; a handshake the server aborts raises ``ssl.SSLError``.
    """
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        answer = Answer(version=tls.version(), alpn=tls.selected_alpn_protocol())
        _exchange(tls, answer, path, message)
        return answer


def _exchange(tls: ssl.SSLSocket, answer: Answer, path: str, message: bytes) -> None:
    table: list[tuple[str, str]] = []
    body = b"\x00" + struct.pack(">I", len(message)) + message
    try:
        tls.sendall(
            _PREFACE
            + _frame(_SETTINGS, 0, 0, b"")
            + _frame(_HEADERS, _END_HEADERS, 1, _request_headers(path, "127.0.0.1"))
            + _frame(_DATA, _END_STREAM, 1, body)
        )
        buffer = b""
        while True:
            while len(buffer) < 9 or len(buffer) < 9 + int.from_bytes(buffer[:3], "big"):
                chunk = tls.recv(65536)
                if not chunk:
                    answer.closed_without_answer = answer.grpc_status is None
                    return
                buffer += chunk
            length = int.from_bytes(buffer[:3], "big")
            kind, flags = buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
            answer.frames.append(kind)
            if kind == _SETTINGS and not flags & _ACK:
                tls.sendall(_frame(_SETTINGS, _ACK, 0, b""))
            elif kind == _HEADERS and stream == 1:
                answer.headers.update(decode_headers(payload, table))
                if flags & _END_STREAM:
                    return
            elif kind in (_RST_STREAM, _GOAWAY):
                answer.closed_without_answer = answer.grpc_status is None
                return
    except (ssl.SSLError, ConnectionError):
        answer.closed_without_answer = answer.grpc_status is None
        return
