"""Cert.from_der refuses, or marks `malformed`, exactly the certificates cryptography refuses.

The agent refuses a leaf whose extensions are `malformed` ("malformed_extensions");
before it read certificates through OpenSSL, it refused every certificate that
cryptography could not load, or whose `.extensions` or `.version` raised. This is
that parity, differentially: each certificate below is crafted here (a value of
the wrong shape in each extension cryptography decodes, a GeneralName of each
kind in each place one appears, non-DER in the TBS), and cryptography 51 is the
oracle. `PINNED` lists the few cases where OpenSSL 3.0 cannot tell what
cryptography refuses, each with why that is harmless.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.cert import Cert
from tests.unit.identity.test_cert import EC_KEY, Extension, build, key_usage, name, patched, raw


def tlv(tag: int, *content: bytes) -> bytes:
    body = b"".join(content)
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def seq(*content: bytes) -> bytes:
    return tlv(0x30, *content)


def _oid_der(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    out = bytearray([arcs[0] * 40 + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        out += bytes(reversed(chunk))
    return tlv(0x06, bytes(out))


SAN, IAN, AKI, AIA, SIA = (
    "2.5.29.17",
    "2.5.29.18",
    "2.5.29.35",
    "1.3.6.1.5.5.7.1.1",
    "1.3.6.1.5.5.7.1.11",
)
CRLDP, FRESHEST, NC, BC, KU, EKU = (
    "2.5.29.31",
    "2.5.29.46",
    "2.5.29.30",
    "2.5.29.19",
    "2.5.29.15",
    "2.5.29.37",
)
CP, PC, INHIBIT, PKUP = "2.5.29.32", "2.5.29.36", "2.5.29.54", "2.5.29.16"
TLS_FEATURE, SCT, POISON = (
    "1.3.6.1.5.5.7.1.24",
    "1.3.6.1.4.1.11129.2.4.2",
    "1.3.6.1.4.1.11129.2.4.3",
)
OCSP_NOCHECK, MS_TEMPLATE, ADMISSIONS = (
    "1.3.6.1.5.5.7.48.1.5",
    "1.3.6.1.4.1.311.21.7",
    "1.3.36.8.3.3",
)
SKI = "2.5.29.14"

URI_ID = tlv(0x86, b"spiffe://td/ns/a/sa/b")
BC_LEAF = raw(BC, seq(), True)
KU_DS = raw(KU, bytes.fromhex("03020780"), True)
EKU_BOTH = raw(EKU, seq(_oid_der("1.3.6.1.5.5.7.3.1"), _oid_der("1.3.6.1.5.5.7.3.2")))


def leaf(
    san: bytes | None = seq(URI_ID),
    bc: Extension | None = BC_LEAF,
    ku: Extension | None = KU_DS,
    eku: Extension | None = EKU_BOTH,
    extra: tuple[Extension, ...] = (),
) -> bytes:
    """An SVID-shaped leaf with raw extension values, and `extra` ones after them."""
    extensions = [e for e in (bc, ku, eku) if e is not None]
    if san is not None:
        extensions.append(raw(SAN, san))
    return build([*extensions, *extra])


def with_ext(oid_text: str, value: bytes, critical: bool = False) -> Callable[[], bytes]:
    return lambda: leaf(extra=(raw(oid_text, value, critical),))


# --- GeneralNames, each kind, in each place one appears -----------------------------

GENERAL_NAMES = {
    "uri": tlv(0x86, b"http://x/"),
    "uri_not_utf8": tlv(0x86, b"http://\xff"),
    "uri_latin1": tlv(0x86, b"spiffe://td/\xe9"),
    "dns": tlv(0x82, b"a.example"),
    "dns_not_utf8": tlv(0x82, b"\xff\xfe"),
    "email": tlv(0x81, b"a@b"),
    "email_not_utf8": tlv(0x81, b"a\xff"),
    "ip4": tlv(0x87, b"\x0a\x00\x00\x01"),
    "ip6": tlv(0x87, bytes(16)),
    "ip_1": tlv(0x87, b"\x01"),
    "ip_5": tlv(0x87, b"\x01\x02\x03\x04\x05"),
    "ip_8": tlv(0x87, b"\x0a\x00\x00\x00\xff\x00\x00\x00"),
    "ip_empty": tlv(0x87, b""),
    "x400": tlv(0xA3, seq()),
    "edi": tlv(0xA5, tlv(0x81, tlv(0x0C, b"x"))),
    "registered_id": tlv(0x88, bytes.fromhex("2a03")),
    "other_name": tlv(0xA0, _oid_der("1.2.3"), tlv(0xA0, tlv(0x0C, b"x"))),
    "dir_name": tlv(0xA4, seq(tlv(0x31, seq(_oid_der("2.5.4.3"), tlv(0x0C, b"x"))))),
    "dir_name_bad_utf8": tlv(0xA4, seq(tlv(0x31, seq(_oid_der("2.5.4.3"), tlv(0x0C, b"\xff"))))),
    "dir_name_printable_at": tlv(0xA4, seq(tlv(0x31, seq(_oid_der("2.5.4.3"), tlv(0x13, b"a@b"))))),
}
NC_NAMES = {
    "ip4_net": tlv(0x87, b"\x0a\x00\x00\x00\xff\x00\x00\x00"),
    "ip6_net": tlv(0x87, bytes(16) + b"\xff" * 8 + bytes(8)),
    "ip4_host": tlv(0x87, b"\x0a\x00\x00\x01"),
    "ip_bad_mask": tlv(0x87, b"\x0a\x00\x00\x00\xff\x00\xff\x00"),
    "ip_9": tlv(0x87, bytes(9)),
    "dns": tlv(0x82, b"example"),
    "dns_not_utf8": tlv(0x82, b"\xff"),
    "uri": tlv(0x86, b"td"),
    "x400": tlv(0xA3, seq()),
    "edi": tlv(0xA5, tlv(0x81, tlv(0x0C, b"x"))),
    "other_name": tlv(0xA0, _oid_der("1.2.3"), tlv(0xA0, tlv(0x0C, b"x"))),
}


def _places(gn: bytes) -> dict[str, Callable[[], bytes]]:
    """A certificate with the GeneralName `gn` in each extension that holds GeneralNames."""
    access = seq(seq(_oid_der("1.3.6.1.5.5.7.48.1"), gn))
    return {
        "san": lambda: leaf(seq(URI_ID, gn)),
        "ian": with_ext(IAN, seq(gn)),
        "aki_issuer": with_ext(AKI, seq(tlv(0x80, b"\x01"), tlv(0xA1, gn), tlv(0x82, b"\x01"))),
        "aia": with_ext(AIA, access),
        "sia": with_ext(SIA, access),
        "crldp_full_name": with_ext(CRLDP, seq(seq(tlv(0xA0, tlv(0xA0, gn))))),
        "crldp_issuer": with_ext(CRLDP, seq(seq(tlv(0xA2, gn)))),
        "freshest_crl": with_ext(FRESHEST, seq(seq(tlv(0xA0, tlv(0xA0, gn))))),
    }


CASES: dict[str, Callable[[], bytes]] = {}
for _gn_name, _gn in GENERAL_NAMES.items():
    for _place, _make in _places(_gn).items():
        CASES[f"gn_{_gn_name}_in_{_place}"] = _make
for _gn_name, _gn in NC_NAMES.items():
    CASES[f"nc_permitted_{_gn_name}"] = with_ext(NC, seq(tlv(0xA0, seq(_gn))), True)
    CASES[f"nc_excluded_{_gn_name}"] = with_ext(NC, seq(tlv(0xA1, seq(_gn))), True)

# --- each extension cryptography decodes: well formed, then wrong shapes -------------

_GARBAGE = {"null": b"\x05\x00", "octets": b"\x04\x00", "empty": b"", "int": b"\x02\x01\x01"}
#: Every extension cryptography decodes, and some it keeps as bytes (which OpenSSL may decode).
_GARBAGE_OIDS = (
    *(SAN, IAN, AKI, AIA, SIA, CRLDP, FRESHEST, NC, BC, KU, EKU, CP, PC, INHIBIT, PKUP),
    *(TLS_FEATURE, SCT, POISON, OCSP_NOCHECK, MS_TEMPLATE, ADMISSIONS, SKI),
    *("2.5.29.9", "2.5.29.33", "2.16.840.1.113730.1.1", "1.3.6.1.5.5.7.1.14", "2.5.29.20"),
    *("2.5.29.21", "2.5.29.24", "2.5.29.27", "2.5.29.28", "2.5.29.29", "1.3.6.1.5.5.7.48.1.2"),
    *("1.3.6.1.4.1.311.20.2", "1.3.6.1.4.1.311.21.10", "1.2.3.4"),
)
_IN_LEAF = {SAN: "san", BC: "bc", KU: "ku", EKU: "eku"}  # leaf()'s own: replaced, not added


def _garbage(oid_text: str, value: bytes) -> Callable[[], bytes]:
    if oid_text == SAN:
        return lambda: leaf(value)
    if oid_text in _IN_LEAF:
        return lambda: leaf(**{_IN_LEAF[oid_text]: raw(oid_text, value, True)})  # type: ignore[arg-type]
    return with_ext(oid_text, value)


for _oid in _GARBAGE_OIDS:
    for _kind, _value in _GARBAGE.items():
        CASES[f"garbage_{_kind}_{_oid}"] = _garbage(_oid, _value)
        CASES[f"garbage_{_kind}_{_oid}_trailing"] = _garbage(_oid, _value + b"\x00\x00")

CASES.update(
    {
        # basicConstraints
        "bc_ca_true": lambda: leaf(bc=raw(BC, seq(b"\x01\x01\xff"), True)),
        "bc_ca_true_pathlen": lambda: leaf(bc=raw(BC, seq(b"\x01\x01\xff", b"\x02\x01\x00"), True)),
        "bc_ca_false_explicit": lambda: leaf(bc=raw(BC, seq(b"\x01\x01\x00"), True)),
        "bc_ca_01": lambda: leaf(bc=raw(BC, seq(b"\x01\x01\x01"), True)),
        "bc_ca_01_pathlen": lambda: leaf(bc=raw(BC, seq(b"\x01\x01\x01", b"\x02\x01\x01"), True)),
        "bc_ca_false_pathlen": lambda: leaf(bc=raw(BC, seq(b"\x02\x01\x00"), True)),
        "bc_pathlen_negative": lambda: leaf(
            bc=raw(BC, seq(b"\x01\x01\xff", b"\x02\x01\xff"), True)
        ),
        "bc_pathlen_2_64": lambda: leaf(
            bc=raw(BC, seq(b"\x01\x01\xff", b"\x02\x09\x01" + bytes(8)), True)
        ),
        "bc_pathlen_2_64_minus_1": lambda: leaf(
            bc=raw(BC, seq(b"\x01\x01\xff", b"\x02\x09\x00" + b"\xff" * 8), True)
        ),
        "bc_pathlen_huge_ca_false": lambda: leaf(bc=raw(BC, seq(b"\x02\x09\x01" + bytes(8)), True)),
        "bc_pathlen_nonminimal": lambda: leaf(
            bc=raw(BC, seq(b"\x01\x01\xff", b"\x02\x02\x00\x01"), True)
        ),
        "bc_bool_long": lambda: leaf(bc=raw(BC, seq(b"\x01\x02\xff\xff"), True)),
        # keyUsage
        "ku_pad8": lambda: leaf(ku=raw(KU, bytes.fromhex("03020880"), True)),
        "ku_nonzero_pad": lambda: leaf(ku=raw(KU, bytes.fromhex("03020181"), True)),
        "ku_trailing_zero_byte": lambda: leaf(ku=raw(KU, bytes.fromhex("0303008000"), True)),
        "ku_long": lambda: leaf(ku=raw(KU, bytes.fromhex("030500800000ff"), True)),
        "ku_constructed": lambda: leaf(ku=raw(KU, bytes.fromhex("230403020780"), True)),
        "ku_decipher_only": lambda: leaf(ku=raw(KU, bytes.fromhex("0303078080"), True)),
        "ku_empty": lambda: leaf(ku=raw(KU, bytes.fromhex("030100"), True)),
        # extKeyUsage
        "eku_as_set": lambda: leaf(eku=raw(EKU, tlv(0x31, _oid_der("1.3.6.1.5.5.7.3.1")))),
        "eku_oid_nonminimal": lambda: leaf(
            eku=raw(EKU, seq(tlv(0x06, bytes.fromhex("2b0601050507800301"))))
        ),
        "eku_dup_oid": lambda: leaf(
            eku=raw(EKU, seq(_oid_der("1.3.6.1.5.5.7.3.1"), _oid_der("1.3.6.1.5.5.7.3.1")))
        ),
        "eku_empty": lambda: leaf(eku=raw(EKU, seq())),
        # subjectAltName shapes
        "san_empty": lambda: leaf(seq()),
        "san_trailing": lambda: leaf(seq(URI_ID) + b"\x00"),
        "san_as_set": lambda: leaf(tlv(0x31, URI_ID)),
        "san_uri_constructed": lambda: leaf(seq(tlv(0xA6, tlv(0x16, b"spiffe://td/a")))),
        "san_uri_nonminimal_length": lambda: leaf(seq(b"\x86\x81\x0dspiffe://td/a")),
        "san_indefinite": lambda: leaf(b"\x30\x80" + tlv(0x86, b"spiffe://td/a") + b"\x00\x00"),
        "san_uri_long_form_tag": lambda: leaf(seq(b"\x9f\x06\x0dspiffe://td/a")),
        "san_uri_nul": lambda: leaf(seq(tlv(0x86, b"spiffe://td/a\x00"))),
        "san_two_uris": lambda: leaf(seq(URI_ID, tlv(0x86, b"spiffe://td/x"))),
        "no_san": lambda: leaf(None),
        # authorityKeyIdentifier
        "aki_key_id": with_ext(AKI, seq(tlv(0x80, b"\x01\x02"))),
        "aki_issuer_without_serial": with_ext(
            AKI, seq(tlv(0x80, b"\x01"), tlv(0xA1, tlv(0x86, b"http://x")))
        ),
        "aki_serial_without_issuer": with_ext(AKI, seq(tlv(0x80, b"\x01"), tlv(0x82, b"\x01"))),
        "aki_empty": with_ext(AKI, seq()),
        # CRL distribution points
        "crldp_empty_point": with_ext(CRLDP, seq(seq())),
        "crldp_reasons_only": with_ext(CRLDP, seq(seq(tlv(0x81, b"\x07\x80")))),
        "crldp_reasons_and_name": with_ext(
            CRLDP, seq(seq(tlv(0xA0, tlv(0xA0, tlv(0x86, b"http://x"))), tlv(0x81, b"\x07\x80")))
        ),
        "crldp_relative_name": with_ext(
            CRLDP, seq(seq(tlv(0xA0, tlv(0xA1, seq(_oid_der("2.5.4.3"), tlv(0x0C, b"x"))))))
        ),
        "crldp_empty": with_ext(CRLDP, seq()),
        # name constraints
        "nc_empty": with_ext(NC, seq(), True),
        "nc_empty_permitted": with_ext(NC, seq(tlv(0xA0)), True),
        "nc_minimum_explicit_zero": with_ext(
            NC, seq(tlv(0xA0, seq(tlv(0x82, b"x"), tlv(0x80, b"\x00")))), True
        ),
        "nc_minimum_one": with_ext(
            NC, seq(tlv(0xA0, seq(tlv(0x82, b"x"), tlv(0x80, b"\x01")))), True
        ),
        "nc_maximum": with_ext(NC, seq(tlv(0xA0, seq(tlv(0x82, b"x"), tlv(0x81, b"\x05")))), True),
        "nc_maximum_negative": with_ext(
            NC, seq(tlv(0xA0, seq(tlv(0x82, b"x"), tlv(0x81, b"\xff")))), True
        ),
        # policies
        "pc_empty": with_ext(PC, seq()),
        "pc_require": with_ext(PC, seq(tlv(0x80, b"\x00"))),
        "pc_inhibit_negative": with_ext(PC, seq(tlv(0x81, b"\xff"))),
        "pc_huge": with_ext(PC, seq(tlv(0x80, b"\x01" + bytes(8)))),
        "inhibit_zero": with_ext(INHIBIT, b"\x02\x01\x00"),
        "inhibit_negative": with_ext(INHIBIT, b"\x02\x01\xff"),
        "inhibit_2_64": with_ext(INHIBIT, b"\x02\x09\x01" + bytes(8)),
        "cp_any": with_ext(CP, seq(seq(_oid_der("2.5.29.32.0")))),
        "cp_cps": with_ext(
            CP,
            seq(
                seq(
                    _oid_der("2.5.29.32.0"),
                    seq(seq(_oid_der("1.3.6.1.5.5.7.2.1"), tlv(0x16, b"http://cps"))),
                )
            ),
        ),
        "cp_cps_not_ascii": with_ext(
            CP,
            seq(
                seq(
                    _oid_der("2.5.29.32.0"),
                    seq(seq(_oid_der("1.3.6.1.5.5.7.2.1"), tlv(0x16, b"http://\xff"))),
                )
            ),
        ),
        "cp_cps_as_utf8": with_ext(
            CP,
            seq(
                seq(
                    _oid_der("2.5.29.32.0"),
                    seq(seq(_oid_der("1.3.6.1.5.5.7.2.1"), tlv(0x0C, b"http://cps"))),
                )
            ),
        ),
        "cp_qualifier_int": with_ext(
            CP,
            seq(
                seq(
                    _oid_der("2.5.29.32.0"),
                    seq(seq(_oid_der("1.3.6.1.5.5.7.2.1"), tlv(0x02, b"\x01"))),
                )
            ),
        ),
        "cp_usernotice_text": with_ext(
            CP,
            seq(
                seq(
                    _oid_der("2.5.29.32.0"),
                    seq(seq(_oid_der("1.3.6.1.5.5.7.2.2"), seq(tlv(0x0C, b"hello")))),
                )
            ),
        ),
        "cp_usernotice_bad": with_ext(
            CP,
            seq(
                seq(
                    _oid_der("2.5.29.32.0"),
                    seq(seq(_oid_der("1.3.6.1.5.5.7.2.2"), seq(tlv(0x02, b"\x01")))),
                )
            ),
        ),
        "cp_unknown_qualifier": with_ext(
            CP, seq(seq(_oid_der("2.5.29.32.0"), seq(seq(_oid_der("1.2.3"), tlv(0x05, b"")))))
        ),
        "cp_dup_policy": with_ext(CP, seq(seq(_oid_der("1.2.3")), seq(_oid_der("1.2.3")))),
        # privateKeyUsagePeriod
        "pkup_both": with_ext(
            PKUP, seq(tlv(0x80, b"20260101000000Z"), tlv(0x81, b"20270101000000Z"))
        ),
        "pkup_before": with_ext(PKUP, seq(tlv(0x80, b"20260101000000Z"))),
        "pkup_empty": with_ext(PKUP, seq()),
        "pkup_fraction": with_ext(PKUP, seq(tlv(0x80, b"20260101000000.5Z"))),
        "pkup_no_z": with_ext(PKUP, seq(tlv(0x80, b"20260101000000"))),
        # TLS feature, SCTs, poison, OCSP noCheck, MS template
        "tls_feature_status_request": with_ext(TLS_FEATURE, seq(b"\x02\x01\x05")),
        "tls_feature_unknown": with_ext(TLS_FEATURE, seq(b"\x02\x01\x06")),
        "tls_feature_empty": with_ext(TLS_FEATURE, seq()),
        "tls_feature_negative": with_ext(TLS_FEATURE, seq(b"\x02\x01\xfb")),
        "sct_empty_list": with_ext(SCT, tlv(0x04, b"\x00\x00")),
        "sct_short": with_ext(SCT, tlv(0x04, b"\x00\x05\x00\x03abc")),
        "poison": with_ext(POISON, b"\x05\x00", True),
        "poison_octets": with_ext(POISON, b"\x04\x00", True),
        "ocsp_nocheck_octets": with_ext(OCSP_NOCHECK, b"\x04\x00"),
        "ms_template": with_ext(
            MS_TEMPLATE, seq(_oid_der("1.2.3"), b"\x02\x01\x01", b"\x02\x01\x02")
        ),
        "ms_template_oid_only": with_ext(MS_TEMPLATE, seq(_oid_der("1.2.3"))),
        "ms_template_negative": with_ext(MS_TEMPLATE, seq(_oid_der("1.2.3"), b"\x02\x01\xff")),
        "ski_trailing": with_ext(SKI, b"\x04\x01\x01\x00"),
        "unknown_critical": with_ext("1.2.3.4", b"\x05\x00", True),
    }
)


# --- the extension wrapper and the TBS ---------------------------------------------


def _patched_leaf(placeholder: bytes, replacement: bytes) -> bytes:
    return patched(leaf(extra=(raw("1.2.3.4.5", b"\x05\x00", True),)), placeholder, replacement)


_CRIT = _oid_der("1.2.3.4.5") + b"\x01\x01\xff"
CASES.update(
    {
        "critical_01": lambda: _patched_leaf(_CRIT, _CRIT[:-1] + b"\x01"),
        "critical_7f": lambda: _patched_leaf(_CRIT, _CRIT[:-1] + b"\x7f"),
        "critical_false_explicit": lambda: _patched_leaf(_CRIT, _CRIT[:-1] + b"\x00"),
        "ku_critical_01": lambda: patched(
            leaf(), _oid_der(KU) + b"\x01\x01\xff", _oid_der(KU) + b"\x01\x01\x01"
        ),
        "version_v1": lambda: patched(leaf(), b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x00"),
        "version_v2": lambda: patched(leaf(), b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x01"),
        "version_v4": lambda: patched(leaf(), b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x03"),
        "version_negative": lambda: patched(
            leaf(), b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\xff"
        ),
    }
)

# --- whole certificates the CA and cryptography make ----------------------------------

_KEYS = {
    "p256": EC_KEY,
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
}
for _key_name, _key in _KEYS.items():
    CASES[f"root_{_key_name}"] = lambda k=_key: build(
        [
            (x509.BasicConstraints(ca=True, path_length=1), True),
            (key_usage("key_cert_sign", "crl_sign"), True),
            (x509.SubjectKeyIdentifier.from_public_key(k.public_key()), False),
            (x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://td")]), False),
            (x509.NameConstraints([x509.UniformResourceIdentifier("td")], None), True),
        ],
        signer=k,
        key=k.public_key(),
    )
    CASES[f"intermediate_{_key_name}"] = lambda k=_key: build(
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (key_usage("key_cert_sign", "crl_sign"), True),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(EC_KEY.public_key()), False),
            (
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            [x509.UniformResourceIdentifier("http://x/crl")], None, None, None
                        )
                    ]
                ),
                False,
            ),
            (
                x509.AuthorityInformationAccess(
                    [
                        x509.AccessDescription(
                            x509.oid.AuthorityInformationAccessOID.OCSP,
                            x509.UniformResourceIdentifier("http://o"),
                        )
                    ]
                ),
                False,
            ),
            (
                x509.CertificatePolicies(
                    [x509.PolicyInformation(x509.ObjectIdentifier("2.5.29.32.0"), None)]
                ),
                False,
            ),
        ],
        key=k.public_key(),
    )
CASES["leaf_every_name"] = lambda: build(
    [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (key_usage("digital_signature"), True),
        (
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("a.b"),
                    x509.UniformResourceIdentifier("spiffe://td/a"),
                    x509.RFC822Name("x@y"),
                    x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x16\x0aspiffe://x"),
                    x509.DirectoryName(name((NameOID.COMMON_NAME, "spiffe://td/b"))),
                    x509.IPAddress(__import__("ipaddress").ip_address("10.0.0.1")),
                    x509.RegisteredID(x509.ObjectIdentifier("1.2.3")),
                ]
            ),
            False,
        ),
        (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE, x509.ObjectIdentifier("1.2.3.4.5")]
            ),
            False,
        ),
    ]
)


# --- names, times and algorithm identifiers around the extensions ---------------------

_SUBJECT = b"\x0c\x06subjcn"


def _subject_value(tag: int, value: bytes) -> bytes:
    """A certificate whose subject CN (6 bytes) is `value` with universal `tag`."""
    base = build(
        subject=name((NameOID.COMMON_NAME, "subjcn")), issuer=name((NameOID.COMMON_NAME, "issuer"))
    )
    return patched(base, _SUBJECT, bytes([tag, 6]) + value)


def _unsorted_rdn() -> bytes:
    """A multi-valued RDN whose SET OF is not in DER order."""
    rdn = x509.RelativeDistinguishedName(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "aa"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )
    certificate = build(subject=x509.Name([rdn]), issuer=name((NameOID.COMMON_NAME, "issuer")))
    common_name = seq(_oid_der("2.5.4.3"), tlv(0x0C, b"aa"))
    country = seq(_oid_der("2.5.4.6"), tlv(0x13, b"US"))
    return patched(certificate, tlv(0x31, common_name, country), tlv(0x31, country, common_name))


def _first(certificate: bytes, old: bytes, new: bytes, *, last: bool = False) -> bytes:
    at = certificate.rfind(old) if last else certificate.find(old)
    assert at >= 0 and len(old) == len(new)
    return certificate[:at] + new + certificate[at + len(old) :]


def _signature_padding(certificate: bytes) -> bytes:
    """The signature BIT STRING (the certificate's last value) with 1 unused bit, set."""
    at = certificate.rfind(b"\x00\x30", 0, len(certificate) - 64)
    assert certificate[at - 2] == 0x03
    return certificate[:at] + b"\x01" + certificate[at + 1 : -1] + bytes([certificate[-1] | 1])


def _dir_name(*attributes: bytes) -> bytes:
    return tlv(0xA4, seq(tlv(0x31, *attributes)))


_ECDSA_SHA256 = seq(_oid_der("1.2.840.10045.4.3.2"))
_ED25519_WITH_PARAMETERS = seq(_oid_der("1.3.101.112"), tlv(0x04, b"\x00\x00\x00"))
_P256 = _oid_der("1.2.840.10045.3.1.7")
_CN, _C = _oid_der("2.5.4.3"), _oid_der("2.5.4.6")
_NOT_BEFORE = b"\x17\x0d260101000000Z"
CASES.update(
    {
        "subject_printable_with_at": lambda: _subject_value(0x13, b"a@bcde"),
        "subject_printable": lambda: _subject_value(0x13, b"abc de"),
        "subject_numeric_letters": lambda: _subject_value(0x12, b"abcdef"),
        "subject_numeric_digits": lambda: _subject_value(0x12, b"123 56"),
        "subject_relative_oid": lambda: _subject_value(0x0D, b"abcdef"),
        "subject_ia5": lambda: _subject_value(0x16, b"abcdef"),
        "subject_octet_string": lambda: _subject_value(0x04, b"abcdef"),
        "subject_utf8_invalid": lambda: _subject_value(0x0C, b"\xff\xfeabcd"),
        "subject_bmp_unpaired_surrogate": lambda: _subject_value(0x1E, b"\xd8\x00\x00a\x00b"),
        "subject_universal_invalid": lambda: _subject_value(0x1C, b"abcdef"),
        "subject_rdn_unsorted": _unsorted_rdn,
        "subject_rdn_primitive_set": lambda: patched(
            build(
                subject=name((NameOID.COMMON_NAME, "subjcn")),
                issuer=name((NameOID.COMMON_NAME, "issuer")),
            ),
            b"\x31\x0f\x30\x0d" + _CN + _SUBJECT,
            b"\x11\x0f\x30\x0d" + _CN + _SUBJECT,
        ),
        "dir_name_relative_oid_in_san": lambda: leaf(
            seq(URI_ID, _dir_name(seq(_CN, tlv(0x0D, b"x"))))
        ),
        "dir_name_numeric_in_san": lambda: leaf(seq(URI_ID, _dir_name(seq(_CN, tlv(0x12, b"x"))))),
        "dir_name_unsorted_in_san": lambda: leaf(
            seq(URI_ID, _dir_name(seq(_C, tlv(0x13, b"US")), seq(_CN, tlv(0x0C, b"aa"))))
        ),
        "validity_utctime_without_z": lambda: _first(leaf(), _NOT_BEFORE, b"\x17\x0d2601010000000"),
        "validity_utctime_bad_month": lambda: _first(leaf(), _NOT_BEFORE, b"\x17\x0d261301000000Z"),
        "pkup_reversed": with_ext(
            PKUP, seq(tlv(0x80, b"20270101000000Z"), tlv(0x81, b"20260101000000Z"))
        ),
        "tbs_signature_ed25519_with_parameters": lambda: _first(
            leaf(), _ECDSA_SHA256, _ED25519_WITH_PARAMETERS
        ),
        "outer_signature_ed25519_with_parameters": lambda: _first(
            leaf(), _ECDSA_SHA256, _ED25519_WITH_PARAMETERS, last=True
        ),
        "spki_ec_parameters_octets": lambda: _first(leaf(), _P256, b"\x04" + _P256[1:]),
        "spki_ec_parameters_integer": lambda: _first(leaf(), _P256, b"\x02" + _P256[1:]),
        "signature_nonzero_unused_bits": lambda: _signature_padding(leaf()),
    }
)


def refused_by_cryptography(certificate: bytes) -> bool:
    """The oracle: the pre-OpenSSL agent refused a certificate exactly when this is True."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cert = x509.load_der_x509_certificate(certificate)
            cert.version  # noqa: B018
            cert.extensions  # noqa: B018
        except Exception:  # any exception at all refused the peer
            return True
    return False


def refused_by_cert(certificate: bytes) -> bool:
    try:
        return Cert.from_der(certificate).malformed is not None
    except ValueError:
        return True


#: Where Cert refuses what cryptography reads: each only makes the agent stricter, and
#: a TLS handshake through the same OpenSSL refuses the certificate too (d2i_X509
#: fails, or X509_verify_cert finds the certificate's extensions invalid).
_OPENSSL_REFUSES_NAME = "OpenSSL decodes a name attribute only if it is a valid string"
_OPENSSL_FINDS_INVALID = (
    "OpenSSL finds the certificate invalid (EXFLAG_INVALID); cryptography ignores this extension"
)
PINNED: dict[str, str] = {
    "subject_octet_string": _OPENSSL_REFUSES_NAME,
    "subject_utf8_invalid": _OPENSSL_REFUSES_NAME,
    **{
        f"garbage_{kind}_{oid_text}{trailing}": _OPENSSL_FINDS_INVALID
        for kind in _GARBAGE
        for oid_text in ("1.3.6.1.5.5.7.1.14", "2.16.840.1.113730.1.1")  # proxyCertInfo, nsCertType
        for trailing in ("", "_trailing")
    },
}
#: Cert's reasons for the stricter refusals above (and their kin found by the bit flips below).
_STRICTER = re.compile(
    r"mstring wrong tag|mstring not universal|invalid utf8string|too long"
    r"|OpenSSL finds the extensions invalid|extension 2\.5\.29\.(17|18|31|35|46): undecodable"
)


def cert_reason(certificate: bytes) -> str | None:
    try:
        return Cert.from_der(certificate).malformed
    except ValueError as exc:
        return str(exc)


@pytest.mark.parametrize("case", sorted(set(CASES) - set(PINNED)))
def test_refuses_exactly_what_cryptography_refuses(case: str) -> None:
    certificate = CASES[case]()
    assert refused_by_cert(certificate) == refused_by_cryptography(certificate), cert_reason(
        certificate
    )


@pytest.mark.parametrize("case", sorted(PINNED))
def test_the_pinned_differences_only_make_cert_stricter(case: str) -> None:
    """If one of these starts to agree, take it out of PINNED."""
    certificate = CASES[case]()
    assert refused_by_cert(certificate) and not refused_by_cryptography(certificate)
    assert _STRICTER.search(cert_reason(certificate) or "")


_FLIPPED = (
    "root_p256",
    "intermediate_rsa",
    "leaf_every_name",
    "pkup_both",
    "cp_usernotice_text",
    "gn_dir_name_in_crldp_issuer",
    "nc_permitted_ip4_net",
    "aki_key_id",
)


@pytest.mark.parametrize("case", _FLIPPED)
def test_flipped_bits_refused_exactly_as_cryptography_refuses_them(case: str) -> None:
    """Seeded bit flips anywhere in the certificate: never accepted where cryptography
    refuses; refused where it accepts only for the pinned, stricter reasons."""
    rng = random.Random(case)
    certificate = CASES[case]()
    for _ in range(400):
        mutated = bytearray(certificate)
        for _ in range(rng.choice((1, 1, 2))):
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
        ours, theirs = refused_by_cert(bytes(mutated)), refused_by_cryptography(bytes(mutated))
        if ours != theirs:
            reason = cert_reason(bytes(mutated))
            assert ours and _STRICTER.search(reason or ""), (bytes(mutated).hex(), reason)
