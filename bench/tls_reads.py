"""CPU per TLS round trip on uvloop, the app's protocol handed bytes or reading into a buffer.

    python -m bench.tls_reads [--round-trips 20000]
    GLIBC_TUNABLES=glibc.malloc.mmap_threshold=262144 python -m bench.tls_reads

One process, one TLS connection over loopback, 100 bytes each way per round trip, two
TLS reads each. With a plain Protocol, uvloop's TLS transport reads each record with
`SSLObject.read(256 KiB)`: a 256 KiB allocation per read, cut down to what was read.
Whether that costs little (glibc serves it from the heap once its mmap threshold has
risen past 256 KiB, which a warmed agent's has) or an mmap, mremap and munmap per read
(a threshold below it: the default until a 256 KiB block mapped on its own is freed,
or any fixed one) is the allocator's state; with a BufferedProtocol it reads into the
protocol's buffer and allocates nothing, whatever the threshold. bench/peak_rss.py says
what a fixed threshold gives back in peak RSS under handshake churn (uvloop's 256 KiB
read buffer per TLS connection, mapped on its own then, is returned at close).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import ssl
import tempfile
import time
from pathlib import Path

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_BUFFER = bytearray(256 * 1024)
_VIEW = memoryview(_BUFFER)
MESSAGE = b"x" * 100


def contexts(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server and a client context of one self-signed certificate for localhost."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(directory / "cert.pem")
    return server, client


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class BufferedEcho(asyncio.BufferedProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return _BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.transport.write(bytes(_VIEW[:nbytes]))  # type: ignore[attr-defined]


class Caller(asyncio.Protocol):
    """Sends MESSAGE, waits for it back, `left` times."""

    def __init__(self, left: int, done: asyncio.Future[None]) -> None:
        self.left, self.done = left, done

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.transport.write(MESSAGE)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.answered()

    def answered(self) -> None:
        self.left -= 1
        if self.left:
            self.transport.write(MESSAGE)  # type: ignore[attr-defined]
        else:
            self.done.set_result(None)


class BufferedCaller(asyncio.BufferedProtocol):
    def __init__(self, left: int, done: asyncio.Future[None]) -> None:
        self.caller = Caller(left, done)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.caller.connection_made(transport)

    def get_buffer(self, sizehint: int) -> bytearray:
        return _BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        bytes(_VIEW[:nbytes])  # what a relay hands on
        self.caller.answered()


async def round_trips(buffered: bool, count: int) -> float:
    """CPU seconds of this process per round trip."""
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        server_context, client_context = contexts(Path(tmp))
    server = await loop.create_server(
        BufferedEcho if buffered else Echo, "127.0.0.1", 0, ssl=server_context
    )
    port = server.sockets[0].getsockname()[1]
    done: asyncio.Future[None] = loop.create_future()
    started = time.process_time()
    transport, _ = await loop.create_connection(
        lambda: BufferedCaller(count, done) if buffered else Caller(count, done),
        "127.0.0.1",
        port,
        ssl=client_context,
        server_hostname="localhost",
    )
    await done
    used = time.process_time() - started
    transport.close()
    server.close()
    return used / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=20000)
    args = parser.parse_args()
    tunables = os.environ.get("GLIBC_TUNABLES", "glibc defaults")
    for buffered in (False, True):
        per = uvloop.run(round_trips(buffered, args.round_trips))
        kind = "BufferedProtocol" if buffered else "Protocol"
        print(f"{kind:16} {per * 1e6:6.2f} us CPU per round trip ({tunables})")


if __name__ == "__main__":
    main()
