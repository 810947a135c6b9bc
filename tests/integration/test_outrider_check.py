"""`outrider check` against an install as users write it, then with one thing broken.

The fake API server (HTTPS, kubeconfig) holds deploy/'s namespace, CA, injector and
webhook objects as `kubectl apply -k` leaves them (kinds the fake does not serve, such
as RBAC and NetworkPolicies, left out), a labelled namespace with its trust bundle,
and EndpointSlices that lead its service proxy to the real CA HTTP app and the real
injector webhook app on loopback; the real control plane runs beside it. Each test
breaks one thing (a CRD, a ConfigMap, the webhook's port, an agent's ACK), asserts
the ✗ line with its fix and exit 1, and puts it back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from ca.api.http import make_app as ca_http_app
from ca.metrics import CaMetrics
from identity import TrustBundle
from injector.config import InjectorConfig
from injector.webhook import InjectorMetrics
from injector.webhook import make_app as injector_app
from tests.apiserver import DEFAULT_CRDS, FakeApiServer, fake_api_server
from tests.control_process import (
    ControlProcess,
    Ran,
    control_plane,
    eventually,
    outrider,
    pod,
    ready,
    subscribed,
)
from tests.control_process import (
    TestCa as CaDirectory,
)
from tests.support import TRUST_DOMAIN, free_port, loopback_tls

pytestmark = pytest.mark.asyncio(loop_scope="module")

DEPLOY = Path(__file__).parents[2] / "deploy" / "base"
#: What the fake serves of deploy/base (no RBAC, PodDisruptionBudget, NetworkPolicy).
SERVED = {"Namespace", "ServiceAccount", "Service", "Deployment", "ConfigMap"}
TRAFFIC_POLICY_CRD = next(p for p in DEFAULT_CRDS if p.name == "trafficpolicies.yaml")


@dataclass
class Installed:
    api: FakeApiServer
    control: ControlProcess
    other: ControlProcess  # deploy/base runs two replicas; each lists its own agents
    kubeconfig: Path
    injector_port: int

    async def check(self, *extra: str) -> Ran:
        """`outrider check`, asking both replicas (unless `extra` names a --control)."""
        asked = [] if "--control" in extra else ["--control", self.control.debug_url]
        asked += [] if "--control" in extra else ["--control", self.other.debug_url]
        return await outrider("check", "--kubeconfig", str(self.kubeconfig), *asked, *extra)


def install(api: FakeApiServer, bundle_pem: str) -> None:
    """deploy/base as applied, the webhook's caBundle patched in (docs/install.md §4)."""
    for name in ("namespace.yaml", "ca.yaml", "injector.yaml", "control.yaml"):
        docs = yaml.safe_load_all((DEPLOY / name).read_text())
        api.apply(yaml.safe_dump_all([d for d in docs if d and d["kind"] in SERVED]))
    webhook = yaml.safe_load((DEPLOY / "webhook.yaml").read_text())
    for hook in webhook["webhooks"]:
        hook["clientConfig"]["caBundle"] = "LS0tLS1CRUdJTi4uLg=="
    api.apply(yaml.safe_dump(webhook))
    api.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: calico-node-x7k2p, namespace: kube-system}\n"
        "spec: {containers: [{name: calico-node, image: calico/node:v3.28}]}\n"
    )
    api.apply(namespace("shop") + bundle_configmap("shop", bundle_pem))
    api.apply(pod("shop", "web", "web"))


def namespace(name: str) -> str:
    return (
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"
        "  labels: {outrider.io/inject: enabled}\n---\n"
    )


def bundle_configmap(namespace: str, bundle_pem: str) -> str:
    """As `kubectl create configmap outrider-trust-bundle --from-file=bundle.pem=...`."""
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "outrider-trust-bundle", "namespace": namespace},
            "data": {"bundle.pem": bundle_pem},
        }
    )


def endpoints(service: str, ports: dict[str, int]) -> str:
    """The EndpointSlice the controller would make for a ready pod behind `service`."""
    return yaml.safe_dump(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service}-abcde",
                "namespace": "outrider-system",
                "labels": {"kubernetes.io/service-name": service},
            },
            "addressType": "IPv4",
            "ports": [
                {"name": name, "port": port, "protocol": "TCP"} for name, port in ports.items()
            ],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
        }
    )


@asynccontextmanager
async def serving(app: web.Application, tls: Any = None) -> AsyncIterator[int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def installed(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Installed]:
    root = tmp_path_factory.mktemp("check")
    ca = CaDirectory.create(root / "ca")
    bundle = TrustBundle.from_pem(TRUST_DOMAIN, ca.bundle_pem)
    (root / "injector").mkdir()
    tls = loopback_tls(root / "injector", "outrider-injector.outrider-system.svc")
    defaults = InjectorConfig()
    async with (
        fake_api_server(root / "api") as api,
        serving(ca_http_app(lambda: bundle, CaMetrics())) as ca_port,
        serving(
            injector_app(defaults.settings, defaults.limits, InjectorMetrics()), tls.server_context
        ) as injector_port,
    ):
        install(api, ca.bundle_pem.decode())
        api.apply(endpoints("outrider-ca", {"grpc": free_port(), "http": ca_port}))
        api.apply(endpoints("outrider-injector", {"https": injector_port}))
        async with (
            control_plane(root / "control", api, ca_dir=root / "ca") as control,
            control_plane(root / "control-b", api, ca_dir=root / "ca") as other,
        ):
            await ready(control)
            await ready(other)
            kubeconfig = api.kubeconfig(root / "kubeconfig")
            yield Installed(api, control, other, kubeconfig, injector_port)


@asynccontextmanager
async def synced_agent(control: ControlProcess) -> AsyncIterator[None]:
    """shop/web connected, its snapshot acknowledged, as /debug/agents shows it."""
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        version, _ = await agent.next()
        await agent.ack(version)

        async def acked() -> bool:
            shown = (await control.debug("/debug/agents"))[1]
            return any(a["acked"] == version for a in shown)

        await eventually(acked)
        yield


@asynccontextmanager
async def nacking_agent(control: ControlProcess) -> AsyncIterator[str]:
    """shop/web connected to `control`, having refused its snapshot (a bad path), as
    /debug/agents shows it; yields the version it refused."""
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        version, _ = await agent.next()
        await agent.nack(version, "policy.policies[0]: bad path")

        async def nacked() -> bool:
            shown = (await control.debug("/debug/agents"))[1]
            return any(a.get("nack") for a in shown)

        await eventually(nacked)
        yield version


def lines(ran: Ran, mark: str) -> list[str]:
    return [line for line in ran.stdout.splitlines() if line.startswith(mark)]


async def test_a_working_install_passes_every_check(installed: Installed) -> None:
    async with synced_agent(installed.control):
        ran = await installed.check()
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert not lines(ran, "✗") and not lines(ran, "‼"), ran.stdout
    passed = "\n".join(lines(ran, "✓"))
    for seen in (
        "Kubernetes runs native sidecars: Kubernetes v1.31.0",
        "the CNI enforces NetworkPolicy: calico",
        "Outrider's CRDs: 3 installed",
        "the CA is reachable and serving: healthy, bundle of 1 root",
        "trust bundle in namespace shop",
        "the injector's webhook answers: /healthz: 200",
        "agents connected and in sync: 1 agent, all SYNCED",
        "policies and routes accepted: none applied",
    ):
        assert seen in passed, ran.stdout
    assert ran.stdout.rstrip().endswith("all checks passed")


async def test_json_output_holds_each_check_for_a_script(installed: Installed) -> None:
    ran = await installed.check("-o", "json")
    shown = json.loads(ran.stdout)
    assert shown["ok"] is True and ran.returncode == 0
    names = {c["name"]: c for c in shown["checks"]}
    assert names["Outrider's CRDs"] == {
        "phase": "post-install",
        "name": "Outrider's CRDs",
        "status": "ok",
        "detail": "3 installed",
        "fix": "",
    }
    assert names["agents connected and in sync"]["status"] == "warn"  # none connected now


async def test_a_missing_crd_fails_with_how_to_install_it(installed: Installed) -> None:
    api = installed.api
    api.delete(
        "apiextensions.k8s.io/v1",
        "CustomResourceDefinition",
        "",
        "trafficpolicies.networking.outrider.io",
    )
    try:
        ran = await installed.check()
    finally:
        api.apply(TRAFFIC_POLICY_CRD.read_text())
    assert ran.returncode == 1
    (failed,) = lines(ran, "✗")
    assert failed == "✗ Outrider's CRDs: not installed: trafficpolicies.networking.outrider.io"
    assert "fix: kubectl apply -k deploy/overlays/local" in ran.stdout
    assert "outrider: a check failed" in ran.stderr


async def test_a_labelled_namespace_without_its_bundle_configmap_fails(
    installed: Installed,
) -> None:
    api = installed.api
    api.apply(namespace("billing"))
    try:
        ran = await installed.check()
    finally:
        api.delete("v1", "Namespace", "", "billing")
    assert ran.returncode == 1
    (failed,) = lines(ran, "✗")
    assert failed.startswith("✗ trust bundle in namespace billing: no ConfigMap")
    assert "kubectl create configmap outrider-trust-bundle -n billing" in ran.stdout
    assert "✓ trust bundle in namespace shop" in ran.stdout


async def test_a_bundle_configmap_without_the_cas_root_fails(installed: Installed) -> None:
    api = installed.api
    other = CaDirectory.create(installed.kubeconfig.parent / "other-ca").bundle_pem.decode()
    api.apply(namespace("billing") + bundle_configmap("billing", other))
    try:
        ran = await installed.check()
    finally:
        api.delete("v1", "Namespace", "", "billing")
    (failed,) = lines(ran, "✗")
    assert "billing: outrider-trust-bundle lacks a root the CA serves" in failed
    assert ran.returncode == 1


async def test_a_webhook_on_a_dead_port_fails_with_where_to_look(installed: Installed) -> None:
    api = installed.api
    api.apply(endpoints("outrider-injector", {"https": free_port()}))
    try:
        ran = await installed.check()
    finally:
        api.apply(endpoints("outrider-injector", {"https": installed.injector_port}))
    assert ran.returncode == 1
    (failed,) = lines(ran, "✗")
    assert failed.startswith(
        "✗ the injector's webhook answers: /healthz: 503 error trying to reach"
    )
    assert "logs deploy/outrider-injector" in ran.stdout
    assert "✓ the injector's webhook is configured" in ran.stdout


async def test_a_webhook_pointed_at_a_port_its_service_lacks_fails(installed: Installed) -> None:
    api = installed.api
    webhook = api.get(
        "admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", "", "outrider-injector"
    )
    original = json.loads(json.dumps(webhook))
    webhook["webhooks"][0]["clientConfig"]["service"]["port"] = 9999
    del webhook["webhooks"][1]["clientConfig"]["caBundle"]
    api.apply(yaml.safe_dump(webhook))
    try:
        ran = await installed.check()
    finally:
        api.apply(yaml.safe_dump(original))
    assert ran.returncode == 1
    failed = "\n".join(lines(ran, "✗"))
    assert "inject.outrider.io: Service outrider-injector has no port 9999" in failed
    assert "inject-without-capture.outrider.io: no caBundle" in failed


DENY_ADMIN = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: billing}}}}  # no pod here: no agent's config changes
  action: DENY
  rules:
    - to: {{paths: ["{path}"]}}
"""


async def test_a_policy_the_control_plane_refused_fails_saying_what_stays_in_force(
    installed: Installed,
) -> None:
    api = installed.api
    policy = ("security.outrider.io/v1alpha1", "AuthorizationPolicy", "shop", "deny-admin")

    def judged(generation: int) -> Callable[[], Awaitable[bool]]:
        async def written() -> bool:
            status = api.get(*policy).get("status") or {}
            return status.get("observedGeneration") == generation

        return written

    api.apply(DENY_ADMIN.format(path="/admin/*"))
    try:
        await eventually(judged(1))
        accepted = lines(await installed.check(), "✓")
        assert "✓ policies and routes accepted: 1 object, all accepted" in accepted
        api.apply(DENY_ADMIN.format(path="/admin/*/x"))  # a typo in an edit
        await eventually(judged(2))
        ran = await installed.check()
    finally:
        api.delete(*policy)
    assert ran.returncode == 1
    (failed,) = lines(ran, "✗")
    assert failed.startswith("✗ AuthorizationPolicy shop/deny-admin: not accepted: Invalid: ")
    assert failed.endswith("; its generation 1 stays in force")
    assert "fix: fix it and apply it again (kubectl -n shop get authorizationpolicy deny-admin" in (
        ran.stdout
    )


async def test_an_agent_that_refused_its_config_fails_naming_the_pod(
    installed: Installed,
) -> None:
    async with nacking_agent(installed.control) as version:
        ran = await installed.check()
    assert ran.returncode == 1
    (failed,) = lines(ran, "✗")
    assert failed == (
        f"✗ agent shop/web in sync: NACK (policy.policies[0]: bad path) at version {version}"
    )
    assert "kubectl logs -n shop web -c outrider-agent" in ran.stdout


async def test_an_agent_that_refused_its_config_on_the_other_replica_fails_too(
    installed: Installed,
) -> None:
    """Each replica lists only the agents connected to it: asked for both, check sees an
    agent that refused its config on either."""
    other = installed.other
    async with nacking_agent(other):
        both = await installed.check()
        one = await installed.check("--control", installed.control.debug_url)
        # The same replica twice (two port-forwards that landed on one pod) is one replica.
        url = installed.control.debug_url
        twice = await installed.check("--control", url, "--control", url + "/")
        status = await outrider("proxy-status", "--control", url, "--control", other.debug_url)
    assert both.returncode == 1
    assert lines(both, "✗")[0].startswith("✗ agent shop/web in sync: NACK")
    # One replica of two heard: not "all SYNCED", but a warning that says how to ask both.
    for ran in (one, twice):
        assert ran.returncode == 0, ran.stdout
        (warned,) = lines(ran, "‼")
        assert warned == (
            "‼ agents connected and in sync: the control plane runs 2 replicas and 1"
            " answered: the agents connected to the others are not shown, in sync or not"
        )
        assert "port-forward pod/POD 1501N:15014 for each pod of deployment/outrider-control" in (
            ran.stdout
        )
        assert "all SYNCED" not in ran.stdout
    assert status.returncode == 0, status.stderr
    assert "shop/web" in status.stdout and "NACK (policy.policies[0]: bad path)" in status.stdout
    assert "1 agents (of 2 control-plane replicas), 1 not in sync" in status.stderr


async def test_a_replica_that_does_not_answer_is_a_failure_and_the_others_agents_show(
    installed: Installed,
) -> None:
    gone = f"http://127.0.0.1:{free_port()}"
    async with synced_agent(installed.control):
        ran = await installed.check("--control", installed.control.debug_url, "--control", gone)
        status = await outrider(
            "proxy-status", "--control", installed.control.debug_url, "--control", gone
        )
    assert ran.returncode == 1
    (failed,) = lines(ran, "✗")
    assert failed.startswith(
        f"✗ agents connected and in sync: cannot reach the control plane at {gone}"
    )
    assert status.returncode == 1
    assert "shop/web" in status.stdout  # the replica that answered: its agents
    assert f"cannot reach the control plane at {gone}" in status.stderr
    assert "the agents of those replicas are not listed" in status.stderr


async def test_a_user_who_may_not_read_the_deployment_still_gets_every_check(
    installed: Installed,
) -> None:
    installed.api.fail_next(1, 403, verbs=("get",), kinds=("Deployment",))
    async with synced_agent(installed.control):
        ran = await installed.check("--control", installed.control.debug_url)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (warned,) = lines(ran, "‼")
    assert warned.startswith(
        "‼ agents connected and in sync: cannot tell how many control-plane replicas run ("
    )
    assert "403" in warned
    assert "the injector's webhook answers" in ran.stdout  # the rest is all there


async def test_an_unreachable_control_plane_fails_with_the_port_forward(
    installed: Installed,
) -> None:
    ran = await outrider(
        "check",
        "--kubeconfig",
        str(installed.kubeconfig),
        "--control",
        f"http://127.0.0.1:{free_port()}",
    )
    assert ran.returncode == 1
    (failed,) = lines(ran, "✗")
    assert failed.startswith("✗ agents connected and in sync: cannot reach the control plane")
    assert (
        "kubectl -n outrider-system port-forward deployment/outrider-control 15014:15014"
        in ran.stdout
    )


async def test_pre_install_on_a_cluster_without_native_sidecars_fails(tmp_path: Path) -> None:
    async with fake_api_server(tmp_path / "api", kubernetes_version="1.28") as api:
        ran = await outrider(
            "check", "--pre", "--kubeconfig", str(api.kubeconfig(tmp_path / "kubeconfig"))
        )
    assert ran.returncode == 1
    (failed,) = lines(ran, "✗")
    assert failed.startswith("✗ Kubernetes runs native sidecars: Kubernetes v1.28.0")
    assert "native_sidecar: false" in ran.stdout
    warned = lines(ran, "‼")
    assert warned == ["‼ the CNI enforces NetworkPolicy: cannot tell: no known CNI in kube-system"]
    assert "post-install" not in ran.stdout


async def test_an_unreachable_api_server_says_so(tmp_path: Path) -> None:
    async with fake_api_server(tmp_path / "api") as api:
        kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    ran = await outrider("check", "--kubeconfig", str(kubeconfig))
    assert ran.returncode == 1
    assert "cannot reach the API server at https://127.0.0.1:" in ran.stderr


async def test_proxy_status_prints_its_rows_as_json(installed: Installed) -> None:
    async with synced_agent(installed.control):
        ran = await outrider("proxy-status", "--control", installed.control.debug_url, "-o", "json")
    assert ran.returncode == 0, ran.stderr
    (row,) = json.loads(ran.stdout)
    assert row["pod"] == "shop/web" and row["state"] == "SYNCED"
    assert row["spiffe_id"] == "spiffe://example.org/ns/shop/sa/web"
    assert "1 agents, 0 not in sync" in ran.stderr


async def test_a_read_the_user_may_not_make_is_named_with_the_answer(installed: Installed) -> None:
    installed.api.fail_next(1, 403, verbs=("list",), kinds=("CustomResourceDefinition",))
    ran = await installed.check()
    assert ran.returncode == 1
    assert "refused list_custom_resource_definition: 403 injected fault" in ran.stderr
    assert "your kubeconfig's user may not read it" in ran.stderr
