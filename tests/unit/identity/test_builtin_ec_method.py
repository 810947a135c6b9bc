"""identity.openssl_engine: on OpenSSL 3.0, EC keys through OpenSSL's built-in method,
with keys made and CSRs signed as ever, and the operator's switch back. Handshakes through
it: tests/integration/test_ec_keys_in_handshakes.py."""

from __future__ import annotations

import contextlib
import ssl
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
)
from tests import certs
from tests.mesh import workload
from tests.support import EC_ENGINE_APPLIES, CaSetup, make_ca_setup

pytestmark = pytest.mark.skipif(
    not EC_ENGINE_APPLIES, reason="OpenSSL 3.0 and the compiled build only"
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> CaSetup:
    return make_ca_setup(tmp_path_factory.mktemp("ca"))


A_GOOD_CSR = """
from cryptography import x509
from identity.cert import PrivateKey
print(x509.load_der_x509_csr(PrivateKey.generate_p256().csr()).is_signature_valid)
"""


def in_a_fresh_process(code: str, **environ: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"from identity import openssl_engine as e\n{code}"],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **environ}, check=True,
    )  # fmt: skip
    return done.stdout.splitlines()


def test_this_process_has_it_as_agents_do() -> None:
    """tests/conftest.py installed it, as `serve` and every worker do."""
    assert openssl_engine.installed()


def test_a_process_has_it_once_installed_and_not_before() -> None:
    said = in_a_fresh_process("print(e.installed()); print(e.install()); print(e.installed())")
    assert said == ["False", openssl_engine.install(), "True"]


@pytest.mark.parametrize("value", ["off", "OFF", "false", "0", "no", " Off "])
def test_the_switch_leaves_openssl_as_it_is(value: str) -> None:
    said = in_a_fresh_process(f"print(e.install()); print(e.installed())\n{A_GOOD_CSR}", **{
        openssl_engine.SWITCH: value
    })  # fmt: skip
    expected = f"OpenSSL's own EC key decoding ({openssl_engine.SWITCH}={value.strip()})"
    assert said == [expected, "False", "True"]  # and a CSR is signed as with it


def test_a_switch_value_it_does_not_know_turns_it_off_and_says_so() -> None:
    said = in_a_fresh_process("print(e.install()); print(e.installed())", **{
        openssl_engine.SWITCH: "disabled"
    })  # fmt: skip
    assert said == [
        f"OpenSSL's own EC key decoding: {openssl_engine.SWITCH}='disabled' is neither on nor"
        " off, so off",
        "False",
    ]


def test_openssl_calls_back_into_c_never_into_python() -> None:
    """OpenSSL asks for the method on every EC operation, in handshakes that run without
    the GIL: a Python callback would wait there behind any busy thread."""
    from identity import _ec_methods

    engine = ENGINE_get_pkey_meth_engine(EVP_PKEY_EC)
    try:
        called = ENGINE_get_pkey_meths(engine)
    finally:
        ENGINE_finish(engine)
    assert called == _ec_methods.callback()


def test_the_method_it_hands_openssl_is_set_once() -> None:
    """OpenSSL reads it without the GIL, at any time: it is never changed under it."""
    from identity import _ec_methods

    for wrong in (0, -1, 2**64):
        with pytest.raises((ValueError, OverflowError)):
            _ec_methods.set_method(wrong)
    with pytest.raises(ValueError, match="set already"):
        _ec_methods.set_method(1)
    assert openssl_engine.installed()


def test_a_key_made_and_its_csr_signed_with_it_are_good() -> None:
    key = PrivateKey.generate_p256()
    csr = x509.load_der_x509_csr(key.csr())
    assert csr.is_signature_valid
    assert openssl_engine.installed()


def test_p256_handshakes_in_threads_while_keys_are_made_and_csrs_signed(setup: CaSetup) -> None:
    """Every handshake that shares a P-256 key goes through, whatever another thread
    does with keys meanwhile (an engine taken away and put back around key work broke
    about one in two hundred)."""
    server = certs.server_context(setup.bundle_pem, certs.valid_svid(setup, workload("backend")))
    client = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload("web")))
    client.set_ecdh_curve("prime256v1")  # its only key share
    done, failures = threading.Event(), []

    def make_keys() -> None:
        while not done.is_set():
            x509.load_der_x509_csr(PrivateKey.generate_p256().csr())

    def handshake() -> None:
        to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
        c = client.wrap_bio(to_client, to_server, server_hostname="backend")
        s = server.wrap_bio(to_server, to_client, server_side=True)
        for _ in range(10):
            for side in (c, s):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            if c.version() and s.version():
                return
        raise AssertionError("the handshake did not finish")

    def handshakes() -> None:
        for _ in range(150):
            try:
                handshake()
            except (ssl.SSLError, AssertionError) as exc:
                failures.append(exc)

    makers = [threading.Thread(target=make_keys) for _ in range(2)]
    shakers = [threading.Thread(target=handshakes) for _ in range(2)]
    for thread in makers + shakers:
        thread.start()
    for thread in shakers:
        thread.join(60)
    done.set()
    for thread in makers:
        thread.join(10)
    assert failures == []
