"""`outrider check`: can this cluster run Outrider, and does the installed one work?

Like `linkerd check`: each finding is one line, ✓ (fine), ‼ (worth a look, not a
failure) or ✗ (broken), and every ‼ and ✗ says what to do. The decisions are
plain functions over what the API server and the control plane said
(`Observed`, the API's own JSON); `observe` is the thin shell that asks them,
through the user's kubeconfig as kubectl would. The CA and the injector are
reached through the API server's service proxy (`kubectl get --raw
/api/v1/namespaces/.../services/...:PORT/proxy/healthz`), so the check works
from a workstation without port-forwards; the control plane's debug API stays
on loopback in its pod, so agents come from `--control` as for `proxy-status`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from control.core.routes import CONTROLLER, service_parent
from control.informers import RESOURCES
from outrider import debugapi

Status = Literal["ok", "warn", "fail"]
SYMBOL: dict[Status, str] = {"ok": "✓", "warn": "‼", "fail": "✗"}

SYSTEM_NAMESPACE = "outrider-system"
INJECT_LABEL = ("outrider.io/inject", "enabled")
BUNDLE_CONFIGMAP, BUNDLE_KEY = "outrider-trust-bundle", "bundle.pem"
WEBHOOK = "outrider-injector"
CA_SERVICE, CA_HTTP_PORT = "outrider-ca", "http"
CONTROL = "outrider-control"  # its Deployment
#: Native sidecars (init containers with restartPolicy: Always) are on by default from here.
NATIVE_SIDECARS = (1, 29)
OUTRIDER_CRDS = (
    "authorizationpolicies.security.outrider.io",
    "peerauthentications.security.outrider.io",
    "trafficpolicies.networking.outrider.io",
)
#: The kinds the control plane writes a verdict on (status conditions), routes last.
JUDGED = ("AuthorizationPolicy", "PeerAuthentication", "TrafficPolicy", "HTTPRoute", "GRPCRoute")
ROUTES = frozenset(JUDGED[3:])
GATEWAY_CRDS = ("httproutes.gateway.networking.k8s.io", "grpcroutes.gateway.networking.k8s.io")
#: CNIs whose pods a kube-system listing shows, and whether they enforce NetworkPolicy.
CNIS = {
    "calico": True,
    "cilium": True,
    "antrea": True,
    "weave-net": True,
    "kube-router": True,
    "canal": True,
    "flannel": False,
    "kindnet": False,
}
APPLY = "kubectl apply -k deploy/overlays/local (or your overlay)"


@dataclass(frozen=True)
class Check:
    """One finding: what was checked, how it went, what was seen, and what to do."""

    phase: Literal["pre-install", "post-install"]
    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "fail"


@dataclass(frozen=True)
class Probe:
    """An HTTP answer through the API server: its status (None: no answer) and body."""

    status: int | None
    body: str


@dataclass(frozen=True)
class Observed:
    """What the cluster said. Objects are the API's JSON; None where there was none."""

    version: Mapping[str, Any]
    crds: frozenset[str]
    kube_system_pods: tuple[str, ...] = ()
    namespaces: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    bundles: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    webhook: Mapping[str, Any] | None = None
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ca_health: Probe | None = None
    ca_bundle: Probe | None = None
    webhook_health: Probe | None = None
    agents: Sequence[Mapping[str, Any]] | None = None
    agents_error: str = ""
    #: How many control-plane replicas answered for their agents (each lists only the
    #: agents connected to it), why the addresses that did not answer did not, and how
    #: many the Deployment runs (None: unknown; `replicas_error` says why, if it is).
    replicas_asked: int = 1
    replicas: int | None = None
    unreachable: tuple[str, ...] = ()
    replicas_error: str = ""
    #: The objects the control plane judges, by kind, as the API lists them; and the
    #: kinds that could not be listed, with why.
    judged: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    judged_errors: Mapping[str, str] = field(default_factory=dict)


# --- pre-install ------------------------------------------------------------------------


def kubernetes_version(version: Mapping[str, Any]) -> Check:
    found = partial(Check, "pre-install", "Kubernetes runs native sidecars")
    major = int(re.sub(r"\D", "", str(version.get("major", ""))) or 0)
    minor = int(re.sub(r"\D", "", str(version.get("minor", ""))) or 0)
    shown = version.get("gitVersion") or f"{major}.{minor}"
    if (major, minor) >= NATIVE_SIDECARS:
        return found("ok", f"Kubernetes {shown}")
    return found(
        "fail",
        f"Kubernetes {shown}: native sidecars need 1.29 or newer",
        "upgrade the cluster, or set native_sidecar: false in deploy/base/injector.yaml"
        " (the app may then start before its agent; docs/install.md, Prerequisites)",
    )


def gateway_crds(crds: frozenset[str]) -> Check:
    found = partial(Check, "pre-install", "Gateway API CRDs (routes)")
    missing = [crd for crd in GATEWAY_CRDS if crd not in crds]
    if not missing:
        return found("ok", "HTTPRoute and GRPCRoute are served")
    return found(
        "warn",
        f"not installed: {', '.join(missing)}; routes are not read",
        "kubectl apply -f https://github.com/kubernetes-sigs/gateway-api/releases/download/"
        "v1.3.0/standard-install.yaml",
    )


def network_policy(kube_system_pods: Sequence[str]) -> Check:
    """What a pod listing can tell: a known CNI's pods, and whether that CNI enforces."""
    found = partial(Check, "pre-install", "the CNI enforces NetworkPolicy")
    cnis = sorted({cni for cni in CNIS for pod in kube_system_pods if pod.startswith(cni)})
    enforcing = [cni for cni in cnis if CNIS[cni]]
    if enforcing:
        return found("ok", f"{', '.join(enforcing)} runs in kube-system")
    fix = "use a CNI that enforces NetworkPolicy (Calico, Cilium); deploy/'s policies need one"
    if cnis:
        return found("warn", f"{', '.join(cnis)} does not enforce it", fix)
    return found("warn", "cannot tell: no known CNI in kube-system", fix)


def pre_install(seen: Observed) -> list[Check]:
    return [
        kubernetes_version(seen.version),
        gateway_crds(seen.crds),
        network_policy(seen.kube_system_pods),
    ]


# --- post-install -----------------------------------------------------------------------


def outrider_crds(crds: frozenset[str]) -> Check:
    found = partial(Check, "post-install", "Outrider's CRDs")
    missing = [crd for crd in OUTRIDER_CRDS if crd not in crds]
    if not missing:
        return found("ok", f"{len(OUTRIDER_CRDS)} installed")
    return found(
        "fail", f"not installed: {', '.join(missing)}", f"{APPLY}; it installs deploy/base/crds"
    )


def ca_serving(health: Probe | None, bundle: Probe | None) -> Check:
    found = partial(Check, "post-install", "the CA is reachable and serving")
    fix = (
        f"kubectl -n {SYSTEM_NAMESPACE} get pods -l app.kubernetes.io/name=outrider-ca;"
        f" kubectl -n {SYSTEM_NAMESPACE} logs deploy/outrider-ca"
    )
    if health is None or health.status != 200:
        said = "no Service outrider-ca" if health is None else _said(health)
        return found("fail", f"/healthz: {said}", fix)
    roots = _certificates(bundle.body) if bundle is not None and bundle.status == 200 else []
    if not roots:
        said = "no answer" if bundle is None else _said(bundle)
        return found("fail", f"/bundle holds no certificate ({said})", fix)
    return found("ok", f"healthy, bundle of {_count(len(roots), 'root')}")


def bundle_configmaps(
    namespaces: Mapping[str, Mapping[str, str]],
    bundles: Mapping[str, Mapping[str, Any]],
    ca_bundle: Probe | None,
) -> list[Check]:
    """Every labelled namespace holds outrider-trust-bundle/bundle.pem, with the CA's roots."""
    labelled = sorted(n for n, labels in namespaces.items() if _labelled(labels))
    if not labelled:
        key, value = INJECT_LABEL
        return [
            Check(
                "post-install",
                "trust bundle in labelled namespaces",
                "warn",
                f"no namespace is labelled {key}={value}: nothing is injected",
                f"kubectl label namespace NAMESPACE {key}={value}",
            )
        ]
    served = (
        set(_certificates(ca_bundle.body))
        if ca_bundle is not None and ca_bundle.status == 200
        else set()
    )
    return [_bundle(namespace, bundles.get(namespace), served) for namespace in labelled]


def _bundle(namespace: str, configmap: Mapping[str, Any] | None, served: set[str]) -> Check:
    found = partial(Check, "post-install", f"trust bundle in namespace {namespace}")
    fix = (
        f"kubectl create configmap {BUNDLE_CONFIGMAP} -n {namespace}"
        f" --from-file={BUNDLE_KEY}=PEM, PEM the CA's roots (as in {SYSTEM_NAMESPACE}'s"
        f" {BUNDLE_CONFIGMAP}; docs/install.md, section 5, also for trust-manager)"
    )
    if configmap is None:
        detail = f"no ConfigMap {BUNDLE_CONFIGMAP}: injected pods stay in ContainerCreating"
        return found("fail", detail, fix)
    held = set(_certificates(str(_mapping(configmap.get("data")).get(BUNDLE_KEY, ""))))
    if not held:
        return found(
            "fail", f"ConfigMap {BUNDLE_CONFIGMAP} has no certificate under {BUNDLE_KEY}", fix
        )
    if served and not served <= held:
        detail = f"{BUNDLE_CONFIGMAP} lacks a root the CA serves: its agents refuse their peers"
        return found("fail", detail, f"copy the CA's bundle again: {fix}")
    return found("ok", f"{BUNDLE_CONFIGMAP} holds {_count(len(held), 'root')}")


def webhook(
    configuration: Mapping[str, Any] | None,
    services: Mapping[str, Mapping[str, Any]],
    health: Probe | None,
) -> list[Check]:
    """Configured (each webhook with a caBundle and a Service port that exists) and answering."""
    configured = partial(Check, "post-install", "the injector's webhook is configured")
    if configuration is None:
        detail = f"no MutatingWebhookConfiguration {WEBHOOK}: pods are not injected"
        return [configured("fail", detail, APPLY)]
    problems = []
    for hook in _hooks(configuration):
        problems += _webhook_problems(hook, services)
    if problems:
        fix = "docs/install.md, section 3: the webhook's certificate and caBundle"
        checks = [configured("fail", "; ".join(problems), fix)]
    else:
        checks = [configured("ok", f"{WEBHOOK}: every webhook has a caBundle")]
    answers = partial(Check, "post-install", "the injector's webhook answers")
    url = _webhook_url(configuration)
    if health is None and url:
        detail = f"it calls {url}, which is not probed from here"
        return [*checks, answers("warn", detail, "check it from the cluster")]
    if health is not None and health.status == 200:
        checks.append(answers("ok", "/healthz: 200"))
    else:
        said = "no Service to call" if health is None else _said(health)
        fix = (
            f"kubectl -n {SYSTEM_NAMESPACE} get pods,endpointslices -l"
            f" app.kubernetes.io/name=outrider-injector; kubectl -n {SYSTEM_NAMESPACE} logs"
            " deploy/outrider-injector"
        )
        checks.append(answers("fail", f"/healthz: {said}", fix))
    return checks


def _webhook_problems(
    hook: Mapping[str, Any], services: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    named = hook.get("name", "?")
    client = hook["clientConfig"]
    problems = [] if client.get("caBundle") else [f"{named}: no caBundle"]
    service = client.get("service")
    if service is None:
        return problems
    if not isinstance(service, Mapping):
        return [*problems, f"{named}: clientConfig.service is not an object"]
    found = services.get(service.get("name", ""))
    if found is None or service.get("namespace") != SYSTEM_NAMESPACE:
        problems.append(f"{named}: no Service {service.get('namespace')}/{service.get('name')}")
        return problems
    port = service.get("port", 443)
    if not isinstance(port, int):
        problems.append(f"{named}: Service port {port!r} is not a number")
    elif port not in [
        p.get("port")
        for p in _listed(_mapping(found.get("spec")).get("ports"))
        if isinstance(p, Mapping)
    ]:
        problems.append(f"{named}: Service {service['name']} has no port {port}")
    return problems


def _webhook_url(configuration: Mapping[str, Any]) -> str:
    """The URL a webhook calls instead of a Service (`clientConfig.url`), if any."""
    for hook in _hooks(configuration):
        url = hook["clientConfig"].get("url")
        if url:
            return str(url)
    return ""


def webhook_target(
    configuration: Mapping[str, Any] | None,
) -> tuple[str, str, int] | None:
    """(namespace, Service, port) the first webhook calls, or None: what to probe."""
    for hook in _hooks(configuration):
        service = hook["clientConfig"].get("service")
        if isinstance(service, Mapping):
            namespace, name, port = (service.get(k) for k in ("namespace", "name", "port"))
            if isinstance(namespace, str) and isinstance(name, str):
                return namespace, name, port if isinstance(port, int) else 443
    return None


def _replicas(deployment: Mapping[str, Any]) -> int | None:
    """How many replicas a Deployment runs: as its status says, or as its spec asks."""
    status, spec = deployment.get("status") or {}, deployment.get("spec") or {}
    for count in (status.get("replicas"), spec.get("replicas", 1)):
        if isinstance(count, int) and not isinstance(count, bool):
            return count
    return None


def agents_in_sync(
    agents: Sequence[Mapping[str, Any]] | None,
    error: str,
    asked: int = 1,
    replicas: int | None = None,
    unreachable: Sequence[str] = (),
    replicas_error: str = "",
) -> list[Check]:
    found = partial(Check, "post-install", "agents connected and in sync")
    if agents is None:
        return [found("fail", error, debugapi.PORT_FORWARD)]
    # Each replica lists only its own agents: one not heard hides its agents.
    unseen = [found("fail", why, debugapi.EACH_REPLICA) for why in unreachable]
    if replicas is not None and replicas > asked:
        detail = (
            f"the control plane runs {replicas} replicas and {asked} answered: the agents"
            " connected to the others are not shown, in sync or not"
        )
        unseen.append(found("warn", detail, debugapi.EACH_REPLICA))
    elif replicas is None and replicas_error and asked < 2:
        detail = (
            f"cannot tell how many control-plane replicas run ({replicas_error}): each"
            " lists only the agents connected to it"
        )
        unseen.append(found("warn", detail, debugapi.EACH_REPLICA))
    if unseen and not agents:
        return unseen
    if not agents:
        detail = "no agent is connected to the control plane"
        fix = "inject a workload (kubectl label namespace NAMESPACE outrider.io/inject=enabled)"
        return [found("warn", detail, fix)]
    rows = debugapi.agent_rows(agents)
    lagging = [row for row in rows if row["state"] != "SYNCED"]
    checks = [
        Check(
            "post-install",
            f"agent {row['pod']} in sync",
            "fail",
            f"{row['state']} at version {row['version']}",
            f"kubectl logs -n {row['pod'].partition('/')[0]} {row['pod'].partition('/')[2]}"
            " -c outrider-agent; `outrider proxy-status` shows every agent"
            + (
                "; STALE for more than a few seconds means it is not answering"
                if row["state"] == "STALE"
                else ""
            ),
        )
        for row in lagging
    ]
    if not lagging and not unseen:
        checks.append(found("ok", f"{_count(len(rows), 'agent')}, all SYNCED"))
    return [*unseen, *checks]


#: How many refused objects get a line of their own; the rest are counted on one.
REFUSED_SHOWN = 20


def objects_accepted(
    judged: Mapping[str, Sequence[Mapping[str, Any]]], errors: Mapping[str, str]
) -> list[Check]:
    """A ✗ for each object the control plane refused as it is now (its status says why,
    and which version, if any, stays in force); one ‼ for those whose latest edit it
    has not judged yet, and one for routes whose Service parent names no Service; one ✓
    when every object is accepted as it is now."""
    found = partial(Check, "post-install")
    checks = [
        found(
            f"{kind} objects readable",
            "warn",
            f"cannot list them: {error}",
            f"let your kubeconfig's user list {kind} in every namespace",
        )
        for kind, error in errors.items()
    ]
    refused: list[Check] = []
    fitted: list[Check] = []
    behind: list[str] = []
    misparented: list[str] = []
    accepted = 0
    for kind, objects in judged.items():
        for obj in objects:
            named = f"{kind} {_meta(obj, 'namespace')}/{_meta(obj, 'name')}"
            conditions = _verdicts(kind, obj)
            if conditions is None:
                if kind in ROUTES and _misparented(obj):
                    misparented.append(named)
                continue  # a route of other controllers' alone
            if not conditions or any(_older(c, obj) for c in conditions):
                behind.append(named)
            elif any(c.get("status") == "False" for c in conditions):
                refused.append(_refused(kind, obj, conditions))
            elif any(c.get("reason") in _FITTED for c in conditions):
                fitted.append(_fitted(kind, obj, conditions))
            elif all(c.get("status") == "True" for c in conditions):
                accepted += 1
            else:  # "Unknown", or no status: no verdict
                behind.append(named)
    checks += refused[:REFUSED_SHOWN]
    if len(refused) > REFUSED_SHOWN:
        more = len(refused) - REFUSED_SHOWN
        detail = f"{_count(more, 'more object')} the control plane refused"
        checks.append(found("and more not accepted", "fail", detail, _SEE_STATUSES))
    checks += fitted[:REFUSED_SHOWN]
    if len(fitted) > REFUSED_SHOWN:
        more = len(fitted) - REFUSED_SHOWN
        detail = f"{_count(more, 'more policy')} fitted to TCP ports"
        checks.append(found("and more fitted to TCP ports", "warn", detail, _SEE_STATUSES))
    if behind:
        checks.append(
            found(
                "policies and routes judged",
                "warn",
                f"the control plane has not judged the latest edit of {_some(behind)}",
                "it writes each status within seconds of a change; if this stays, kubectl -n"
                f" {SYSTEM_NAMESPACE} logs deployment/{CONTROL}",
            )
        )
    if misparented:
        checks.append(
            found(
                "routes attached to Services",
                "warn",
                f'{_some(misparented)} names kind Service without group "": Gateway API'
                " reads it as its own group's, so no controller serves that parent",
                'add group: "" to the parentRef',
            )
        )
    if not checks:
        detail = f"{_count(accepted, 'object')}, all accepted" if accepted else "none applied"
        checks.append(found("policies and routes accepted", "ok", detail))
    return checks


_SEE_STATUSES = "kubectl get authorizationpolicies,peerauthentications,trafficpolicies -A"


def _refused(kind: str, obj: Mapping[str, Any], conditions: Sequence[Mapping[str, Any]]) -> Check:
    namespace, name = _meta(obj, "namespace"), _meta(obj, "name")
    said = "; ".join(
        ": ".join(_printable(c.get(key)) for key in ("reason", "message") if c.get(key))
        for c in conditions
        if c.get("status") == "False"
    )
    reasons = {c.get("reason") for c in conditions if c.get("status") == "False"}
    (only,) = reasons if len(reasons) == 1 else (None,)
    fix = _FIXES.get(str(only), "fix it as its status says")
    return Check(
        "post-install",
        f"{kind} {namespace}/{name}",
        "fail",
        f"not accepted: {said}{_kept(kind, obj, reasons)}",
        f"{fix} (kubectl -n {namespace} get {kind.lower()} {name} -o yaml shows its status)",
    )


#: Accepted, but not as written: a rule's HTTP fields met a TCP port (control/core/
#: policies.py), so a DENY there denies every connection its `from` matches.
_FITTED = {"HTTPRulesOnTCPPorts"}


def _fitted(kind: str, obj: Mapping[str, Any], conditions: Sequence[Mapping[str, Any]]) -> Check:
    namespace, name = _meta(obj, "namespace"), _meta(obj, "name")
    said = "; ".join(_printable(c.get("message")) for c in conditions if c.get("reason") in _FITTED)
    return Check(
        "post-install",
        f"{kind} {namespace}/{name}",
        "warn",
        f"accepted, not as written: {said}",
        f"kubectl -n {namespace} get {kind.lower()} {name} -o yaml shows its status",
    )


_FIXES = {
    "Invalid": "fix it and apply it again",
    "Conflicted": "an older object applies to the same target: merge the two, or delete one",
    "TargetNotFound": "create what it targets, or fix its targetRefs",
    "NoMatchingParent": "create the Service and port it is attached to, or fix its parentRefs",
    "UnsupportedProtocol": "its settings do not apply to its Service ports' protocols:"
    " change them, or the ports' appProtocol",
}


def _printable(value: object) -> str:
    """A status text on one line: a message's own newlines could forge lines of the check."""
    return "".join(c if c.isprintable() else " " for c in str(value))


def _some(names: Sequence[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _verdicts(kind: str, obj: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The conditions this control plane wrote on `obj`. On a route, those of its entries
    for Service parents (other controllers write the rest): None for a route with no
    Service parent, which is not this control plane's to judge."""
    status = _mapping(obj.get("status"))
    if kind not in ROUTES:
        return [c for c in _listed(status.get("conditions")) if isinstance(c, Mapping)]
    refs = _listed(_mapping(obj.get("spec")).get("parentRefs"))
    if not any(service_parent(ref) for ref in refs):
        return None
    return [
        c
        for parent in _listed(status.get("parents"))
        if isinstance(parent, Mapping) and parent.get("controllerName") == CONTROLLER
        for c in _listed(parent.get("conditions"))
        if isinstance(c, Mapping)
    ]


def _misparented(route: Mapping[str, Any]) -> bool:
    """A parentRef of kind Service in no group or another: meant for a Service, surely."""
    refs = _listed(_mapping(route.get("spec")).get("parentRefs"))
    return any(isinstance(ref, Mapping) and ref.get("kind") == "Service" for ref in refs)


def _older(condition: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    """Whether `condition` judged an earlier edit of `obj` than its current one (its own
    observedGeneration, or else its status')."""
    seen = condition.get("observedGeneration")
    if not isinstance(seen, int):
        seen = _mapping(obj.get("status")).get("observedGeneration")
    now = obj["metadata"].get("generation")
    return isinstance(seen, int) and isinstance(now, int) and seen < now


def _kept(kind: str, obj: Mapping[str, Any], reasons: set[Any]) -> str:
    """What an invalid policy leaves in force (control/core/inforce.py): the version its
    status records, if older than this one. Routes keep none; a valid policy that
    applies nowhere (Conflicted, TargetNotFound) keeps nothing but itself."""
    if kind in ROUTES or reasons != {"Invalid"}:
        return ""
    record = _mapping(_mapping(obj.get("status")).get("inForce"))
    generation, now = record.get("generation"), obj["metadata"].get("generation")
    if not isinstance(generation, int):
        return "; no version of it is in force"
    if isinstance(now, int) and generation < now:
        return f"; its generation {generation} stays in force"
    return ""


def post_install(seen: Observed) -> list[Check]:
    return [
        outrider_crds(seen.crds),
        ca_serving(seen.ca_health, seen.ca_bundle),
        *bundle_configmaps(seen.namespaces, seen.bundles, seen.ca_bundle),
        *webhook(seen.webhook, seen.services, seen.webhook_health),
        *agents_in_sync(
            seen.agents,
            seen.agents_error,
            seen.replicas_asked,
            seen.replicas,
            seen.unreachable,
            seen.replicas_error,
        ),
        *objects_accepted(seen.judged, seen.judged_errors),
    ]


def evaluate(seen: Observed, *, pre: bool = False) -> list[Check]:
    """Every check; with `pre`, those that matter before installing only."""
    return pre_install(seen) if pre else [*pre_install(seen), *post_install(seen)]


# --- rendering --------------------------------------------------------------------------


def result(checks: Sequence[Check]) -> dict[str, Any]:
    """What `-o json|yaml` prints: the checks, and whether any failed."""
    return {"ok": not any(c.failed for c in checks), "checks": [asdict(c) for c in checks]}


def text(shown: Mapping[str, Any]) -> str:
    lines: list[str] = []
    phase = None
    for check in shown["checks"]:
        if check["phase"] != phase:
            phase = check["phase"]
            lines.append(f"{'' if not lines else chr(10)}{phase}")
        lines.append(f"{SYMBOL[check['status']]} {check['name']}: {check['detail']}")
        if check["fix"] and check["status"] != "ok":
            lines.append(f"    fix: {check['fix']}")
    failed = sum(1 for c in shown["checks"] if c["status"] == "fail")
    lines.append("")
    plural = "check failed" if failed == 1 else "checks failed"
    lines.append(f"{failed} {plural}" if failed else "all checks passed")
    return "\n".join(lines) + "\n"


# --- the shell --------------------------------------------------------------------------


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _labelled(labels: Mapping[str, str]) -> bool:
    key, value = INJECT_LABEL
    return labels.get(key) == value


def _said(probe: Probe) -> str:
    if probe.status is None:
        return probe.body
    body = probe.body.strip()
    with contextlib.suppress(ValueError, AttributeError):  # a Status: its message
        body = json.loads(body).get("message", body)
    return f"{probe.status} {body[:200]}".strip()


_PEM = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")


def _certificates(pem: str) -> list[str]:
    """The certificates of a PEM bundle, whitespace-normalized, for comparing sets."""
    return ["".join(block.split()) for block in _PEM.findall(pem)]


class ApiUnreachable(Exception):
    """The API server did not answer; the message says what to do."""


class Cluster:
    """The API server, through a kubeconfig (or the pod's in-cluster config) as kubectl
    reaches it. Every read is raw JSON, as the core takes it."""

    def __init__(self, kubeconfig: Path | None, context: str | None, timeout: float = 10) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        in_cluster = kubeconfig is None and context is None and _in_cluster()
        try:
            if in_cluster:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            else:
                config.load_kube_config(  # type: ignore[no-untyped-call]
                    config_file=None if kubeconfig is None else str(kubeconfig),
                    context=context,
                    client_configuration=configuration,
                )
        except (config.ConfigException, OSError) as exc:
            if in_cluster:
                raise ApiUnreachable(f"cannot load the in-cluster config: {exc}") from None
            raise ApiUnreachable(_unusable_kubeconfig(kubeconfig, exc)) from None
        # One try per read, as kubectl: urllib3 would try three times, a timeout taking
        # three timeouts and each retry a warning among the check's lines.
        configuration.retries = 0
        api = client.ApiClient(configuration)
        self.core: Any = client.CoreV1Api(api)
        self.version_api: Any = client.VersionApi(api)
        self.extensions: Any = client.ApiextensionsV1Api(api)
        self.admission: Any = client.AdmissionregistrationV1Api(api)
        self.apps: Any = client.AppsV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        self._error: type[Exception] = client.ApiException
        self.timeout = timeout
        self.server = configuration.host

    def read(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The JSON `call` answers; None for 404; ApiUnreachable when there is no answer."""
        import urllib3

        try:
            response = call(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs)
        except self._error as exc:
            if getattr(exc, "status", None) == 404:
                return None
            said = _said(Probe(getattr(exc, "status", None), str(getattr(exc, "body", "") or "")))
            raise ApiUnreachable(
                f"the API server at {self.server} refused {getattr(call, '__name__', 'a read')}:"
                f" {said} (403: your kubeconfig's user may not read it; docs/cli.md lists what"
                " `outrider check` reads)"
            ) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiUnreachable(
                f"cannot reach the API server at {self.server}: {exc} (does `kubectl version`"
                " work with this kubeconfig and context?)"
            ) from None
        return json.loads(response.data)

    def proxy(self, namespace: str, service: str, path: str) -> Probe:
        """GET `path` of a Service through the API server's service proxy."""
        import urllib3

        try:
            response = self.core.connect_get_namespaced_service_proxy_with_path(
                service, namespace, path, _preload_content=False, _request_timeout=self.timeout
            )
        except self._error as exc:
            return Probe(getattr(exc, "status", None), str(getattr(exc, "body", "") or exc))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Probe(None, f"no answer: {exc}")
        return Probe(response.status, response.data.decode(errors="replace"))


def _unusable_kubeconfig(kubeconfig: Path | None, error: Exception) -> str:
    """Which file(s) were tried, as kubectl picks them (the flag, else $KUBECONFIG's list,
    else ~/.kube/config), why they did not do, and how to give one."""
    import os

    if kubeconfig is not None:
        files = [kubeconfig]
    elif os.environ.get("KUBECONFIG"):
        files = [Path(f) for f in os.environ["KUBECONFIG"].split(os.pathsep) if f]
    else:
        files = [Path("~/.kube/config").expanduser()]
    why = str(error) if any(f.exists() for f in files) else "no such file"
    return (
        f"cannot load the kubeconfig {os.pathsep.join(map(str, files))}: {why}"
        " (give the cluster's with --kubeconfig FILE or $KUBECONFIG, as for kubectl;"
        " `kubectl config view` shows the one kubectl uses)"
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _items(listing: Any) -> list[Mapping[str, Any]]:
    """A list's items that are API objects (a mapping with metadata); what else an odd
    answer holds is no object the cluster serves, and is left out."""
    return [
        item
        for item in _listed(_mapping(listing).get("items"))
        if isinstance(item, Mapping) and isinstance(item.get("metadata"), Mapping)
    ]


def _meta(item: Mapping[str, Any], key: str) -> str:
    value = item["metadata"].get(key)
    return value if isinstance(value, str) else ""


def _hooks(configuration: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    """The webhooks of a configuration, each with a `clientConfig` mapping (maybe empty)."""
    return [
        {**hook, "clientConfig": _mapping(hook.get("clientConfig"))}
        for hook in _listed(_mapping(configuration).get("webhooks"))
        if isinstance(hook, Mapping)
    ]


def _in_cluster() -> bool:
    import os

    return "KUBERNETES_SERVICE_HOST" in os.environ


def observe(cluster: Cluster, controls: Sequence[str], *, pre: bool = False) -> Observed:
    """Ask the API server (and, after install, the control plane) what the checks need."""
    version = _mapping(cluster.read(cluster.version_api.get_code))
    crds = frozenset(
        _meta(item, "name")
        for item in _items(cluster.read(cluster.extensions.list_custom_resource_definition))
    )
    pods = _items(cluster.read(cluster.core.list_namespaced_pod, "kube-system"))
    kube_system = tuple(_meta(item, "name") for item in pods)
    if pre:
        return Observed(version, crds, kube_system)
    namespaces = {
        _meta(item, "name"): _mapping(item["metadata"].get("labels"))
        for item in _items(cluster.read(cluster.core.list_namespace))
    }
    listed = cluster.read(
        cluster.core.list_config_map_for_all_namespaces,
        field_selector=f"metadata.name={BUNDLE_CONFIGMAP}",
    )
    bundles = {_meta(item, "namespace"): item for item in _items(listed)}
    configuration = cluster.read(cluster.admission.read_mutating_webhook_configuration, WEBHOOK)
    configuration = configuration if isinstance(configuration, Mapping) else None
    services = {
        _meta(item, "name"): item
        for item in _items(cluster.read(cluster.core.list_namespaced_service, SYSTEM_NAMESPACE))
    }
    ca_health = ca_bundle = webhook_health = None
    if CA_SERVICE in services:
        ca_health = cluster.proxy(SYSTEM_NAMESPACE, f"{CA_SERVICE}:{CA_HTTP_PORT}", "healthz")
        ca_bundle = cluster.proxy(SYSTEM_NAMESPACE, f"{CA_SERVICE}:{CA_HTTP_PORT}", "bundle")
    target = webhook_target(configuration)
    if target is not None and target[1] in services:
        namespace, name, port = target
        webhook_health = cluster.proxy(namespace, f"https:{name}:{port}", "healthz")
    heard = debugapi.agents_of(controls)
    agents = heard.agents if heard.answered else None
    replicas, replicas_error = None, ""
    try:  # a user whose RBAC cannot read it loses this one finding, not the check
        control = cluster.read(cluster.apps.read_namespaced_deployment, CONTROL, SYSTEM_NAMESPACE)
        replicas = _replicas(control) if isinstance(control, Mapping) else None
    except ApiUnreachable as exc:
        replicas_error = str(exc)
    judged: dict[str, list[Mapping[str, Any]]] = {}
    judged_errors: dict[str, str] = {}
    for kind in JUDGED:
        where = RESOURCES[kind]
        try:  # a kind not served (404: no CRD) has nothing to judge
            listed = cluster.read(
                cluster.custom.list_cluster_custom_object, where.group, where.version, where.plural
            )
        except ApiUnreachable as exc:
            judged_errors[kind] = str(exc)
            continue
        judged[kind] = _items(listed)
    return Observed(
        version,
        crds,
        kube_system,
        namespaces,
        bundles,
        configuration,
        services,
        ca_health,
        ca_bundle,
        webhook_health,
        agents,
        "; ".join(heard.unreachable),
        heard.answered,
        replicas,
        tuple(heard.unreachable) if heard.answered else (),
        replicas_error,
        judged,
        judged_errors,
    )
