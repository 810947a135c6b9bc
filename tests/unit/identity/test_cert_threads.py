"""identity.cert from many threads at once: ctypes releases the GIL around each OpenSSL
call, so the calls of different threads overlap. Each thread's results are the ones
it gets alone, and its OpenSSL error queue (one per thread) is left empty."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from identity import openssl
from identity.cert import Cert, PrivateKey, verify_chain
from tests.unit.agent import pki
from tests.unit.identity.test_cert import build, raw

THREADS = 8
ROUNDS = 60


def test_threads_get_what_one_thread_gets(tmp_path: Path) -> None:
    signer = pki.make_signer(tmp_path)
    chain = [Cert.from_der(der) for der in pki.sign_leaf(signer, pki.new_key())]
    roots = [Cert.from_der(der) for der in pki.bundle_der(signer)]
    inputs = [
        chain[0].der,
        build([raw("2.5.29.19", b"\x30\x00\x00", True)]),
        chain[0].der[:100],
    ]
    expected = [_outcome(der) for der in inputs]

    def work(_: int) -> list[object]:
        seen: list[object] = []
        for i in range(ROUNDS):
            seen.append(_outcome(inputs[i % len(inputs)]))
            verify_chain(chain, roots)
            with contextlib.suppress(ValueError):
                verify_chain(chain[:1], roots)
            if i % 25 == 0:
                PrivateKey.generate_p256().csr()
        seen.append(openssl.ERR_get_error())
        return seen

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(work, range(THREADS)))
    for seen in results:
        assert seen[-1] == 0, "the thread's error queue is empty"
        assert seen[:-1] == [expected[i % len(inputs)] for i in range(ROUNDS)]


def _outcome(der: bytes) -> object:
    try:
        cert = Cert.from_der(der)
    except ValueError as exc:
        return str(exc)
    return (cert.serial, cert.subject, cert.uris, cert.key_usage, cert.malformed, cert.spki)
