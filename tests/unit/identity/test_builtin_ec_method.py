"""identity.openssl_engine: on OpenSSL 3.0, EC keys through OpenSSL's built-in method,
lifted for the work only providers do (keys made, CSRs signed), and the operator's
switch back. Handshakes through it: tests/integration/test_ec_keys_in_handshakes.py."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
from cryptography import x509

from identity import openssl_engine
from identity.cert import PrivateKey
from identity.openssl import (
    EVP_PKEY_EC,
    ENGINE_finish,
    ENGINE_get_pkey_meth_engine,
    ENGINE_get_pkey_meths,
    EVP_PKEY_meth_find,
)

_ec_methods = pytest.importorskip("identity._ec_methods", reason="a pure-Python build")
pytestmark = pytest.mark.skipif(
    not openssl_engine.installed(), reason="the built-in EC method is for OpenSSL 3.0"
)


def in_a_fresh_process(code: str, **environ: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", f"from identity import openssl_engine as e\n{code}"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **environ}, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def test_a_process_has_it_once_installed_and_not_before() -> None:
    said = in_a_fresh_process("print(e.installed()); print(e.install()); print(e.installed())")
    assert said.splitlines() == ["False", openssl_engine.install(), "True"]


@pytest.mark.parametrize("value", ["off", "OFF", "false", "0", "no", " Off "])
def test_the_switch_leaves_openssl_as_it_is(value: str) -> None:
    said = in_a_fresh_process("print(e.install()); print(e.installed())", **{
        openssl_engine.SWITCH: value
    })  # fmt: skip
    assert said.splitlines() == [
        f"OpenSSL's own EC key decoding ({openssl_engine.SWITCH}={value.strip()})",
        "False",
    ]


def test_a_switch_value_it_does_not_know_turns_it_off_and_says_so() -> None:
    said = in_a_fresh_process("print(e.install()); print(e.installed())", **{
        openssl_engine.SWITCH: "disabled"
    })  # fmt: skip
    assert said.splitlines() == [
        f"OpenSSL's own EC key decoding: {openssl_engine.SWITCH}='disabled' is neither on nor"
        " off, so off",
        "False",
    ]


def test_openssl_calls_back_into_c_never_into_python() -> None:
    """OpenSSL asks for the method on every EC operation, in handshakes that run without
    the GIL: a Python callback would wait there behind any busy thread."""
    engine = ENGINE_get_pkey_meth_engine(EVP_PKEY_EC)
    try:
        called = ENGINE_get_pkey_meths(engine)
    finally:
        ENGINE_finish(engine)
    assert called == _ec_methods.callback(EVP_PKEY_meth_find(EVP_PKEY_EC))


def test_a_key_made_and_its_csr_signed_meanwhile_are_good() -> None:
    key = PrivateKey.generate_p256()
    csr = x509.load_der_x509_csr(key.csr())
    assert csr.is_signature_valid
    assert openssl_engine.installed()


def test_it_is_lifted_while_any_thread_is_in_providers_and_back_after_the_last() -> None:
    inside = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]
    left = [threading.Event(), threading.Event()]

    def lifted(i: int) -> None:
        with openssl_engine.providers():
            inside[i].set()
            leave[i].wait(5)
        left[i].set()

    threads = [threading.Thread(target=lifted, args=(i,)) for i in range(2)]
    for i, thread in enumerate(threads):
        thread.start()
        assert inside[i].wait(5)
    assert not openssl_engine.installed()
    leave[0].set()
    assert left[0].wait(5)
    assert not openssl_engine.installed(), "put back while another thread was still inside"
    leave[1].set()
    for thread in threads:
        thread.join(5)
    assert openssl_engine.installed()
