"""A pod in, a JSON patch out (RFC 6902), or the reason the pod is left alone.

The same function serves the webhook (an AdmissionReview's pod) and
`outrider inject` (the pod template of a Deployment, a Job, ...). It never
changes its input. The patch only adds: the agent container, with capture on
the `outrider-capture` init container before it and the app's probes sent
through the agent (core/probes.py: `add` replaces each), its volumes, the
Workload API socket in the app containers when the pod asks (core/workload.py),
and the `outrider.io/status: injected` annotation that marks the pod as done, so
running it again on its own output changes nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from identity import SpiffeId
from injector.core import probes, sidecar, workload
from injector.core.annotations import INJECT, STATUS, read_options
from injector.core.settings import Settings, described

__all__ = ["INJECTED", "SKIPS", "Mutation", "apply_patch", "mutate", "pointer"]

INJECTED = "injected"
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"

#: Why a pod is left alone, and the warning its creator sees (None: no warning).
SKIPS: dict[str, str | None] = {
    "already_injected": None,  # webhook reinvocation; not news to anyone
    "namespace_excluded": "kube-system and Outrider's own namespace are never injected",
    "opted_out": 'the pod has outrider.io/inject: "false" (a label or an annotation)',
    "host_network": "hostNetwork pods share the node's network, where the agent cannot listen",
    "name_conflict": (
        "the pod already has a container named outrider-capture or a volume named "
        "outrider-token, outrider-bundle or outrider-workload-api"
    ),
}


@dataclass(frozen=True)
class Mutation:
    """`reason` is INJECTED or a key of SKIPS; `warnings` are for the pod's creator."""

    reason: str
    patch: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()


def mutate(pod: Mapping[str, Any], namespace: str, settings: Settings) -> Mutation:
    """The patch that adds the agent to `pod` in `namespace`."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    reason = _skip(annotations, labels, spec, namespace, settings)
    if reason == "already_injected":
        return _again(spec, settings)
    if reason is not None:
        message = SKIPS[reason]
        return Mutation(reason, (), (f"outrider: not injected: {message}",) if message else ())
    options, warnings = read_options(annotations, settings)
    inject = annotations.get(INJECT)
    if inject is not None and inject not in ("true", "enabled"):
        warnings.insert(0, f'{INJECT}: expected "true" or "false"; injecting')
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spiffe_id = SpiffeId.for_workload(settings.trust_domain, namespace, account)
    # Probes and the Workload API first: their paths count the containers as they were.
    budget = sidecar.probes_budget(
        spiffe_id, settings, workload_api=options.workload_api, observe=options.observe
    )
    rewrite = (
        probes.rewrite(spec, settings.agent_ports, budget)
        if settings.capture.enabled
        else probes.Rewrite()
    )
    warnings += rewrite.warnings
    if settings.capture.enabled:
        warnings += _around_capture(spec, settings.agent.uid)
    served = workload.serve(spec) if options.workload_api else workload.Served()
    warnings += served.warnings
    patch = [*rewrite.patch, *served.patch]
    agent = sidecar.container(options, spiffe_id, settings, rewrite.originals)
    capture = [sidecar.capture_container(settings)] if settings.capture.enabled else []
    added = {STATUS: INJECTED}
    containers = spec.get("containers") or []
    if settings.native_sidecar:
        patch += _prepend(spec, "initContainers", [*capture, agent])
    else:
        patch += _insert(spec, "initContainers", _capture_index(spec), capture)
        patch += _prepend(spec, "containers", [agent])
        if containers and DEFAULT_CONTAINER not in annotations:
            added[DEFAULT_CONTAINER] = containers[0]["name"]  # or `kubectl logs` shows ours
    patch += _extend(spec, "volumes", sidecar.volumes(settings, workload_api=options.workload_api))
    patch += _annotate(pod, added)
    return Mutation(INJECTED, tuple(patch), tuple(f"outrider: {w}" for w in warnings))


def _skip(
    annotations: Mapping[str, Any],
    labels: Mapping[str, Any],
    spec: Mapping[str, Any],
    namespace: str,
    settings: Settings,
) -> str | None:
    if annotations.get(STATUS) == INJECTED or _has_agent(spec):
        return "already_injected"
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if namespace in ("kube-system", settings.system_namespace):
        return "namespace_excluded"
    # The label is what the webhook's objectSelector skips on (docs/install.md); read here
    # too, for `outrider inject` and a webhook configured without the selector.
    if annotations.get(INJECT) == "false" or labels.get(INJECT) == "false":
        return "opted_out"
    if spec.get("hostNetwork") is True:
        return "host_network"
    if any(v.get("name") in sidecar.VOLUMES for v in spec.get("volumes") or []) or any(
        c.get("name") == sidecar.CAPTURE for c in containers
    ):
        return "name_conflict"
    return None


def _again(spec: Mapping[str, Any], settings: Settings) -> Mutation:
    """An injected pod again (reinvocationPolicy: IfNeeded, after another webhook added a
    container, or `outrider inject` of its own output): what the first injection did for
    every container is done for the new ones. Quietly: what it leaves was warned of the
    first time, and reinvocation is routine, not news."""
    found = _agent_config(spec)
    if found is None:
        if not _has_agent(spec):  # the annotation alone: copied from a live pod, say
            return Mutation("already_injected", (), (f"outrider: not injected: {_COPIED}",))
        return Mutation("already_injected")
    patch: list[dict[str, Any]] = []
    if "workload_api" in found[1]:
        patch += workload.serve(spec).patch
    if settings.capture.enabled:
        patch += _late_probes(spec, settings, *found)
    return Mutation("already_injected", tuple(patch))


def _late_probes(
    spec: Mapping[str, Any], settings: Settings, where: str, config: dict[str, Any]
) -> list[dict[str, Any]]:
    """The probes not yet through the agent go through it, their originals added to the
    agent's config (at `where`). Those already rewritten are on the status port, which
    core/probes.py leaves alone, so once is enough."""
    init = spec.get("initContainers") or []
    if not any(isinstance(c, dict) and c.get("name") == sidecar.CAPTURE for c in init):
        return []
    rewrite = probes.rewrite(spec, settings.agent_ports, sidecar.budget_left(config))
    if not rewrite.originals:
        return []
    config = {**config, "probes": {**(config.get("probes") or {}), **rewrite.originals}}
    return [*rewrite.patch, _add(where, sidecar.encode(config))]


#: What a pod annotated injected without the agent is told (the annotation was copied
#: into a template from a live pod): it is what keeps the pod from being injected.
_COPIED = (
    f"{STATUS}: {INJECTED} is set but the pod has no {sidecar.AGENT} container; remove the"
    " annotation (copied from an injected pod?) to have the agent injected"
)


def _has_agent(spec: Mapping[str, Any]) -> bool:
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    return any(isinstance(c, dict) and c.get("name") == sidecar.AGENT for c in containers)


def _agent_config(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The pointer to the injected agent's config variable's value, and that config."""
    for key in ("initContainers", "containers"):
        containers = spec.get(key)
        for i, container in enumerate(containers if isinstance(containers, list) else []):
            if not isinstance(container, dict) or container.get("name") != sidecar.AGENT:
                continue
            env = container.get("env")
            for j, var in enumerate(env if isinstance(env, list) else []):
                if isinstance(var, dict) and var.get("name") == sidecar.CONFIG_ENV:
                    try:
                        config = json.loads(var.get("value") or "")
                    except ValueError:
                        return None
                    if isinstance(config, dict) and isinstance(config.get("probes", {}), dict):
                        return f"/spec/{key}/{i}/env/{j}/value", config
            return None
    return None


#: Capabilities that let a container rewrite the pod's nftables rules.
_NETWORK_CAPABILITIES = {"NET_ADMIN", "CAP_NET_ADMIN", "ALL"}


def _around_capture(spec: Mapping[str, Any], agent_uid: int) -> list[str]:
    """Warnings for the app's containers that capture cannot hold: those that run as the
    agent's UID (never captured, or the agent would capture itself), and those that may
    change the pod's network, rules included. Capture cannot stop them, as Istio's
    cannot; an admission policy can (docs/capture.md)."""
    pod_context = spec.get("securityContext")
    pod_uid = pod_context.get("runAsUser") if isinstance(pod_context, dict) else None
    warnings = []
    for key in ("initContainers", "containers"):
        containers = spec.get(key)
        for container in containers if isinstance(containers, list) else []:
            if not isinstance(container, dict):
                continue
            name = described(container)
            context = container.get("securityContext")
            context = context if isinstance(context, dict) else {}
            uid = context.get("runAsUser", pod_uid)
            if uid == agent_uid and not isinstance(uid, bool):
                warnings.append(
                    f"{name} runs as UID {agent_uid}, the agent's: its connections are not "
                    "captured (no mTLS, and registry-only does not hold for it)"
                )
            capabilities = context.get("capabilities")
            added = capabilities.get("add") if isinstance(capabilities, dict) else None
            if context.get("privileged") is True or (
                isinstance(added, list) and _NETWORK_CAPABILITIES & {str(a) for a in added}
            ):
                warnings.append(
                    f"{name} may change the pod's network (privileged, NET_ADMIN): it can "
                    "undo capture, strict mTLS included"
                )
            warnings += _hooks_over_the_network(name, container)
    return warnings


def _hooks_over_the_network(name: str, container: Mapping[str, Any]) -> list[str]:
    """Lifecycle hooks the kubelet sends over the pod network (httpGet, tcpSocket): plain
    from the node, captured like its probes, which the agent answers for; a hook has no
    such path, and strict mTLS refuses it: postStart failing kills the container, preStop
    failing skips the app's graceful shutdown."""
    lifecycle = container.get("lifecycle")
    found = []
    for hook in ("postStart", "preStop"):
        handler = lifecycle.get(hook) if isinstance(lifecycle, dict) else None
        for kind in ("httpGet", "tcpSocket"):
            action = handler.get(kind) if isinstance(handler, dict) else None
            if isinstance(action, dict) and not action.get("host"):
                found.append(
                    f"{name}: lifecycle.{hook}.{kind} reaches the app through capture, in plain"
                    " from the node: on a STRICT port the agent refuses it; use an exec hook"
                    " (for example a curl to localhost) instead"
                )
    return found


def _prepend(
    spec: Mapping[str, Any], key: str, items: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`items` ahead of the list's own, in their order."""
    return _insert(spec, key, 0, items)


def _capture_index(spec: Mapping[str, Any]) -> int:
    """Where the capture container goes when the agent is a regular container: after the
    app's init containers, which run before any agent could serve them (captured, their
    connections would all be refused, and the pod would never leave Init), but before
    the first of them that keeps running (restartPolicy: Always), so that all of its
    connections are captured."""
    init = spec.get("initContainers") or []
    return next(
        (
            i
            for i, c in enumerate(init)
            if isinstance(c, dict) and c.get("restartPolicy") == "Always"
        ),
        len(init),
    )


def _insert(
    spec: Mapping[str, Any], key: str, index: int, items: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`items` at `index` of the list, in their order."""
    if not items:
        return []
    if spec.get(key):
        return [_add(f"/spec/{key}/{index}", item) for item in reversed(items)]
    return [_add(f"/spec/{key}", list(items))]


def _extend(
    spec: Mapping[str, Any], key: str, items: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    if spec.get(key):
        return [_add(f"/spec/{key}/-", item) for item in items]
    return [_add(f"/spec/{key}", list(items))]


def _annotate(pod: Mapping[str, Any], added: dict[str, str]) -> list[dict[str, Any]]:
    metadata = pod.get("metadata")
    if metadata is None:
        return [_add("/metadata", {"annotations": added})]
    if not metadata.get("annotations"):
        return [_add("/metadata/annotations", added)]
    return [_add(f"/metadata/annotations/{pointer(key)}", value) for key, value in added.items()]


def _add(path: str, value: Any) -> dict[str, Any]:
    return {"op": "add", "path": path, "value": value}


def pointer(key: str) -> str:
    """One JSON Pointer reference token (RFC 6901): `~` and `/` escaped, in that order."""
    return key.replace("~", "~0").replace("/", "~1")


def apply_patch(document: Any, patch: Sequence[Mapping[str, Any]]) -> None:
    """Apply our own patches (only `add`) in place, for `outrider inject`."""
    for op in patch:
        if op["op"] != "add":
            raise ValueError(f"only add is supported, not {op['op']!r}")
        *parents, last = (
            token.replace("~1", "/").replace("~0", "~") for token in op["path"].split("/")[1:]
        )
        target = document
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        value = copy.deepcopy(op["value"])
        if not isinstance(target, list):
            target[last] = value
        elif last == "-":
            target.append(value)
        else:
            target.insert(int(last), value)
