"""deploy/: what each overlay builds is a cluster that would run.

Every overlay is built twice when kustomize is on PATH (`kustomize build` or
`kubectl kustomize`): by kustomize and by `build` below, a builder for the
few kustomize features deploy/ uses (resources, components, JSON 6902
patches, ConfigMaps from files), and the two must agree. Without kustomize
the checks run on `build`'s output alone. No API server runs here:
tests/k8s.py's models stand in for its schema.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ca import config as ca_config
from ca.signers.local import LocalSigner, init_ca
from identity import TrustDomain
from tests.k8s import to_model

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL = ROOT / "docs" / "install.md"
OVERLAYS = ("local", "vault")
SYSTEM = "outrider-system"
CA_SERVICE_NAME = "outrider-ca.outrider-system.svc"
WEBHOOK_NAME = "outrider-injector.outrider-system.svc"
# Made at install with kubectl, never kept in deploy/ (docs/install.md).
OPERATOR_SECRETS = {"outrider-ca-keys", "outrider-injector-tls"}

Obj = dict[str, Any]


# --- a builder for the kustomize features deploy/ uses -----------------------

_FEATURES = {"apiVersion", "kind", "resources", "components", "configMapGenerator", "patches"}


def build(directory: Path, objects: list[Obj] | None = None) -> list[Obj]:
    """The objects `kustomize build directory` prints; a component edits `objects`."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if unknown := set(spec) - _FEATURES:
        raise NotImplementedError(f"{directory}: teach build() {sorted(unknown)}")
    objects = [] if objects is None else objects
    for entry in spec.get("resources", []):
        path = directory / entry
        objects = objects + (build(path) if path.is_dir() else _documents(path))
    for entry in spec.get("components", []):
        objects = build(directory / entry, objects)
    objects += [_config_map(directory, gen) for gen in spec.get("configMapGenerator", [])]
    for patch in spec.get("patches", []):
        objects = [_patched(obj, patch, directory) for obj in objects]
    return objects


def _documents(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _config_map(directory: Path, generator: Mapping[str, Any]) -> Obj:
    assert generator["options"]["disableNameSuffixHash"] is True, "names are referenced as text"
    data = {}
    for entry in generator["files"]:
        key, _, file = entry.rpartition("=")
        data[key or file] = (directory / file).read_text()
    metadata = {"name": generator["name"], "namespace": generator["namespace"]}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _patched(obj: Obj, patch: Mapping[str, Any], directory: Path) -> Obj:
    target = patch["target"]
    if (obj["kind"], obj["metadata"]["name"]) != (target["kind"], target["name"]):
        return obj
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    assert isinstance(operations, list), "build() applies JSON 6902 patches only"
    patched: Obj = jsonpatch.apply_patch(obj, operations)
    return patched


def kustomize_command() -> list[str] | None:
    if path := shutil.which("kustomize"):
        return [path, "build"]
    if path := shutil.which("kubectl"):
        return [path, "kustomize"]
    return None


# --- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/ as an operator has it after `outrider ca init`: bundle.pem beside each overlay."""
    root = tmp_path_factory.mktemp("install")
    tree = root / "deploy"
    shutil.copytree(DEPLOY, tree)
    init_ca(
        root / "outrider-ca", TrustDomain.parse("cluster.local"), datetime.now(UTC), force=False
    )
    for overlay in OVERLAYS:
        shutil.copy(root / "outrider-ca" / "bundle.pem", tree / "overlays" / overlay)
    shutil.copy(root / "outrider-ca" / "root.pem", tree / "overlays" / "vault" / "vault-ca.pem")
    # The fail-closed overlay docs/install.md shows, as it shows it.
    ((path, text),) = re.findall(
        r"```yaml\n# (deploy/overlays/strict/\S+)\n(.*?)```", guide(), re.S
    )
    (root / path).parent.mkdir()
    (root / path).write_text(text)
    return tree


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, tree: Path) -> list[Obj]:
    objects = build(tree / "overlays" / request.param)
    assert objects
    return objects


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def of_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for deployment in of_kind(objects, "Deployment"):
        yield deployment["metadata"]["name"], deployment["spec"]["template"]["spec"]


def config_file(objects: list[Obj], configmap: str, key: str) -> Any:
    return yaml.safe_load(one(objects, "ConfigMap", configmap)["data"][key])


# --- the manifests are objects the API server knows ---------------------------


def test_every_file_in_deploy_is_known_to_the_api_server() -> None:
    files = [p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"]
    assert len(files) >= 7
    for path in files:
        for obj in _documents(path):
            to_model(obj)


def test_every_object_an_overlay_builds_is_known_to_the_api_server(overlay: list[Obj]) -> None:
    kinds = {o["kind"] for o in overlay}
    assert {"Deployment", "Service", "MutatingWebhookConfiguration", "NetworkPolicy"} <= kinds
    for obj in overlay:
        to_model(obj)


def test_to_model_names_a_field_the_api_does_not_know() -> None:
    (hook,) = _documents(DEPLOY / "base" / "webhook.yaml")
    hook["webhooks"][0]["failurepolicy"] = hook["webhooks"][0].pop("failurePolicy")
    with pytest.raises(ValueError, match=r"webhooks\[0\]\.failurepolicy"):
        to_model(hook)


@pytest.mark.parametrize("name", [*OVERLAYS, "strict"])
def test_the_builder_here_agrees_with_kustomize(tree: Path, name: str) -> None:
    command = kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl on PATH: checked with build() alone")
    out = subprocess.run(
        [*command, str(tree / "overlays" / name)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr

    def keyed(objects: list[Obj]) -> dict[tuple[str, str, str], Obj]:
        return {
            (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
            for o in objects
        }

    theirs = keyed([doc for doc in yaml.safe_load_all(out.stdout) if doc])
    assert theirs == keyed(build(tree / "overlays" / name))


def test_an_overlay_without_its_bundle_does_not_build(tmp_path: Path) -> None:
    """An operator who forgot bundle.pem gets an error, not agents with no trust bundle."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    local = tmp_path / "deploy" / "overlays" / "local"
    (local / "bundle.pem").unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=r"bundle\.pem"):
        build(local)
    if command := kustomize_command():
        out = subprocess.run([*command, str(local)], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "bundle.pem" in out.stderr


# --- the webhook -----------------------------------------------------------------


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A Kubernetes label selector, as the API server evaluates it."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, op, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def namespace(name: str, **labels: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name, **labels}  # set by the API server


def webhook(objects: list[Obj]) -> Obj:
    (hook,) = one(objects, "MutatingWebhookConfiguration", "outrider-injector")["webhooks"]
    assert isinstance(hook, dict)
    return hook


@pytest.mark.parametrize(
    ("labels", "sent"),
    [
        (namespace("shop", **{"outrider.io/inject": "enabled"}), True),
        (namespace("shop"), False),
        (namespace("shop", **{"outrider.io/inject": "disabled"}), False),
        (namespace("kube-system", **{"outrider.io/inject": "enabled"}), False),
        (namespace("outrider-system", **{"outrider.io/inject": "enabled"}), False),
    ],
)
def test_webhook_sees_pods_only_in_labelled_namespaces(
    overlay: list[Obj], labels: dict[str, str], sent: bool
) -> None:
    assert selects(webhook(overlay)["namespaceSelector"], labels) is sent


@pytest.mark.parametrize(
    ("labels", "sent"),
    [({}, True), ({"app": "web"}, True), ({"outrider.io/inject": "false"}, False)],
)
def test_a_pod_labelled_inject_false_is_not_sent(
    overlay: list[Obj], labels: dict[str, str], sent: bool
) -> None:
    assert selects(webhook(overlay)["objectSelector"], labels) is sent


def test_webhook_admits_pod_creation_without_blocking_the_cluster(overlay: list[Obj]) -> None:
    hook = webhook(overlay)
    assert hook["failurePolicy"] == "Ignore"
    assert hook["timeoutSeconds"] == 5
    assert hook["sideEffects"] == "None"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["admissionReviewVersions"] == ["v1"]
    (rule,) = hook["rules"]
    assert (rule["operations"], rule["apiGroups"], rule["resources"]) == (
        ["CREATE"],
        [""],
        ["pods"],
    )


def test_the_fail_closed_component_changes_the_failure_policy_only(tree: Path) -> None:
    local, strict = build(tree / "overlays" / "local"), build(tree / "overlays" / "strict")
    assert webhook(strict)["failurePolicy"] == "Fail"
    webhook(strict)["failurePolicy"] = "Ignore"
    assert strict == local


def test_webhook_reaches_the_injector_where_it_listens(overlay: list[Obj]) -> None:
    service = webhook(overlay)["clientConfig"]["service"]
    assert (service["namespace"], service["path"], service["port"]) == (SYSTEM, "/mutate", 9443)
    assert "caBundle" not in webhook(overlay)["clientConfig"]  # set at install, kept by apply
    port = service_port(overlay, service["name"], service["port"])
    assert container_port(overlay, service["name"], port["targetPort"]) == 9443
    injector = config_file(overlay, "outrider-injector-config", "injector.yaml")
    assert injector["listen"].rpartition(":")[2] == "9443"


def test_the_injector_serves_the_path_the_webhook_calls(overlay: list[Obj]) -> None:
    try:
        from injector.config import Limits
        from injector.core import Settings
        from injector.webhook import InjectorMetrics, make_app
    except ImportError:
        pytest.skip("injector.webhook is not there yet: the injector lands with this issue")
    app = make_app(Settings(), Limits(), InjectorMetrics())
    routes = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource}
    assert ("POST", webhook(overlay)["clientConfig"]["service"]["path"]) in routes


# --- Services, Deployments, PodDisruptionBudgets, NetworkPolicies ----------------


def service_port(objects: list[Obj], service: str, port: int) -> Obj:
    (found,) = [p for p in one(objects, "Service", service)["spec"]["ports"] if p["port"] == port]
    assert isinstance(found, dict)
    return found


def deployments_selected(objects: list[Obj], selector: Mapping[str, Any]) -> list[str]:
    return [
        d["metadata"]["name"]
        for d in of_kind(objects, "Deployment")
        if selects(selector, d["spec"]["template"]["metadata"]["labels"])
    ]


def container_port(objects: list[Obj], deployment: str, target: int | str) -> int:
    """The containerPort a Service's targetPort (a number or a port name) lands on."""
    (container,) = one(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    ports = container["ports"]
    found = [p for p in ports if target in (p["containerPort"], p.get("name"))]
    assert len(found) == 1, f"{deployment} has no containerPort {target!r}"
    port: int = found[0]["containerPort"]
    return port


def test_each_service_sends_to_its_deployments_container_ports(overlay: list[Obj]) -> None:
    services = of_kind(overlay, "Service")
    assert {s["metadata"]["name"] for s in services} == {"outrider-ca", "outrider-injector"}
    for service in services:
        name = service["metadata"]["name"]
        assert deployments_selected(overlay, {"matchLabels": service["spec"]["selector"]}) == [name]
        for port in service["spec"]["ports"]:
            container_port(overlay, name, port["targetPort"])


def test_ca_service_ports_are_the_ones_the_ca_serves(overlay: list[Obj]) -> None:
    config = ca_config.parse(
        config_file(overlay, "outrider-ca-config", "ca.yaml"), base=Path("/etc/outrider/config")
    )
    grpc = service_port(overlay, "outrider-ca", 8443)
    assert container_port(overlay, "outrider-ca", grpc["targetPort"]) == config.grpc.port
    http = service_port(overlay, "outrider-ca", 8080)
    assert container_port(overlay, "outrider-ca", http["targetPort"]) == config.http.port


def test_selectors_of_budgets_and_network_policies_each_pick_one_deployment(
    overlay: list[Obj],
) -> None:
    for budget in of_kind(overlay, "PodDisruptionBudget"):
        picked = deployments_selected(overlay, budget["spec"]["selector"])
        assert picked == [budget["metadata"]["name"]]
        assert (
            budget["spec"]["minAvailable"]
            < one(overlay, "Deployment", picked[0])["spec"]["replicas"]
        )
    for policy in of_kind(overlay, "NetworkPolicy"):
        picked = deployments_selected(overlay, policy["spec"]["podSelector"])
        assert len(picked) == (2 if policy["metadata"]["name"] == "default-deny" else 1)


def test_the_ca_runs_two_replicas(overlay: list[Obj]) -> None:
    assert one(overlay, "Deployment", "outrider-ca")["spec"]["replicas"] == 2
    assert one(overlay, "PodDisruptionBudget", "outrider-ca")["spec"]["minAvailable"] == 1


def test_the_injector_may_call_nothing(overlay: list[Obj]) -> None:
    """Its only egress policy is the default deny; it has no API token either."""
    egress = [
        p
        for p in of_kind(overlay, "NetworkPolicy")
        if "Egress" in p["spec"]["policyTypes"]
        and "outrider-injector" in deployments_selected(overlay, p["spec"]["podSelector"])
    ]
    assert [p["metadata"]["name"] for p in egress] == ["default-deny"]
    assert egress[0]["spec"].get("egress", []) == []
    _, spec = next(s for s in pod_specs(overlay) if s[0] == "outrider-injector")
    assert spec["automountServiceAccountToken"] is False


def test_every_namespaced_object_is_in_outrider_system(overlay: list[Obj]) -> None:
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
    }
    for obj in overlay:
        if obj["kind"] not in cluster_scoped:
            assert obj["metadata"]["namespace"] == SYSTEM, obj["metadata"]["name"]


# --- what the pods mount, and their privileges ------------------------------------


def test_every_mounted_configmap_and_secret_is_built_or_made_at_install(overlay: list[Obj]) -> None:
    configmaps = {o["metadata"]["name"] for o in of_kind(overlay, "ConfigMap")}
    for deployment, spec in pod_specs(overlay):
        mounted = {m["name"] for c in spec["containers"] for m in c["volumeMounts"]}
        assert mounted == {v["name"] for v in spec["volumes"]}, deployment
        for volume in spec["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, deployment
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                assert name in OPERATOR_SECRETS, deployment
                assert re.search(rf"kubectl create secret \w+ {name}\b", guide()), name


def test_key_files_are_readable_by_the_pods_group_only(overlay: list[Obj]) -> None:
    for deployment, spec in pod_specs(overlay):
        for volume in spec["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o440, deployment
                assert spec["securityContext"]["fsGroup"] == container_uid(spec), deployment


def container_uid(spec: Obj) -> int:
    (container,) = spec["containers"]
    uid: int = container["securityContext"]["runAsUser"]
    return uid


def test_every_container_runs_hardened_with_resource_limits(overlay: list[Obj]) -> None:
    specs = dict(pod_specs(overlay))
    assert set(specs) == {"outrider-ca", "outrider-injector"}
    for deployment, spec in specs.items():
        assert "initContainers" not in spec
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["runAsNonRoot"] is True, deployment
            assert context["runAsUser"] == context["runAsGroup"] == 1338, deployment
            assert context["readOnlyRootFilesystem"] is True, deployment
            assert context["allowPrivilegeEscalation"] is False, deployment
            assert context["capabilities"] == {"drop": ["ALL"]}, deployment
            assert context["seccompProfile"] == {"type": "RuntimeDefault"}, deployment
            assert "privileged" not in context
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, deployment
            assert re.fullmatch(r"ghcr\.io/outrider/ca:\d+\.\d+\.\d+", container["image"])
            assert container["args"][-2:] == [
                "--config",
                f"/etc/outrider/config/{container['args'][0]}.yaml",
            ]
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)


def test_the_namespace_enforces_the_restricted_pod_security_standard(overlay: list[Obj]) -> None:
    labels = one(overlay, "Namespace", SYSTEM)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_only_api_permission_is_creating_tokenreviews(overlay: list[Obj]) -> None:
    assert of_kind(overlay, "Role") == of_kind(overlay, "RoleBinding") == []
    (role,) = of_kind(overlay, "ClusterRole")
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}
    ]
    (binding,) = of_kind(overlay, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "outrider-ca", "namespace": SYSTEM}
    ]
    _, spec = next(s for s in pod_specs(overlay) if s[0] == "outrider-ca")
    assert spec["serviceAccountName"] == "outrider-ca"


# --- the configs inside the manifests ---------------------------------------------


def mount_path(objects: list[Obj], deployment: str, volume_name: str) -> Path:
    (container,) = one(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume_name]
    return Path(mount["mountPath"])


def volume_named(objects: list[Obj], deployment: str, source: Mapping[str, str]) -> str:
    spec = one(objects, "Deployment", deployment)["spec"]["template"]["spec"]
    for volume in spec["volumes"]:
        for kind, name in source.items():
            if volume.get(kind, {}).get("name" if kind == "configMap" else "secretName") == name:
                return str(volume["name"])
    raise AssertionError(f"{deployment} mounts no {source}")


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_ca_config_is_one_ca_serve_accepts(tree: Path, name: str) -> None:
    objects = build(tree / "overlays" / name)
    config_dir = mount_path(
        objects,
        "outrider-ca",
        volume_named(objects, "outrider-ca", {"configMap": "outrider-ca-config"}),
    )
    raw = config_file(objects, "outrider-ca-config", "ca.yaml")
    config = ca_config.parse(raw, base=config_dir, source=f"{name}/ca.yaml")
    assert CA_SERVICE_NAME in config.serving_names
    assert config.kubernetes.tokenreview is not None  # needs the ClusterRole
    assert config.kubernetes.tokenreview.kubeconfig is None  # the pod's own ServiceAccount
    assert config.kubernetes.audience == "outrider-ca"  # the injector's projected token
    injector = config_file(objects, "outrider-injector-config", "injector.yaml")
    assert str(config.trust_domain) == injector["trust_domain"]
    if name == "local":
        keys = volume_named(objects, "outrider-ca", {"secret": "outrider-ca-keys"})
        assert config.signer_dir == mount_path(objects, "outrider-ca", keys)
    else:
        assert config.vault is not None and config.vault.ca_file is not None
        assert config.vault.auth.method == "kubernetes"
        vault_ca = volume_named(objects, "outrider-ca", {"configMap": "outrider-vault-ca"})
        assert config.vault.ca_file == mount_path(objects, "outrider-ca", vault_ca) / "vault-ca.pem"
        assert "vault-ca.pem" in one(objects, "ConfigMap", "outrider-vault-ca")["data"]


def test_agents_dial_the_ca_by_a_name_its_certificate_carries(overlay: list[Obj]) -> None:
    injector = config_file(overlay, "outrider-injector-config", "injector.yaml")
    host, _, port = injector["ca"]["address"].rpartition(":")
    ca = ca_config.parse(config_file(overlay, "outrider-ca-config", "ca.yaml"), base=Path("/"))
    assert host in ca.serving_names
    assert service_port(overlay, "outrider-ca", int(port))["name"] == "grpc"


def test_the_trust_bundle_is_where_the_injector_looks_for_it(overlay: list[Obj]) -> None:
    injector = config_file(overlay, "outrider-injector-config", "injector.yaml")
    bundle = one(overlay, "ConfigMap", injector["ca"]["bundle_configmap"])
    assert bundle["metadata"]["namespace"] == injector["system_namespace"] == SYSTEM
    assert bundle["data"]["bundle.pem"].startswith("-----BEGIN CERTIFICATE-----")


def test_the_injector_config_is_one_injector_serve_accepts(
    overlay: list[Obj], tmp_path: Path
) -> None:
    try:
        from injector import config as injector_config  # lands with the injector
    except ImportError:
        pytest.skip("injector.config is not there yet: the injector lands with this issue")
    path = tmp_path / "injector.yaml"
    path.write_text(one(overlay, "ConfigMap", "outrider-injector-config")["data"]["injector.yaml"])
    config = injector_config.load(path, require_tls=True)
    assert str(config.settings.trust_domain) == "cluster.local"
    assert config.settings.system_namespace == SYSTEM
    assert config.tls is not None
    tls_dir = mount_path(overlay, "outrider-injector", "tls")
    assert config.tls.cert_file.parent == config.tls.key_file.parent == tls_dir


# --- what docs/install.md has the operator do -------------------------------------


def guide() -> str:
    return INSTALL.read_text()


def guide_command(start: str) -> str:
    """The shell command in docs/install.md that begins with `start`, continuations joined."""
    text = guide().replace("\\\n", " ")
    found = [line.strip() for line in text.splitlines() if line.strip().startswith(start)]
    assert len(found) == 1, f"install.md: {len(found)} commands start with {start!r}"
    return found[0]


def test_the_ca_starts_from_the_secret_the_guide_creates(tmp_path: Path) -> None:
    command = guide_command("kubectl create secret generic outrider-ca-keys")
    files = [Path(f) for f in re.findall(r"--from-file=(\S+)", command)]
    assert "root.key" not in {f.name for f in files}  # stays offline
    made, secret = tmp_path / files[0].parent, tmp_path / "secret"
    init_ca(made, TrustDomain.parse("cluster.local"), datetime.now(UTC), force=False)
    secret.mkdir()
    for file in files:
        shutil.copy(tmp_path / file, secret / file.name)
    signer = LocalSigner.load(secret)
    assert str(signer.trust_domain) == "cluster.local"


def test_every_deploy_path_the_guide_names_exists() -> None:
    made_by_the_operator = {"bundle.pem", "vault-ca.pem", "strict"}
    paths = set(re.findall(r"deploy/[\w./-]+[\w/]", guide()))
    assert {"deploy/overlays/local", "deploy/webhook-cert.sh"} <= paths
    for path in paths:
        assert (ROOT / path).exists() or made_by_the_operator & set(Path(path).parts), path


# --- the webhook's serving certificate ---------------------------------------------


async def handshake(out: Path, server_name: str) -> bytes:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(out / "tls.crt", out / "tls.key")
    client = ssl.create_default_context(cafile=str(out / "ca.pem"))  # the caBundle

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname=server_name
            )
            data = await reader.read()
            writer.close()
            return data
    finally:
        listener.close()


@pytest.fixture(scope="module")
def webhook_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("webhook") / "certs"
    run = subprocess.run(
        ["bash", str(DEPLOY / "webhook-cert.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return out


async def test_the_webhook_certificate_is_trusted_for_the_injector_service(
    webhook_cert: Path,
) -> None:
    """What the API server does: dial the Service's DNS name, trust only the caBundle."""
    assert await handshake(webhook_cert, WEBHOOK_NAME) == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(webhook_cert, "outrider-injector.default.svc")


def test_the_webhook_certificate_is_a_server_leaf_and_its_ca_key_is_gone(
    webhook_cert: Path,
) -> None:
    leaf = x509.load_pem_x509_certificate((webhook_cert / "tls.crt").read_bytes())
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [WEBHOOK_NAME]
    assert sorted(p.name for p in webhook_cert.iterdir()) == ["ca.pem", "tls.crt", "tls.key"]
    assert (webhook_cert / "tls.key").stat().st_mode & 0o077 == 0
