"""The agent container, its volumes and its bootstrap config, built from typed values only.

Nothing here reads the pod: every value comes from the injector's settings or
from `AgentOptions`, whose fields were parsed out of the annotations. The
agent's config is built as data and serialized with json.dumps, so no
annotation text is ever spliced into YAML or JSON.

The config is a bootstrap: who the agent is, where its CA and its control
plane are, its admin and status addresses, with capture on its capture ports
and the app's original probes, and in a pod that asks for it the socket of
the SPIFFE Workload API (core/workload.py). Listeners, upstreams and policy
come from the control plane, which the agent asks as the pod ($POD_NAME, from
the downward API).

With capture on, the `outrider-capture` init container (the agent's image,
`outrider capture apply`) writes the pod's nftables rules before the agent
starts. It needs NET_ADMIN and NET_RAW, and root for them to be effective
(a non-root user's capabilities are dropped at exec without ambient ones),
and nothing else: the agent's hardening otherwise, and it exits once the
rules are in. Istio's istio-init makes the same trade; a CNI plugin that
writes the same rules from the node (identity/capture.py `ruleset`) is the
way to drop it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from identity import SpiffeId
from identity.capture import to_flags
from identity.injected import (
    AGENT_CONTAINER,
    CAPTURE_CONTAINER,
    WORKLOAD_API_DIR,
    WORKLOAD_API_SOCKET,
    WORKLOAD_API_VOLUME,
)
from injector.core.annotations import AgentOptions
from injector.core.settings import ADMIN_PORT, CONTROL_ACCOUNT, STATUS_PORT, Settings

AGENT = AGENT_CONTAINER
CAPTURE = CAPTURE_CONTAINER
CONFIG_ENV = "OUTRIDER_AGENT_CONFIG"
LOG_LEVEL_ENV = "OUTRIDER_LOG_LEVEL"
AUDIENCE = "outrider-ca"
STATUS_PORT_NAME = "outrider-status"  # at most 15 characters, as every port name
TOKEN_VOLUME, TOKEN_DIR = "outrider-token", "/var/run/secrets/outrider"
BUNDLE_VOLUME, BUNDLE_DIR = "outrider-bundle", "/etc/outrider/bundle"
#: Ours in every pod, whether it has them or not: a pod of its own with one is not injected.
VOLUMES = (TOKEN_VOLUME, BUNDLE_VOLUME, WORKLOAD_API_VOLUME)
#: Linux's bound on one environment string, "NAME=value" and its NUL (MAX_ARG_STRLEN):
#: past it the container runtime cannot exec the agent, and the pod never starts.
MAX_ENV_BYTES = 128 * 1024


def agent_config(
    spiffe_id: SpiffeId,
    settings: Settings,
    probes: Mapping[str, dict[str, Any]] | None = None,
    *,
    workload_api: bool = False,
    observe: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The agent's bootstrap (the keys agent/config.py documents) as plain data; `probes`
    are the app's original probes by the path the kubelet now asks (core/probes.py);
    `workload_api`: the agent serves the Workload API in the pod's shared volume;
    `observe`: its access_log and tracing sections (annotations.AgentOptions.observe)."""
    control_id = SpiffeId.for_workload(
        settings.trust_domain, settings.system_namespace, CONTROL_ACCOUNT
    )
    config: dict[str, Any] = {
        "identity": {"spiffe_id": str(spiffe_id), "token_file": f"{TOKEN_DIR}/token"},
        "ca": {"address": settings.ca.address, "bundle_file": f"{BUNDLE_DIR}/bundle.pem"},
        # The one identity the agent takes config from; the pod's name is $POD_NAME.
        "control": {"address": settings.control.address, "spiffe_id": str(control_id)},
        # /config_dump and /certs show the mesh's topology and who may call this pod:
        # loopback only (kubectl port-forward reaches it). The kubelet's probes and
        # Prometheus reach the pod IP, where the status listener serves only them.
        "admin": f"127.0.0.1:{ADMIN_PORT}",
        "status": f"0.0.0.0:{STATUS_PORT}",
    }
    capture = settings.capture
    if capture.enabled:
        config["capture"] = {
            "inbound_port": capture.inbound_port,
            "outbound_port": capture.outbound_port,
        }
    if workload_api:
        config["workload_api"] = {"socket": WORKLOAD_API_SOCKET}
    config.update(observe or {})
    if probes:
        config["probes"] = dict(probes)
    return config


def encode(value: object) -> str:
    """The agent's config as its environment variable holds it (ASCII: one byte a char)."""
    return json.dumps(value, separators=(",", ":"))


def probes_budget(
    spiffe_id: SpiffeId,
    settings: Settings,
    *,
    workload_api: bool = False,
    observe: Mapping[str, Any] | None = None,
) -> int:
    """The bytes left in the agent's config variable for the entries of `probes:`, each
    `"<path>":<probe>` and a comma (core/probes.py spends them)."""
    return budget_left(
        agent_config(spiffe_id, settings, workload_api=workload_api, observe=observe)
    )


def budget_left(config: Mapping[str, Any]) -> int:
    """The bytes left in the agent's config variable, holding `config`, for more entries
    of its `probes:`."""
    with_one = encode({**config, "probes": {**(config.get("probes") or {}), "": {}}})
    return MAX_ENV_BYTES - len(f"{CONFIG_ENV}=\0") - len(with_one) + len('"":{},')


def container(
    options: AgentOptions,
    spiffe_id: SpiffeId,
    settings: Settings,
    probes: Mapping[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    config = encode(
        agent_config(
            spiffe_id, settings, probes, workload_api=options.workload_api, observe=options.observe
        )
    )
    probe = {"httpGet": {"path": "/ready", "port": STATUS_PORT}}
    agent: dict[str, Any] = {
        "name": AGENT,
        "image": settings.agent.image,
        "args": ["agent", "run", "--config-env", CONFIG_ENV],
        "env": [
            {"name": CONFIG_ENV, "value": config},
            {"name": LOG_LEVEL_ENV, "value": options.log_level},
            *(_field_env(name, path) for name, path in _POD_FIELDS),
        ],
        "resources": {
            "requests": options.resources.requests.as_dict(),
            "limits": options.resources.limits.as_dict(),
        },
        # Named, so a PodMonitor or a scrape config can select the agent's metrics.
        "ports": [{"name": STATUS_PORT_NAME, "containerPort": STATUS_PORT, "protocol": "TCP"}],
        "securityContext": security_context(settings.agent.uid),
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": BUNDLE_VOLUME, "mountPath": BUNDLE_DIR, "readOnly": True},
            # Writable: the agent makes its socket there (the app containers' are read-only).
            *(
                [{"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR}]
                if options.workload_api
                else []
            ),
        ],
        # The app starts once the agent holds an SVID (native sidecars only).
        "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 120},
        "readinessProbe": {**probe, "periodSeconds": 5},
    }
    if settings.native_sidecar:
        agent["restartPolicy"] = "Always"
    return agent


_POD_FIELDS = (
    ("POD_NAME", "metadata.name"),
    ("POD_NAMESPACE", "metadata.namespace"),
    ("POD_UID", "metadata.uid"),
)


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def security_context(uid: int) -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def capture_container(settings: Settings) -> dict[str, Any]:
    """`outrider capture apply` with the settings' rules: the pod's nftables rules."""
    args = ["capture", "apply", *to_flags(settings.capture_rules())]
    hardening = security_context(settings.agent.uid)
    return {
        "name": CAPTURE,
        "image": settings.agent.image,
        "args": args,
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"cpu": "500m", "memory": "128Mi"},  # a Python start; it exits at once
        },
        "securityContext": {
            **hardening,
            # Capabilities of a non-root user are not effective without ambient ones.
            "runAsNonRoot": False,
            "runAsUser": 0,
            "runAsGroup": 0,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def volumes(settings: Settings, *, workload_api: bool = False) -> list[dict[str, Any]]:
    """The token (for the agent alone), the trust bundle and, with `workload_api`, the
    directory of the Workload API socket.

    That one is an emptyDir: the kubelet makes one per pod, so the socket reaches the
    pod's containers and nothing else (no hostPath, no node-wide socket as SPIRE's),
    and it goes with the pod. In memory, and small: it holds one socket, never a file."""
    token = {
        "audience": AUDIENCE,
        "expirationSeconds": settings.agent.token_expiration_seconds,
        "path": "token",
    }
    result: list[dict[str, Any]] = [
        {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}},
        {"name": BUNDLE_VOLUME, "configMap": {"name": settings.ca.bundle_configmap}},
    ]
    if workload_api:
        result.append(
            {"name": WORKLOAD_API_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}
        )
    return result
