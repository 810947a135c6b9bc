"""injector.yaml: defaults, the documented example, and every error at once with its key path."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from identity import TrustDomain
from identity.configfile import ConfigError, Listen
from identity.serving import ConnectionLimits
from injector import config as injector_config
from injector.config import InjectorConfig, Limits, parse
from injector.core.settings import CaptureSettings, Quantity, Settings


def test_an_empty_file_is_every_default() -> None:
    assert parse({}, base=Path("/etc")) == InjectorConfig()
    assert InjectorConfig().settings == Settings()
    assert InjectorConfig().listen == Listen("0.0.0.0", 9443)
    assert InjectorConfig().limits == Limits(3145728, 64)


def test_the_documented_example_is_the_defaults_with_tls(tmp_path: Path) -> None:
    example = injector_config.__doc__.split("\n\n", 2)[2]  # type: ignore[union-attr]
    path = tmp_path / "injector.yaml"
    path.write_text(example)
    config = injector_config.load(path, require_tls=True)
    assert config.settings == Settings()
    assert config.limits == Limits()
    assert config.tls is not None
    assert str(config.tls.cert_file) == "/etc/outrider/injector-tls/tls.crt"


def test_every_key_is_read(tmp_path: Path) -> None:
    raw = {
        "listen": "127.0.0.1:0",
        "tls": {"cert_file": "tls.crt", "key_file": "tls.key"},
        "trust_domain": "prod.example",
        "system_namespace": "mesh",
        "native_sidecar": False,
        "agent": {
            "image": "registry.example.com/agent:9",
            "uid": 2000,
            "log_level": "warning",
            "resources": {"requests": {"cpu": "10m"}, "limits": {"memory": "1Gi"}},
            "token_expiration_seconds": 600,
        },
        "ca": {"address": "ca.mesh.svc:443", "bundle_configmap": "bundle"},
        "control": {"address": "cp.mesh.svc:15012"},
        "workload_api": {"enabled": True},
        "limits": {
            "max_body_bytes": 65536,
            "max_json_depth": 32,
            "max_connections": 50,
            "handshake_timeout": "2s",
            "idle_timeout": "500ms",
        },
    }
    config = parse(raw, base=tmp_path)
    s = config.settings
    assert (s.trust_domain, s.system_namespace, s.native_sidecar) == (
        TrustDomain("prod.example"),
        "mesh",
        False,
    )
    assert (s.agent.image, s.agent.uid, s.agent.log_level) == (
        "registry.example.com/agent:9",
        2000,
        "warning",
    )
    assert s.agent.resources.requests.cpu == Quantity.parse("10m")
    assert s.agent.resources.requests.memory == Quantity.parse("64Mi")  # the default
    assert s.agent.resources.limits.memory == Quantity.parse("1Gi")
    assert s.agent.token_expiration_seconds == 600
    assert (s.ca.address, s.ca.bundle_configmap) == ("ca.mesh.svc:443", "bundle")
    assert s.control.address == "cp.mesh.svc:15012"
    assert s.workload_api.enabled is True
    assert config.limits == Limits(
        65536, 32, ConnectionLimits(50, timedelta(seconds=2), timedelta(milliseconds=500))
    )
    assert config.tls is not None and config.tls.cert_file == tmp_path / "tls.crt"
    assert config.listen == Listen("127.0.0.1", 0)


def test_every_error_is_reported_at_once_with_its_key_path() -> None:
    raw = {
        "colour": "blue",
        "trust_domain": "Not A Domain",
        "system_namespace": "Outrider_System",
        "native_sidecar": "yes",
        "agent": {
            "image": "evil image",
            "uid": 0,
            "log_level": "loud",
            "resources": {"requests": {"cpu": "2", "memory": "many"}, "limits": {"gpu": 1}},
            "token_expiration_seconds": 60,
        },
        "ca": {"address": "no-port", "bundle_configmap": "Bad_Name"},
        "control": {"address": "cp:0", "spiffe_id": "x"},
        "capture": {"enabled": "yes", "inbound_port": 15020, "exclude_outbound_cidrs": ["x"]},
        "workload_api": {"enabled": "enabled", "socket": "/tmp/s"},
        "limits": {
            "max_body_bytes": 10,
            "max_json_depth": 5,
            "max_connections": 0,
            "handshake_timeout": "soon",
            "idle_timeout": "0s",
        },
    }
    with pytest.raises(ConfigError) as error:
        parse(raw, base=Path("/"), require_tls=True)
    keys = [e.split(":")[0] for e in error.value.errors]
    assert keys == [
        "colour",
        "trust_domain",
        "system_namespace",
        "native_sidecar",
        "agent.image",
        "agent.log_level",
        "agent.uid",
        "agent.resources.requests.memory",
        "agent.resources.limits.gpu",
        "agent.resources.requests.cpu",
        "agent.token_expiration_seconds",
        "ca.address",
        "ca.bundle_configmap",
        "control.spiffe_id",
        "control.address",
        "capture.enabled",
        "capture.inbound_port",
        "capture.exclude_outbound_cidrs",
        "workload_api.socket",  # the agent's socket is where the injector mounts it, always
        "workload_api.enabled",
        "tls.cert_file",
        "tls.key_file",
        "limits.max_body_bytes",
        "limits.max_json_depth",
        "limits.max_connections",
        "limits.handshake_timeout",
        "limits.idle_timeout",
    ]


def test_tls_is_required_only_to_serve() -> None:
    assert parse({}, base=Path("/")).tls is None
    with pytest.raises(ConfigError, match=r"tls\.cert_file: required"):
        parse({}, base=Path("/"), require_tls=True)


@pytest.mark.parametrize("section", ["ca", "control"])
@pytest.mark.parametrize("address", ["ca.svc:0", "ca.svc", ":8443"])
def test_the_ca_and_control_plane_addresses_must_be_host_and_port(
    section: str, address: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{section}\.address"):
        parse({section: {"address": address}}, base=Path("/"))


def test_the_control_plane_is_the_mesh_namespaces_by_default() -> None:
    settings = parse({}, base=Path("/")).settings
    assert settings.control.address == "outrider-control.outrider-system.svc:15012"


def test_a_file_that_is_not_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "injector.yaml"
    path.write_text("listen: [unclosed")
    with pytest.raises(ConfigError, match="cannot read"):
        injector_config.load(path)


def test_the_deploy_manifest_given_as_config_says_where_the_config_is() -> None:
    """deploy/base/injector.yaml is what a user finds first: several documents, the config
    a ConfigMap's text. The error says so and how to take the config out of it."""
    manifest = Path(__file__).resolve().parents[2] / "deploy" / "base" / "injector.yaml"
    with pytest.raises(ConfigError) as raised:
        injector_config.load(manifest)
    (said,) = raised.value.errors
    assert said.startswith("cannot read: several YAML documents (---), a config is one:"), said
    assert "under a ConfigMap's data" in said and "-o jsonpath=" in said


def test_the_example_in_the_docs_parses(tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "injector.md"
    section = docs.read_text().split("## injector.yaml", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert parse(yaml.safe_load(block), base=tmp_path, require_tls=True).settings == Settings()


def test_capture_is_on_by_default_with_the_contracted_ports() -> None:
    assert parse({}, base=Path("/")).settings.capture == CaptureSettings(
        enabled=True, inbound_port=15006, outbound_port=15007
    )


def test_every_capture_key_is_read() -> None:
    raw = {
        "capture": {
            "enabled": False,
            "inbound_port": 16006,
            "outbound_port": 16007,
            "exclude_inbound_ports": [9090, 9091, 9090],
            "exclude_outbound_ports": [5432],
            "exclude_outbound_cidrs": ["169.254.169.254/32", "fd00::/8"],
        }
    }
    assert parse(raw, base=Path("/")).settings.capture == CaptureSettings(
        False, 16006, 16007, (9090, 9091), (5432,), ("169.254.169.254/32", "fd00::/8")
    )


@pytest.mark.parametrize(
    ("capture", "error"),
    [
        ({"inbound_port": 0}, "capture.inbound_port: 0 is not a TCP port (1-65535)"),
        (
            {"outbound_port": "15007"},
            "capture.outbound_port: '15007' is a string: write the port as a number, 15007",
        ),
        (
            {"exclude_inbound_ports": ["9090"]},
            "capture.exclude_inbound_ports: '9090' is a string: write the port as a number, 9090",
        ),
        (
            {"inbound_port": 15000},
            "capture.inbound_port: 15000 is the agent's admin or status port",
        ),
        (
            {"outbound_port": 15010},
            "capture.outbound_port: 15010 is in 15001-15035, the agent's explicit outbound "
            "listeners (only 15006 and 15007 are kept out of it)",
        ),
        (
            {"outbound_port": 15006},
            "capture.outbound_port: 15006 is the inbound_port too: the agent serves the two "
            "apart, so they must differ",
        ),
        ({"exclude_inbound_ports": "15020"}, "capture.exclude_inbound_ports: must be a list"),
        (
            {"exclude_outbound_ports": [80, 70000]},
            "capture.exclude_outbound_ports: 70000 is not a TCP port (1-65535)",
        ),
        (
            {"exclude_outbound_cidrs": ["10.0.0.1/8"]},
            "capture.exclude_outbound_cidrs: '10.0.0.1/8': host bits set (did you mean "
            "10.0.0.0/8?)",
        ),
        ({"exclude_inbound": [1]}, "capture.exclude_inbound: unknown key"),
    ],
)
def test_a_bad_capture_setting_is_reported_with_its_key_path(
    capture: dict[str, object], error: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse({"capture": capture}, base=Path("/"))
    assert info.value.errors == [error]


@pytest.mark.parametrize(
    "fields",
    [{"inbound_port": 15020}, {"outbound_port": 0}, {"exclude_outbound_cidrs": ("nope",)}],
)
def test_capture_settings_check_themselves_too(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CaptureSettings(**fields)  # type: ignore[arg-type]
