"""What an unauthenticated caller can throw at a server, as tools for tests and measurements.

Each tool runs against a real process on loopback and is bounded in count and
time: idle connections (plain TCP, or TLS that sends nothing after its
handshake), a gRPC message far larger than it says it is allowed to be, and
what a process holds while that goes on (/proc: resident memory, its peak,
open file descriptors). `python -m tests.measure_floods` runs them by hand.
"""

from __future__ import annotations

import asyncio
import os
import resource
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame

SIGN = "/outrider.ca.v1.CertificateAuthority/Sign"
GET_BUNDLE = "/outrider.ca.v1.CertificateAuthority/GetBundle"
PREFIX_BYTES = 5  # an empty gRPC message: its length prefix alone


def rss_kib(pid: int) -> int:
    return _status(pid, "VmRSS")


def peak_rss_kib(pid: int) -> int:
    return _status(pid, "VmHWM")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def left_at_once(sock: socket.socket, address: str, reset: bool = False) -> None:
    """A connection on `sock` (a pod's, say) to `address` (host:port), closed the moment it
    is made, before a byte: with a FIN, or (`reset`) an RST, as an app that gives up at once
    or crashes leaves it."""
    host, port = address.rsplit(":", 1)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


def _status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise KeyError(key)


def raise_own_fd_limit() -> None:
    """The attacker needs descriptors too: take the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Flood:
    """Connections that were opened (and, with TLS, handshaken) and now send nothing."""

    sockets: list[socket.socket] = field(default_factory=list)
    failed: int = 0  # refused, reset or closed before the handshake finished
    closed: set[socket.socket] = field(default_factory=set)  # by the server, since

    def closed_by_peer(self, within: float) -> int:
        """How many of `sockets` the server has closed so far, watching for `within` seconds
        (less once all are closed)."""
        deadline = time.monotonic() + within
        while len(self.closed) < len(self.sockets) and time.monotonic() < deadline:
            alive = {sock.fileno(): sock for sock in self.sockets if sock not in self.closed}
            poll = select.poll()  # not select(): a flood's descriptors go past 1024
            for fd in alive:
                poll.register(fd, select.POLLIN)
            wait_ms = max(0.0, deadline - time.monotonic()) * 1000
            ready = [alive[fd] for fd, _ in poll.poll(wait_ms)]
            self.closed.update(sock for sock in ready if _closed(sock))
        return len(self.closed)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except ssl.SSLWantReadError:
        return False  # TLS records (tickets, settings) that carry no application data
    except (ssl.SSLError, OSError):
        return True


@contextmanager
def idle_connections(
    port: int, count: int, *, tls: ssl.SSLContext | None = None, timeout: float = 5.0
) -> Iterator[Flood]:
    """`count` connections to 127.0.0.1:`port`, closed on exit.

    With `tls` each one finishes its handshake first, then sends nothing.
    """
    flood = Flood()
    try:
        for _ in range(count):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_hostname="localhost")
                sock.setblocking(False)
                flood.sockets.append(sock)
            except (OSError, ssl.SSLError):
                flood.failed += 1
        yield flood
    finally:
        for sock in flood.sockets:
            sock.close()


@dataclass
class GrpcAnswer:
    """What a sender of an oversized gRPC message saw."""

    status: int | None  # grpc-status, None if the server never answered one
    message: str | None
    sent: int  # message bytes the server's flow control let through
    reset: bool  # the server reset the stream or closed the connection


def oversized_call(
    port: int,
    context: ssl.SSLContext,
    declared: int,
    *,
    send_at_most: int,
    path: str = SIGN,
    timeout: float = 10.0,
) -> GrpcAnswer:
    """Start a gRPC call whose message says it is `declared` bytes long and send its
    body (zeros) until the server answers, resets, stops granting window, or
    `send_at_most` bytes are out."""
    sock, conn = _h2_client(port, context, timeout)
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, _request_headers(path))
    conn.send_data(stream, b"\0" + struct.pack(">I", declared))
    answer = GrpcAnswer(None, None, 0, False)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not answer.reset and answer.status is None:
            sock.sendall(conn.data_to_send())
            window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if window > 0 and answer.sent < send_at_most:
                chunk = min(window, send_at_most - answer.sent)
                conn.send_data(stream, bytes(chunk))
                answer.sent += chunk
                if not select.select([sock], [], [], 0)[0]:
                    continue
            elif not select.select([sock], [], [], min(1.0, deadline - time.monotonic()))[0]:
                if answer.sent >= send_at_most:
                    break  # all sent, no answer: a server that buffers and waits for more
                continue
            _receive(sock, conn, stream, answer)
    finally:
        sock.close()
    return answer


@dataclass
class Streams:
    """What the server did with calls left open on one connection."""

    refused: list[int]  # stream ids reset with REFUSED_STREAM
    closed: bool  # the server ended the connection


def unfinished_calls(
    port: int,
    context: ssl.SSLContext,
    count: int,
    *,
    header_bytes: int = 0,
    path: str = SIGN,
    within: float = 1.0,
) -> Streams:
    """Open `count` calls on one connection, each with half a small message, and
    finish none; `header_bytes` adds one header that long to each."""
    sock, conn = _h2_client(port, context)
    extra = [("x-padding", "a" * header_bytes)] if header_bytes else []
    for _ in range(count):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, _request_headers(path) + extra)
        conn.send_data(stream, b"\0" + struct.pack(">I", 100) + bytes(10))
    result = Streams([], False)
    deadline = time.monotonic() + within
    try:
        sock.sendall(conn.data_to_send())
        while not result.closed and time.monotonic() < deadline:
            if not select.select([sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            data = sock.recv(65536)
            if not data:
                result.closed = True
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.StreamReset) and event.error_code == 7:
                    result.refused.append(event.stream_id)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    result.closed = True
            sock.sendall(conn.data_to_send())
    except (OSError, ssl.SSLError):
        result.closed = True
    finally:
        sock.close()
    return result


def endless_header_block(
    port: int, context: ssl.SSLContext, continuations: int, *, within: float = 1.0
) -> bool:
    """Send a HEADERS frame and `continuations` CONTINUATION frames of 16 KiB, none
    ending the block (a CONTINUATION flood); True if the server closed the connection."""
    sock, conn = _h2_client(port, context)
    frames = [HeadersFrame(1, bytes(16_384))]
    frames += [ContinuationFrame(1, bytes(16_384)) for _ in range(continuations)]
    return _closed_after(
        sock, conn.data_to_send() + b"".join(f.serialize() for f in frames), within
    )


def _h2_client(
    port: int, context: ssl.SSLContext, timeout: float = 5.0
) -> tuple[ssl.SSLSocket, h2.connection.H2Connection]:
    """A TLS connection to the server, and an HTTP/2 client whose preface is queued."""
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=timeout), server_hostname="localhost"
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return sock, conn


def _closed_after(sock: ssl.SSLSocket, data: bytes, within: float) -> bool:
    """Send `data`, then nothing: True if the server closed the connection within `within` s."""
    try:
        sock.sendall(data)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            wait = max(0.0, deadline - time.monotonic())
            if select.select([sock], [], [], wait)[0] and not sock.recv(65536):
                return True
        return False
    except (OSError, ssl.SSLError):
        return True
    finally:
        sock.close()


def _flooded(
    sock: ssl.SSLSocket, first: bytes, chunk: bytes, at_most: int, within: float
) -> tuple[bool, int]:
    """Send `first`, then `chunk` again and again, up to `at_most` bytes or `within` s:
    (whether the server cut the connection, bytes of chunks sent)."""
    sent, deadline = 0, time.monotonic() + within
    try:
        sock.sendall(first)
        while sent < at_most and time.monotonic() < deadline:
            sock.sendall(chunk)
            sent += len(chunk)
        return False, sent
    except (OSError, ssl.SSLError):
        return True, sent
    finally:
        sock.close()


def _request_headers(path: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def _receive(
    sock: ssl.SSLSocket, conn: h2.connection.H2Connection, stream: int, answer: GrpcAnswer
) -> None:
    try:
        data = sock.recv(65536)
    except ssl.SSLWantReadError:
        return
    except OSError:
        data = b""
    if not data:
        answer.reset = True
        return
    for event in conn.receive_data(data):
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            headers = {_text(k): _text(v) for k, v in event.headers}
            if "grpc-status" in headers:
                answer.status = int(headers["grpc-status"])
                answer.message = headers.get("grpc-message")
        elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
            answer.reset = True
        elif isinstance(event, h2.events.DataReceived):
            conn.acknowledge_received_data(event.flow_controlled_length, stream)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def client_context(alpn: str | None = None) -> ssl.SSLContext:
    """A client that checks nothing: an attacker needs no trust to connect."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn is not None:
        context.set_alpn_protocols([alpn])
    return context


@contextmanager
def trickling_connections(
    port: int,
    count: int,
    message: bytes,
    *,
    every: float,
    tls: ssl.SSLContext | None = None,
    first: bytes = b"",
) -> Iterator[Flood]:
    """`count` connections that each send `first` at once, then `message` one byte
    every `every` seconds (a slowloris), from a thread, until the block ends or the
    message is out."""
    stop = threading.Event()
    with idle_connections(port, count, tls=tls) as flood:
        for sock in flood.sockets:
            sock.setblocking(True)
            sock.sendall(first)
            sock.setblocking(False)

        def trickle() -> None:
            for byte in message:
                if stop.wait(every):
                    return
                for sock in flood.sockets:
                    if sock not in flood.closed:
                        with suppress(OSError, ssl.SSLError):
                            sock.send(bytes([byte]))

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        try:
            yield flood
        finally:
            stop.set()
            thread.join()


@contextmanager
def answers_never_taken(
    port: int, count: int, context: ssl.SSLContext, path: str = GET_BUNDLE
) -> Iterator[Flood]:
    """`count` TLS connections that each call `path` (needing no credentials) with a
    flow-control window of 0 (SETTINGS_INITIAL_WINDOW_SIZE), then send nothing: the
    server owes each an answer that can never go out."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, _request_headers(path))
    conn.send_data(stream, bytes(PREFIX_BYTES), end_stream=True)
    call = conn.data_to_send()
    with idle_connections(port, count, tls=context) as flood:
        for sock in flood.sockets:
            sock.setblocking(True)
            sock.sendall(call)
            sock.setblocking(False)
        yield flood


@contextmanager
def unfinished_bodies(
    port: int, count: int, head: bytes, size: int, *, tls: ssl.SSLContext | None = None
) -> Iterator[Flood]:
    """`count` connections that each send `head` (ending in a Content-Length of `size`)
    and all but the last byte of its body, from a thread each, then nothing. A server
    that reads no further makes the sender wait: each thread gives up after 5 s."""
    with idle_connections(port, count, tls=tls) as flood:

        def send(sock: socket.socket) -> None:
            with suppress(OSError, ssl.SSLError):
                sock.settimeout(5.0)
                sock.sendall(head + b" " * (size - 1))

        threads = [threading.Thread(target=send, args=(s,), daemon=True) for s in flood.sockets]
        for thread in threads:
            thread.start()
        try:
            yield flood
        finally:
            for sock in flood.sockets:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # ends a send still waiting
            for thread in threads:
                thread.join()


@contextmanager
def asking_connections(
    port: int, count: int, *, every: float, tls: ssl.SSLContext, path: str = GET_BUNDLE
) -> Iterator[Flood]:
    """`count` TLS connections that each call `path` (needing no credentials) every
    `every` seconds, from a thread, reading every answer: busy callers, not idle ones."""
    stop = threading.Event()
    with idle_connections(port, count, tls=tls) as flood:
        clients = []
        for sock in flood.sockets:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            conn.initiate_connection()
            clients.append((sock, conn))

        def ask() -> None:
            while not stop.is_set():
                for sock, conn in clients:
                    with suppress(OSError, ssl.SSLError, h2.exceptions.ProtocolError):
                        with suppress(ssl.SSLWantReadError, BlockingIOError):
                            conn.receive_data(sock.recv(65536))  # answers, settings
                        stream = conn.get_next_available_stream_id()
                        conn.send_headers(stream, _request_headers(path))
                        conn.send_data(stream, bytes(PREFIX_BYTES), end_stream=True)
                        sock.send(conn.data_to_send())
                stop.wait(every)

        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        try:
            yield flood
        finally:
            stop.set()
            thread.join()


def unread_acknowledgements(
    port: int, context: ssl.SSLContext, frame: bytes, *, send_at_most: int, timeout: float = 10.0
) -> tuple[bool, int]:
    """Flood HTTP/2 `frame`s that each ask for an acknowledgement (PING, SETTINGS)
    and read nothing back: (whether the server closed the connection, bytes sent)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # do not read for the server
    sock = context.wrap_socket(raw, server_hostname="localhost")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return _flooded(sock, conn.data_to_send(), frame * 4096, send_at_most, timeout)


def reset_calls(port: int, context: ssl.SSLContext, count: int, *, within: float) -> bool:
    """Send `count` whole calls, each reset at once (a rapid reset), then nothing:
    True if the server closed the connection within `within` seconds."""
    sock, conn = _h2_client(port, context)
    for _ in range(count):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, _request_headers(SIGN))
        conn.send_data(stream, bytes(PREFIX_BYTES), end_stream=True)
        conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
    return _closed_after(sock, conn.data_to_send(), within)


def empty_data_frames(port: int, context: ssl.SSLContext, *, timeout: float = 5.0) -> bool:
    """Start a call, then send empty DATA frames (they spend no flow-control window)
    until the server cuts the connection (True) or `timeout` passes (False)."""
    sock, conn = _h2_client(port, context, timeout)
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, _request_headers(SIGN))
    empty = DataFrame(stream).serialize() * 4096
    return _flooded(sock, conn.data_to_send(), empty, 2**40, timeout)[0]
