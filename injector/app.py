"""`outrider injector serve`: the webhook over HTTPS, its certificate reloaded when it changes.

cert-manager and Kubernetes Secret volumes replace the certificate and key in
place (a symlink swap). Both files are checked every second; when either
changed and the pair loads, the server's TLS context takes it, so new
connections get the new certificate and open ones go on. A pair that does
not load (a half-written file, a key that does not match yet) keeps the old
one and is tried again when a file changes again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl

from aiohttp import web

from identity.serving import Acceptor, tls_server_context
from identity.tlsfiles import load_cert_chain
from injector.config import InjectorConfig, TlsFiles
from injector.webhook import InjectorMetrics, make_app

log = logging.getLogger("outrider.injector")

RELOAD_INTERVAL = 1.0
LINGER, SHUTDOWN = 1.0, 5.0  # seconds


class StartupError(Exception):
    """The webhook cannot start with this config and these files."""


def tls_context() -> ssl.SSLContext:
    """TLS 1.3, no tickets, no session cache; the API server's client has TLS 1.3."""
    return tls_server_context()


def load_pair(context: ssl.SSLContext, files: TlsFiles) -> None:
    """Load the pair into `context` only once it loaded elsewhere: OpenSSL drops the
    certificate of a context that is given a key that does not match it."""
    cert, key = files.cert_file.read_bytes(), files.key_file.read_bytes()
    load_cert_chain(tls_context(), cert, key)
    load_cert_chain(context, cert, key)


def _stamp(files: TlsFiles) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced: inode, size and mtime (symlinks followed)."""
    stats = (os.stat(files.cert_file), os.stat(files.key_file))
    return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)


async def _reload(
    context: ssl.SSLContext, files: TlsFiles, seen: tuple[object, ...], interval: float
) -> None:
    """Load the pair whenever its stamp is no longer `seen`, the one loaded at start."""
    while True:
        await asyncio.sleep(interval)
        try:
            stamp = _stamp(files)
        except OSError:
            continue  # between the removal and the rename of a replacement
        if stamp == seen:
            continue
        seen = stamp
        try:
            load_pair(context, files)
        except (OSError, ssl.SSLError) as exc:
            log.warning("keeping the current certificate: %s", exc)
        else:
            log.info("loaded the new certificate from %s", files.cert_file)


def _bind(config: InjectorConfig) -> socket.socket:
    listen = config.listen
    try:
        family = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((listen.host, listen.port), family=family, backlog=1024)
    except OSError as exc:
        raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None


async def serve(
    config: InjectorConfig,
    stop: asyncio.Event,
    *,
    reload_interval: float = RELOAD_INTERVAL,
    on_ready: asyncio.Future[tuple[str, int]] | None = None,
) -> None:
    """Serve until `stop` is set; `on_ready` learns the bound address."""
    files = config.tls
    if files is None:
        raise StartupError("tls.cert_file and tls.key_file are required to serve")
    context = tls_context()
    try:
        stamp = _stamp(files)  # before loading: a change from now on is seen
        load_pair(context, files)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load {files.cert_file} and {files.key_file}: {exc}") from None
    metrics = InjectorMetrics()
    connections = config.limits.connections
    runner = web.AppRunner(
        make_app(config.settings, config.limits, metrics),
        access_log=None,
        # After an early 413 aiohttp reads and drops the rest of the body, for 10 s by
        # default: long enough for a slow sender to hold a handler and delay shutdown.
        lingering_time=LINGER,
        shutdown_timeout=SHUTDOWN,
        keepalive_timeout=connections.idle_timeout.total_seconds(),
    )
    await runner.setup()
    assert runner.server is not None
    sock = _bind(config)
    acceptor = Acceptor(sock, runner.server, context, connections, metrics.connection_closed)
    acceptor.start()
    metrics.connections_open.set_function(acceptor.held)
    host, port = sock.getsockname()[:2]
    log.info("serving /mutate on https://%s:%d", host, port)
    if on_ready is not None:
        on_ready.set_result((host, port))
    reloader = asyncio.create_task(_reload(context, files, stamp, reload_interval))
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        reloader.cancel()
        acceptor.close()
        await acceptor.wait_closed()
        await runner.cleanup()
