"""cryptography's rules beyond the ASN.1: what its types refuse that OpenSSL's decoder takes.

OpenSSL decodes an extension, a name or a time by its ASN.1 and stops there;
cryptography's Python types for them add rules of their own (a pathLenConstraint
only with cA, an iPAddress of 4 or 16 bytes, a time in DER, a PrintableString
with only its characters, ...), and refuse a certificate that breaks one. Each
rule here reads what OpenSSL decoded, through the public structs of x509v3.h,
and says what cryptography would refuse, or None. `identity.x509_parse` holds
each extension it decodes to `EXTENSION_RULES`, the names to `name_problem`,
and reads the validity with `read_time`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from ctypes import c_int as _INT
from ctypes import c_long as _LONG
from ctypes import c_void_p as _P
from datetime import UTC, datetime

from identity.openssl import (
    GEN_DIRNAME,
    GEN_DNS,
    GEN_EDIPARTY,
    GEN_EMAIL,
    GEN_IPADD,
    GEN_URI,
    GEN_X400,
    V_ASN1_GENERALIZEDTIME,
    V_ASN1_IA5STRING,
    V_ASN1_INTEGER,
    V_ASN1_NEG_INTEGER,
    V_ASN1_NUMERICSTRING,
    V_ASN1_OBJECT,
    V_ASN1_PRINTABLESTRING,
    V_ASN1_UTCTIME,
    V_ASN1_UTF8STRING,
    ASN1_PRINTABLE_type,
    ASN1_STRING_get0_data,
    ASN1_STRING_length,
    ASN1_STRING_type,
    ASN1_TIME_to_tm,
    CRYPTO_free,
    GENERAL_NAME_get0_value,
    NID_id_qt_cps,
    NID_id_qt_unotice,
    OBJ_obj2nid,
    OBJ_txt2nid,
    OPENSSL_sk_num,
    SCT_get_version,
    X509_NAME_add_entry,
    X509_NAME_entry_count,
    X509_NAME_ENTRY_get_data,
    X509_NAME_ENTRY_set,
    X509_NAME_free,
    X509_NAME_get0_der,
    X509_NAME_get_entry,
    X509_NAME_new,
    bytes_at,
    i2d_X509_NAME,
    openssl_error,
    stack_items,
    string_data,
)

__all__ = ["EXTENSION_RULES", "name_problem", "read_time"]


_TLS_FEATURES = frozenset(
    {5, 17}
)  # status_request, status_request_v2: cryptography's TLSFeatureType


class _Tm(ctypes.Structure):
    """struct tm, with room to spare: ASN1_TIME_to_tm writes the whole of the C one."""

    _fields_ = (
        ("tm_sec", _INT),
        ("tm_min", _INT),
        ("tm_hour", _INT),
        ("tm_mday", _INT),
        ("tm_mon", _INT),
        ("tm_year", _INT),
        ("tm_wday", _INT),
        ("tm_yday", _INT),
        ("tm_isdst", _INT),
        ("tm_gmtoff", _LONG),  # glibc and musl
        ("tm_zone", _P),
        ("_spare", ctypes.c_char * 64),
    )


def read_time(asn1_time: int, what: str) -> datetime:
    """A UTCTime or GeneralizedTime as DER (RFC 5280) writes it, seconds and Z, as
    cryptography reads it; ValueError otherwise."""
    tm = _Tm()
    if not asn1_time or ASN1_TIME_to_tm(asn1_time, ctypes.byref(tm)) != 1:
        raise openssl_error(f"invalid {what} time")
    problem = _not_der_time(asn1_time)
    if problem:
        raise ValueError(f"{what}: {problem}")
    try:
        return datetime(
            tm.tm_year + 1900,
            tm.tm_mon + 1,
            tm.tm_mday,
            tm.tm_hour,
            tm.tm_min,
            tm.tm_sec,
            tzinfo=UTC,
        )
    except ValueError as exc:  # year 0000, which RFC 5280's syntax allows and datetime not
        raise ValueError(f"{what}: {exc}") from None


def _not_der_time(asn1_time: int) -> str | None:
    size = {V_ASN1_UTCTIME: 13, V_ASN1_GENERALIZEDTIME: 15}.get(ASN1_STRING_type(asn1_time))
    data = string_data(asn1_time)
    if len(data) != size or not data.endswith(b"Z"):
        return f"a time not in DER: {data.decode(errors='replace')!r}"
    return None


# Each rule reads a decoded extension through the public struct of x509v3.h that
# OpenSSL decoded it into, and says what cryptography's type for it would refuse.


class _BasicConstraints(ctypes.Structure):
    _fields_ = (("ca", _INT), ("pathlen", _P))


class _AuthorityKeyId(ctypes.Structure):
    _fields_ = (("keyid", _P), ("issuer", _P), ("serial", _P))


class _AccessDescription(ctypes.Structure):
    _fields_ = (("method", _P), ("location", _P))


class _DistPoint(ctypes.Structure):
    _fields_ = (("distpoint", _P), ("reasons", _P), ("crl_issuer", _P), ("dp_reasons", _INT))


class _DistPointName(ctypes.Structure):
    _fields_ = (("type", _INT), ("name", _P), ("dpname", _P))


class _NameConstraints(ctypes.Structure):
    _fields_ = (("permitted", _P), ("excluded", _P))


class _GeneralSubtree(ctypes.Structure):
    _fields_ = (("base", _P), ("minimum", _P), ("maximum", _P))


class _PolicyConstraints(ctypes.Structure):
    _fields_ = (("require_explicit_policy", _P), ("inhibit_policy_mapping", _P))


class _PrivateKeyUsagePeriod(ctypes.Structure):
    _fields_ = (("not_before", _P), ("not_after", _P))


class _PolicyInfo(ctypes.Structure):
    _fields_ = (("policyid", _P), ("qualifiers", _P))


class _PolicyQualifierInfo(ctypes.Structure):
    _fields_ = (("pqualid", _P), ("d", _P))


class _UserNotice(ctypes.Structure):
    _fields_ = (("noticeref", _P), ("exptext", _P))


class _NoticeReference(ctypes.Structure):
    _fields_ = (("organization", _P), ("noticenos", _P))


class _Asn1Type(ctypes.Structure):  # ASN1_TYPE (asn1.h)
    _fields_ = (("type", _INT), ("value", _P))


def _first(*problems: Callable[[], str | None]) -> str | None:
    for problem in problems:
        found = problem()
        if found:
            return found
    return None


def _general_names(stack: int | None, *, constraint: bool = False) -> str | None:
    for name in stack_items(stack):
        problem = _general_name(name, constraint=constraint)
        if problem:
            return problem
    return None


def _general_name(name: int, *, constraint: bool = False) -> str | None:
    """What cryptography refuses in a GeneralName: an x400Address or ediPartyName, an
    IA5String (URI, DNS, email) that is not UTF-8, an iPAddress that is neither an
    address nor a network (`_ip_address`), a directoryName it refuses as a name."""
    kind = _INT()
    value = GENERAL_NAME_get0_value(name, ctypes.byref(kind))
    if kind.value in (GEN_X400, GEN_EDIPARTY):
        return "an x400Address or ediPartyName"
    if kind.value in (GEN_URI, GEN_DNS, GEN_EMAIL):
        try:
            string_data(value).decode()
        except UnicodeDecodeError:
            return "a name is not UTF-8"
    if kind.value == GEN_IPADD:
        return _ip_address(string_data(value), constraint)
    if kind.value == GEN_DIRNAME:
        return name_problem(value, as_text=True)
    return None


def _ip_address(data: bytes, constraint: bool) -> str | None:
    """cryptography reads 4 or 16 bytes as an address, 8 or 32 as a network (address
    and prefix mask, no host bits): only a network in name constraints."""
    if len(data) in (4, 16) and not constraint:
        return None
    if len(data) not in (8, 32):
        return f"an iPAddress of {len(data)} bytes"
    half = len(data) // 2
    address, mask = (int.from_bytes(part, "big") for part in (data[:half], data[half:]))
    hosts = ~mask & ((1 << (8 * half)) - 1)
    if hosts & (hosts + 1) or address & hosts:
        return "an iPAddress constraint that is no network"
    return None


#: The string types cryptography reads in a name (its _ASN1Type), by universal tag.
_NAME_STRING_TYPES = frozenset({4, 12, 18, 19, 20, 22, 23, 24, 26, 28, 30})


def name_problem(name: int, *, as_text: bool = False) -> str | None:
    """What cryptography refuses in a name that OpenSSL's decoder takes: a value of a
    type that is no string (`as_text`: only where cryptography makes the name a
    Python value, as for a directoryName in `.extensions`), a PrintableString or
    NumericString with a character outside its set, or a name that is not DER (a
    SET OF out of order, a primitive SET...), seen by building the name anew from
    its entries: OpenSSL encodes back the bytes it read for a name it decoded."""
    copy = X509_NAME_new()
    if not copy:
        raise openssl_error("X509_NAME_new")
    encoded = _P()
    try:
        previous = -1
        for i in range(X509_NAME_entry_count(name)):
            entry = X509_NAME_get_entry(name, i)
            problem = _name_value(X509_NAME_ENTRY_get_data(entry), as_text)
            if problem:
                return problem
            rdn = X509_NAME_ENTRY_set(entry)
            if X509_NAME_add_entry(copy, entry, -1, -1 if rdn == previous else 0) != 1:
                raise openssl_error("X509_NAME_add_entry")
            previous = rdn
        original, size = _P(), ctypes.c_size_t()
        if X509_NAME_get0_der(name, ctypes.byref(original), ctypes.byref(size)) != 1:
            raise openssl_error("X509_NAME_get0_der")
        length = i2d_X509_NAME(copy, ctypes.byref(encoded))
        if length != size.value or bytes_at(encoded.value, length) != bytes_at(
            original.value, length
        ):
            return "a name that is not DER"
        return None
    finally:
        CRYPTO_free(encoded.value, None, 0)
        X509_NAME_free(copy)


def _name_value(value: int, as_text: bool) -> str | None:
    kind = ASN1_STRING_type(value)
    if as_text and kind not in _NAME_STRING_TYPES:
        return f"a name attribute of ASN.1 type {kind}"
    if kind == V_ASN1_NUMERICSTRING and string_data(value).strip(b"0123456789 "):
        return "a NumericString name with other characters"
    if kind == V_ASN1_PRINTABLESTRING:
        pointer, size = ASN1_STRING_get0_data(value), ASN1_STRING_length(value)
        if size and ASN1_PRINTABLE_type(pointer, size) != V_ASN1_PRINTABLESTRING:
            return "a PrintableString name with other characters"
    return None


def _u64(integer: int | None, what: str) -> str | None:
    """cryptography reads these INTEGERs as u64: negative or 2**64 and up is refused."""
    if integer and (
        ASN1_STRING_type(integer) == V_ASN1_NEG_INTEGER or len(string_data(integer)) > 8
    ):
        return f"{what} is not an unsigned 64-bit integer"
    return None


def _non_empty(stack: int) -> str | None:
    return None if OPENSSL_sk_num(stack) else "empty"


def _basic_constraints(decoded: int) -> str | None:
    bc = _BasicConstraints.from_address(decoded)
    if bc.ca not in (0, 0xFF):  # OpenSSL keeps the BOOLEAN's byte, and encodes it back
        return "cA is not a DER BOOLEAN"
    if bc.pathlen and not bc.ca:
        return "a pathLenConstraint without cA"
    return _u64(bc.pathlen, "pathLenConstraint")


def _authority_key_id(decoded: int) -> str | None:
    aki = _AuthorityKeyId.from_address(decoded)
    if bool(aki.issuer) != bool(aki.serial):
        return "authorityCertIssuer without authorityCertSerialNumber, or the reverse"
    return _general_names(aki.issuer)


def _access_descriptions(decoded: int) -> str | None:
    return _first(
        *(
            lambda d=d: _general_name(_AccessDescription.from_address(d).location)
            for d in stack_items(decoded)
        )
    )


def _distribution_points(decoded: int) -> str | None:
    for point in map(_DistPoint.from_address, stack_items(decoded)):
        if not point.distpoint and not point.crl_issuer:
            return "a distribution point with neither name nor CRL issuer"
        if point.distpoint:
            name = _DistPointName.from_address(point.distpoint)
            problem = _general_names(name.name) if name.type == 0 else None
            if problem:
                return problem
        problem = _general_names(point.crl_issuer)
        if problem:
            return problem
    return None


def _name_constraints(decoded: int) -> str | None:
    constraints = _NameConstraints.from_address(decoded)
    if not constraints.permitted and not constraints.excluded:
        return "neither permitted nor excluded subtrees"
    for subtrees in (constraints.permitted, constraints.excluded):
        if subtrees and not OPENSSL_sk_num(subtrees):
            return "an empty list of subtrees"
        for subtree in map(_GeneralSubtree.from_address, stack_items(subtrees)):
            if subtree.minimum and not any(string_data(subtree.minimum)):
                return "a subtree's minimum encodes the default, 0"
            problem = (
                _general_name(subtree.base, constraint=True)
                or _u64(subtree.minimum, "minimum")
                or _u64(subtree.maximum, "maximum")
            )
            if problem:
                return problem
    return None


def _policy_constraints(decoded: int) -> str | None:
    pc = _PolicyConstraints.from_address(decoded)
    if not pc.require_explicit_policy and not pc.inhibit_policy_mapping:
        return "empty"
    return _u64(pc.require_explicit_policy, "requireExplicitPolicy") or _u64(
        pc.inhibit_policy_mapping, "inhibitPolicyMapping"
    )


def _private_key_usage_period(decoded: int) -> str | None:
    period = _PrivateKeyUsagePeriod.from_address(decoded)
    if not period.not_before and not period.not_after:
        return "empty"
    problem = _der_time(period.not_before) or _der_time(period.not_after)
    if not problem and period.not_before and period.not_after:
        try:
            start, end = (
                read_time(t, "privateKeyUsagePeriod") for t in (period.not_before, period.not_after)
            )
        except ValueError as exc:
            return str(exc)
        if start > end:
            return "notBefore after notAfter"
    return problem


def _der_time(asn1_time: int | None) -> str | None:
    if not asn1_time:
        return None
    tm = _Tm()
    if ASN1_TIME_to_tm(asn1_time, ctypes.byref(tm)) != 1:
        return "an invalid time"
    return _not_der_time(asn1_time)


def _certificate_policies(decoded: int) -> str | None:
    if not OPENSSL_sk_num(decoded):
        return "empty"
    for policy in map(_PolicyInfo.from_address, stack_items(decoded)):
        for qualifier in map(_PolicyQualifierInfo.from_address, stack_items(policy.qualifiers)):
            kind = OBJ_obj2nid(qualifier.pqualid)
            if kind == NID_id_qt_cps:
                if not string_data(qualifier.d).isascii():
                    return "a CPS URI that is not ASCII"
            elif kind == NID_id_qt_unotice:
                notice = _UserNotice.from_address(qualifier.d)
                texts = [notice.exptext]
                if notice.noticeref:
                    texts.append(_NoticeReference.from_address(notice.noticeref).organization)
                if any(_display_text(text) for text in texts):
                    return "a user notice's text is not of its type"
            else:
                return "a policy qualifier that is neither CPS URI nor user notice"
    return None


def _display_text(text: int | None) -> bool:
    """True if an IA5String is not ASCII, or a UTF8String not UTF-8."""
    if not text:
        return False
    kind, data = ASN1_STRING_type(text), string_data(text)
    if kind == V_ASN1_IA5STRING:
        return not data.isascii()
    if kind == V_ASN1_UTF8STRING:
        try:
            data.decode()
        except UnicodeDecodeError:
            return True
    return False


def _inhibit_any_policy(decoded: int) -> str | None:
    """cryptography reads skipCerts as any non-negative integer."""
    if ASN1_STRING_type(decoded) == V_ASN1_NEG_INTEGER:
        return "a negative skipCerts"
    return None


def _tls_features(decoded: int) -> str | None:
    features = stack_items(decoded)
    if not features:
        return "empty"
    for feature in features:
        negative = ASN1_STRING_type(feature) == V_ASN1_NEG_INTEGER
        if negative or int.from_bytes(string_data(feature), "big") not in _TLS_FEATURES:
            return "a TLS feature cryptography has no name for"
    return None


def _signed_certificate_timestamps(decoded: int) -> str | None:
    """cryptography reads only v1 SCTs; OpenSSL keeps one of another version as bytes."""
    if any(SCT_get_version(sct) != 0 for sct in stack_items(decoded)):
        return "an SCT that is not v1"
    return None


def _certificate_template(decoded: int) -> str | None:
    """SEQUENCE { templateID OID, majorVersion INTEGER (u32) OPTIONAL, minor OPTIONAL }."""
    fields = [_Asn1Type.from_address(field) for field in stack_items(decoded)]
    kinds = [field.type for field in fields]
    if not 1 <= len(kinds) <= 3 or kinds[0] != V_ASN1_OBJECT:
        return "not a template ID and versions"
    for field in fields[1:]:
        if (
            field.type != V_ASN1_INTEGER
            or ASN1_STRING_type(field.value) == V_ASN1_NEG_INTEGER
            or len(string_data(field.value)) > 4
        ):
            return "a template version that is not an unsigned 32-bit integer"
    return None


def _rules() -> dict[int | str, Callable[[int], str | None]]:
    by_oid: dict[str, Callable[[int], str | None]] = {
        "2.5.29.16": _private_key_usage_period,
        "2.5.29.17": lambda d: _non_empty(d) or _general_names(d),
        "2.5.29.18": lambda d: _non_empty(d) or _general_names(d),
        "2.5.29.19": _basic_constraints,
        "2.5.29.30": _name_constraints,
        "2.5.29.31": _distribution_points,
        "2.5.29.32": _certificate_policies,
        "2.5.29.35": _authority_key_id,
        "2.5.29.36": _policy_constraints,
        "2.5.29.37": _non_empty,
        "2.5.29.46": _distribution_points,
        "2.5.29.54": _inhibit_any_policy,
        "1.3.6.1.5.5.7.1.1": _access_descriptions,
        "1.3.6.1.5.5.7.1.11": _access_descriptions,
        "1.3.6.1.5.5.7.1.24": _tls_features,
        "1.3.6.1.4.1.11129.2.4.2": _signed_certificate_timestamps,
        "1.3.6.1.4.1.311.21.7": _certificate_template,
    }
    return {OBJ_txt2nid(oid.encode()) or oid: rule for oid, rule in by_oid.items()}


EXTENSION_RULES = _rules()
