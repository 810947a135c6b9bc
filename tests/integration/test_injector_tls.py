"""The webhook's serving certificate is reloaded from its files, over real loopback TLS."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from identity.configfile import Listen
from injector.app import StartupError, serve
from injector.config import InjectorConfig, TlsFiles
from tests.support import key_pem, self_signed


def write_pair(directory: Path, name: str) -> tuple[bytes, bytes]:
    """A new certificate and key as PEM; not yet written where the server reads."""
    cert, key = self_signed(name)
    return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)


def replace_file(path: Path, data: bytes) -> None:
    """As a Secret volume does it: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def served_name(port: int) -> str:
    """The common name of the certificate a new connection is given."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we only look at what is presented
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context), timeout=5
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.rfc4514_string())


async def eventually_served(port: int, name: str, seconds: float = 3.0) -> bool:
    for _ in range(int(seconds / 0.05)):
        if await served_name(port) == f"CN={name}":
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[int, TlsFiles]]:
    files = TlsFiles(tmp_path / "tls.crt", tmp_path / "tls.key")
    cert, key = write_pair(tmp_path, "first")
    files.cert_file.write_bytes(cert)
    files.key_file.write_bytes(key)
    config = InjectorConfig(listen=Listen("127.0.0.1", 0), tls=files)
    stop = asyncio.Event()
    ready: asyncio.Future[tuple[str, int]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop, reload_interval=0.05, on_ready=ready))
    _, port = await asyncio.wait_for(ready, timeout=5)
    yield port, files
    stop.set()
    await asyncio.wait_for(task, timeout=5)


async def test_new_connections_get_the_replaced_certificate(
    running: tuple[int, TlsFiles], watchdog: None
) -> None:
    port, files = running
    assert await served_name(port) == "CN=first"
    cert, key = write_pair(files.cert_file.parent, "second")
    replace_file(files.key_file, key)
    replace_file(files.cert_file, cert)
    assert await eventually_served(port, "second")


async def test_a_half_replaced_pair_keeps_the_old_certificate_until_it_matches(
    running: tuple[int, TlsFiles],
) -> None:
    port, files = running
    cert, key = write_pair(files.cert_file.parent, "second")
    replace_file(files.cert_file, cert)  # the key is still the first one
    for _ in range(5):  # several reload intervals: every new connection still works
        await asyncio.sleep(0.05)
        assert await served_name(port) == "CN=first"
    replace_file(files.key_file, key)
    assert await eventually_served(port, "second")


async def test_missing_certificate_files_stop_the_start(tmp_path: Path) -> None:
    files = TlsFiles(tmp_path / "absent.crt", tmp_path / "absent.key")
    config = InjectorConfig(listen=Listen("127.0.0.1", 0), tls=files)
    with pytest.raises(StartupError, match=r"absent\.crt"):
        await serve(config, asyncio.Event())
