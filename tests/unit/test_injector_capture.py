"""Capture at injection: the outrider-capture init container, the agent's capture ports,
and who may turn it off (the cluster's settings and a namespace label, never a pod)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from identity import SpiffeId
from identity.capture import rules_from_flags
from injector.core import MUTATE, MUTATE_WITHOUT_CAPTURE, BadRequest, Settings, mutate, settings_for
from injector.core.settings import CaptureSettings
from injector.core.sidecar import AGENT, CAPTURE, agent_config, capture_container
from outrider.cli import parser
from tests.unit.test_injector_core import agent_of, annotated, injected, pod

SETTINGS = Settings()
WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")


def capture_of(patched: dict[str, Any]) -> dict[str, Any]:
    [capture] = [c for c in patched["spec"].get("initContainers", []) if c["name"] == CAPTURE]
    return capture


def test_the_capture_container_applies_the_settings_ports_as_the_agents_uid() -> None:
    capture = capture_of(injected(pod()))
    assert capture["image"] == agent_of(injected(pod()))["image"]  # the agent's own image
    assert capture["args"] == [
        "capture",
        "apply",
        "--inbound-port",
        "15006",
        "--outbound-port",
        "15007",
        "--agent-uid",
        "1337",
        "--exclude-inbound-ports",
        "15020",  # the kubelet's probes reach the status port in plain
    ]


def test_the_exclusions_of_the_settings_reach_the_capture_container() -> None:
    capture = CaptureSettings(
        inbound_port=16006,
        outbound_port=16007,
        exclude_inbound_ports=(9090, 15020),
        exclude_outbound_ports=(5432, 6379),
        exclude_outbound_cidrs=("169.254.169.254/32", "fd00::/8"),
    )
    settings = replace(SETTINGS, capture=capture, agent=replace(SETTINGS.agent, uid=2000))
    assert capture_container(settings)["args"] == [
        "capture",
        "apply",
        "--inbound-port",
        "16006",
        "--outbound-port",
        "16007",
        "--agent-uid",
        "2000",
        "--exclude-inbound-ports",
        "9090,15020",
        "--exclude-outbound-ports",
        "5432,6379",
        "--exclude-outbound-cidrs",
        "169.254.169.254/32,fd00::/8",
    ]
    bootstrap = agent_config(WEB, settings)
    assert bootstrap["capture"] == {"inbound_port": 16006, "outbound_port": 16007}


def test_the_capture_container_has_the_agents_hardening_but_two_capabilities_as_root() -> None:
    patched = injected(pod())
    agent, capture = agent_of(patched)["securityContext"], capture_of(patched)["securityContext"]
    # Capabilities of a non-root user are not effective without ambient capabilities.
    assert capture == {
        **agent,
        "runAsNonRoot": False,
        "runAsUser": 0,
        "runAsGroup": 0,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
    }
    assert capture["privileged"] is False and capture["allowPrivilegeEscalation"] is False
    assert capture["readOnlyRootFilesystem"] is True
    assert capture_of(patched)["resources"]["limits"] == {"cpu": "500m", "memory": "128Mi"}


@pytest.mark.parametrize(
    "settings", [SETTINGS.without_capture(), replace(SETTINGS, capture=CaptureSettings(False))]
)
def test_with_capture_off_there_is_no_capture_container_and_no_capture_ports(
    settings: Settings,
) -> None:
    patched = injected(pod(), settings)
    assert [c["name"] for c in patched["spec"]["initContainers"]] == [AGENT]
    assert "capture" not in agent_config(WEB, settings)


@pytest.mark.parametrize(
    "key",
    [
        "outrider.io/capture",
        "outrider.io/exclude-inbound-ports",
        "outrider.io/exclude-outbound-ports",
        "outrider.io/exclude-outbound-cidrs",
    ],
)
def test_no_pod_annotation_turns_capture_off_or_excludes_anything(key: str) -> None:
    source = annotated({key: "disabled" if key.endswith("capture") else "8080"})
    mutation = mutate(source, "shop", SETTINGS)
    patched = injected(source)
    assert capture_of(patched)["args"][-2:] == ["--exclude-inbound-ports", "15020"]
    assert mutation.warnings == (
        f"outrider: {key}: ignored: capture is the cluster's to set (injector.yaml capture:, "
        "or the namespace label outrider.io/capture=disabled), never a pod's",
    )


@pytest.mark.parametrize(("path", "captured"), [(MUTATE, True), (MUTATE_WITHOUT_CAPTURE, False)])
def test_the_webhook_path_says_whether_the_namespace_is_captured(path: str, captured: bool) -> None:
    assert settings_for(SETTINGS, path, []).capture.enabled is captured


@pytest.mark.parametrize(
    "query",
    [
        [("capture", "disabled")],  # what a webhook's path cannot carry: never the label's
        [("capture", "enabled")],
        [("capture", "disabled"), ("x", "1")],
        [("exclude", "8080")],
    ],
)
@pytest.mark.parametrize("path", [MUTATE, MUTATE_WITHOUT_CAPTURE])
def test_any_query_is_a_bad_request_not_a_guess(path: str, query: list[tuple[str, str]]) -> None:
    with pytest.raises(BadRequest) as info:
        settings_for(SETTINGS, path, query)
    assert (info.value.reason, info.value.status) == ("bad_query", 400)


@pytest.mark.parametrize(
    "capture",
    [
        CaptureSettings(),
        CaptureSettings(
            inbound_port=16006,
            exclude_inbound_ports=(9090,),
            exclude_outbound_ports=(5432,),
            exclude_outbound_cidrs=("169.254.169.254/32", "fd00::/8"),
        ),
    ],
)
def test_the_capture_command_reads_the_injected_args_as_the_settings_rules(
    capture: CaptureSettings,
) -> None:
    settings = replace(SETTINGS, capture=capture)
    args = parser().parse_args(capture_container(settings)["args"])
    assert args.func.__name__ == "_capture_apply"
    flags = {k: getattr(args, k) for k in ("inbound_port", "outbound_port", "agent_uid")}
    flags |= {k: getattr(args, k) for k in vars(args) if k.startswith("exclude_")}
    assert rules_from_flags(**flags) == settings.capture_rules()
    assert 15020 in settings.capture_rules().exclude_inbound_ports


def init_names(source: dict[str, Any], settings: Settings) -> list[str]:
    return [c["name"] for c in injected(source, settings)["spec"]["initContainers"]]


def test_without_native_sidecars_the_apps_init_containers_run_before_capture() -> None:
    # No agent runs before the app's containers then: captured, an init container's
    # connections (a migration, a wait-for-db) would go to a port nobody listens on,
    # and the pod would never leave Init. Captured or not, they get no mTLS.
    setup = [{"name": "migrate", "image": "m:1"}, {"name": "wait", "image": "w:1"}]
    without = replace(SETTINGS, native_sidecar=False)
    assert init_names(pod(initContainers=setup), without) == ["migrate", "wait", CAPTURE]
    assert init_names(pod(initContainers=setup), SETTINGS) == [CAPTURE, AGENT, "migrate", "wait"]


def test_without_native_sidecars_capture_comes_before_the_apps_own_native_sidecars() -> None:
    # A container that keeps running is captured from its start: a connection it made
    # before the rules (an inbound one, in plain) would stay uncaptured for good.
    setup = [
        {"name": "migrate", "image": "m:1"},
        {"name": "shipper", "image": "s:1", "restartPolicy": "Always"},
        {"name": "late", "image": "l:1"},
    ]
    without = replace(SETTINGS, native_sidecar=False)
    assert init_names(pod(initContainers=setup), without) == [
        "migrate",
        CAPTURE,
        "shipper",
        "late",
    ]


@pytest.mark.parametrize(
    ("spec", "warning"),
    [
        (
            {"securityContext": {"runAsUser": 1337}},
            "container app runs as UID 1337, the agent's: its connections are not captured "
            "(no mTLS, and registry-only does not hold for it)",
        ),
        (
            {
                "containers": [
                    {"name": "app", "image": "a:1", "securityContext": {"runAsUser": 1337}}
                ]
            },
            "container app runs as UID 1337, the agent's: its connections are not captured "
            "(no mTLS, and registry-only does not hold for it)",
        ),
        *(
            (
                {"containers": [{"name": "app", "image": "a:1", "securityContext": context}]},
                "container app may change the pod's network (privileged, NET_ADMIN): it can "
                "undo capture, strict mTLS included",
            )
            for context in (
                {"privileged": True},
                {"capabilities": {"add": ["NET_ADMIN"]}},
                {"capabilities": {"add": ["CAP_NET_ADMIN"]}},
                {"capabilities": {"add": ["ALL"]}},
            )
        ),
        *(
            (
                {"containers": [{"name": "app", "image": "a:1", "lifecycle": {hook: handler}}]},
                f"container app: lifecycle.{hook}.{next(iter(handler))} reaches the app through"
                " capture, in plain from the node: on a STRICT port the agent refuses it; use"
                " an exec hook (for example a curl to localhost) instead",
            )
            for hook, handler in (
                ("preStop", {"httpGet": {"path": "/drain", "port": 8080}}),
                ("postStart", {"tcpSocket": {"port": "http"}}),
            )
        ),
    ],
)
def test_a_container_that_can_go_around_capture_is_injected_with_a_warning(
    spec: dict[str, Any], warning: str
) -> None:
    # Capture cannot stop it (Istio's istio-init cannot either); an admission policy can.
    mutation = mutate(pod(**spec), "shop", SETTINGS)
    assert mutation.reason == "injected"
    assert mutation.warnings == (f"outrider: {warning}",)


def test_a_container_that_sets_its_own_uid_is_judged_by_it() -> None:
    app = {"name": "app", "image": "a:1", "securityContext": {"runAsUser": 1000}}
    source = pod(securityContext={"runAsUser": 1337}, containers=[app])
    assert mutate(source, "shop", SETTINGS).warnings == ()
    assert (
        mutate(
            pod(securityContext={"runAsUser": 1337}), "shop", SETTINGS.without_capture()
        ).warnings
        == ()
    )
