"""control.yaml: the documented example, what is required, and every error at once with its path."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from control import config as control_config
from control.config import ControlConfig, ControlLimits, TlsFiles, parse
from identity import TrustDomain
from identity.configfile import ConfigError, Listen
from identity.grpcserving import GrpcLimits
from identity.serving import ConnectionLimits

TLS = {"cert_file": "svid.pem", "key_file": "svid.key", "bundle_file": "bundle.pem"}


def test_the_documented_example_is_the_defaults(tmp_path: Path) -> None:
    example = control_config.__doc__.split("\n\n", 1)[1]  # type: ignore[union-attr]
    path = tmp_path / "control.yaml"
    path.write_text(example)
    config = control_config.load(path)
    assert config == ControlConfig(
        TrustDomain("example.org"),
        TlsFiles(
            Path("/var/run/outrider/svid.pem"),
            Path("/var/run/outrider/svid.key"),
            Path("/var/run/outrider/bundle.pem"),
        ),
        kubeconfig=Path("/path/kubeconfig"),
        status=Listen("0.0.0.0", 15015),
    )
    assert config.listen == Listen("0.0.0.0", 15012)
    assert config.debug == Listen("127.0.0.1", 15014)
    assert config.limits == ControlLimits()
    assert config.limits.connections.max_connections == 20_000


def test_relative_files_are_from_the_config_files_directory() -> None:
    config = parse({"trust_domain": "example.org", "tls": TLS}, base=Path("/etc/outrider"))
    assert config.tls.bundle_file == Path("/etc/outrider/bundle.pem")
    assert config.kubeconfig is None  # in-cluster
    assert config.status is None  # off unless asked for
    assert config.default_action == "allow-authenticated"
    assert config.outbound_traffic_policy == "allow-any"


def test_the_kubeconfig_flag_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "control.yaml"
    path.write_text("trust_domain: example.org\nkubeconfig: a\ntls: " + str(TLS) + "\n")
    assert control_config.load(path).kubeconfig == tmp_path / "a"
    assert control_config.load(path, kubeconfig=Path("/b")).kubeconfig == Path("/b")


def test_every_key_is_read() -> None:
    raw = {
        "trust_domain": "prod.example",
        "listen": "127.0.0.1:0",
        "debug": "[::1]:9",
        "status": "127.0.0.1:7",
        "tls": TLS,
        "mesh_namespace": "mesh",
        "default_action": "deny",
        "outbound_traffic_policy": "registry-only",
        "limits": {
            "max_connections": 5,
            "handshake_timeout": "2s",
            "idle_timeout": "3s",
            "max_message_bytes": 8192,
            "max_concurrent_streams": 2,
        },
    }
    config = parse(raw, base=Path("/"))
    assert config.listen == Listen("127.0.0.1", 0)
    assert config.debug == Listen("::1", 9)
    assert config.status == Listen("127.0.0.1", 7)
    assert (config.mesh_namespace, config.default_action) == ("mesh", "deny")
    assert config.outbound_traffic_policy == "registry-only"
    assert config.limits == ControlLimits(
        ConnectionLimits(5, timedelta(seconds=2), timedelta(seconds=3)), GrpcLimits(8192, 2)
    )


def test_every_error_is_reported_at_once_with_its_key_path() -> None:
    raw = {
        "trust_domain": "Not A Domain",
        "listen": "nowhere",
        "tls": {"cert_file": "", "bundle": "x"},
        "default_action": "allow",
        "outbound_traffic_policy": "deny",
        "limits": {"max_message_bytes": 100, "idle_timeout": "soon"},
        "extra": 1,
    }
    with pytest.raises(ConfigError) as raised:
        parse(raw, base=Path("/"), source="control.yaml")
    errors = raised.value.errors
    assert raised.value.source == "control.yaml"
    for path in (
        "trust_domain:",
        "listen:",
        "tls.cert_file: must be a non-empty string",
        "tls.key_file: required",
        "tls.bundle_file: required",
        "tls.bundle: unknown key",
        "default_action: must be one of allow-authenticated, deny",
        "outbound_traffic_policy: must be one of allow-any, registry-only",
        "limits.max_message_bytes: must be an integer >= 4096",
        "limits.idle_timeout:",
        "extra: unknown key",
    ):
        assert any(error.startswith(path) for error in errors), (path, errors)
    assert not any(e.startswith("tls.cert_file: required") for e in errors)


def test_the_trust_domain_and_tls_are_required() -> None:
    with pytest.raises(ConfigError) as raised:
        parse({}, base=Path("/"))
    assert raised.value.errors == [
        "trust_domain: required: agents' SVIDs must be of this trust domain",
        "tls.cert_file: required: agents reach the control plane over mTLS only",
        "tls.key_file: required: agents reach the control plane over mTLS only",
        "tls.bundle_file: required: agents reach the control plane over mTLS only",
    ]


def test_the_status_port_cannot_share_the_debug_ports_address() -> None:
    raw = {"trust_domain": "example.org", "tls": TLS, "debug": "127.0.0.1:9", "status": "0.0.0.0:9"}
    with pytest.raises(ConfigError) as raised:
        parse(raw, base=Path("/"))
    assert raised.value.errors == ["status: 0.0.0.0:9 is also the address of debug or listen"]


@pytest.mark.parametrize("istio", ["REGISTRY_ONLY", "ALLOW_ANY"])
def test_istios_spelling_of_the_outbound_policy_is_refused_with_ours(istio: str) -> None:
    raw = {
        "trust_domain": "cluster.local",
        "tls": {"cert_file": "c", "key_file": "k", "bundle_file": "b"},
        "outbound_traffic_policy": istio,
    }
    with pytest.raises(ConfigError) as raised:
        parse(raw, base=Path("/"))
    ours = istio.lower().replace("_", "-")
    assert raised.value.errors == [
        "outbound_traffic_policy: must be one of allow-any, registry-only"
        f" (Istio's {istio} is {ours} here)"
    ]
