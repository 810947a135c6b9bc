"""The fake API server behaves like kube-apiserver for the real `kubernetes` client.

The control plane list-watches through that client with a kubeconfig, so these
tests drive the fake the same way: CoreV1Api, CustomObjectsApi and
kubernetes.watch.Watch, configured from the kubeconfig the fake writes.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.apiserver import ApiError, FakeApiServer, fake_api_server, fake_api_server_thread

GROUP, VERSION, PLURAL = "example.com", "v1", "widgets"
#: A CRD as a user writes one: a status subresource, a schema with required fields,
#: an enum with a default, an int-or-string and a free-form map.
WIDGETS_CRD = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wg]}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
                color: {type: string, enum: [red, blue], default: red}
                port: {x-kubernetes-int-or-string: true}
                rules:
                  type: array
                  items:
                    type: object
                    properties:
                      paths: {type: array, items: {type: string, pattern: "^/"}}
                extra: {type: object, x-kubernetes-preserve-unknown-fields: true}
            status:
              type: object
              properties:
                ready: {type: boolean}
"""


def widget(name: str, namespace: str, spec: str = "{size: 1}") -> str:
    return (
        f"apiVersion: example.com/v1\nkind: Widget\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )


def pod(name: str, namespace: str, labels: str = "{}") -> str:
    return (
        f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, "
        f"labels: {labels}}}\nspec:\n  containers: [{{name: app, image: nginx:1.27}}]\n"
    )


def namespace(name: str) -> str:
    return f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeApiServer]:
    root = tmp_path_factory.mktemp("apiserver")
    crd = root / "widgets.yaml"
    crd.write_text(WIDGETS_CRD)
    with fake_api_server_thread(root / "server", crds=[crd], bookmark_interval=0.05) as server:
        yield server


@pytest.fixture(scope="module")
def kube(api: FakeApiServer, tmp_path_factory: pytest.TempPathFactory) -> client.ApiClient:
    kubeconfig = api.kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")
    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture
def ns(api: FakeApiServer, request: pytest.FixtureRequest) -> str:
    """A namespace of the test's own, so tests sharing the server don't see each other."""
    name = request.node.name.replace("_", "-")[:63].strip("-")
    api.apply(namespace(name))
    return name


def stream(func: Any, *args: Any, count: int, timeout: int = 2, **kwargs: Any) -> list[Any]:
    """The first `count` events of a watch (fewer if it times out first)."""
    events = []
    w = watch.Watch()
    for event in w.stream(func, *args, timeout_seconds=timeout, **kwargs):
        events.append(event)
        if len(events) == count:
            w.stop()
    return events


def raw(api: FakeApiServer, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
    """A request as bytes on the wire, for what the client would check or hide."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"}
    request = urllib.request.Request(api.url + path, data, headers, method=method)
    tls = ssl.create_default_context(cafile=api.ca_file)
    try:
        with urllib.request.urlopen(request, context=tls) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def error_body(error: ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(error.body)
    return body


def test_the_client_loads_the_kubeconfig(api: FakeApiServer, tmp_path: Path) -> None:
    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(api.kubeconfig(tmp_path / "kubeconfig")),
        client_configuration=configuration,
    )
    with client.ApiClient(configuration) as kube:
        assert client.VersionApi(kube).get_code().git_version == "v1.31.0"
        names = [n.metadata.name for n in client.CoreV1Api(kube).list_namespace().items]
    assert {"default", "kube-system"} <= set(names)


def test_a_request_without_the_token_is_unauthorized(api: FakeApiServer, tmp_path: Path) -> None:
    configuration = client.Configuration()
    configuration.host = api.url
    configuration.ssl_ca_cert = str(api.ca_file)
    configuration.api_key = {"authorization": "Bearer not-the-token"}
    with client.ApiClient(configuration) as kube, pytest.raises(ApiException) as refused:
        client.CoreV1Api(kube).list_namespace()
    assert refused.value.status == 401
    assert error_body(refused.value)["reason"] == "Unauthorized"


def test_a_watch_from_a_listed_version_sees_exactly_the_later_changes(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(kube)
    api.apply(pod("before", ns))
    listed = core.list_namespaced_pod(ns)
    assert [p.metadata.name for p in listed.items] == ["before"]
    api.apply(pod("web", ns))
    api.apply(pod("web", ns, labels="{tier: front}"))
    api.apply(pod("elsewhere", "default"))  # another namespace: not in this watch
    api.delete("v1", "Pod", ns, "before")

    events = stream(
        core.list_namespaced_pod,
        ns,
        count=4,
        timeout=1,
        resource_version=listed.metadata.resource_version,
    )

    seen = [(e["type"], e["object"].metadata.name) for e in events]
    assert seen == [("ADDED", "web"), ("MODIFIED", "web"), ("DELETED", "before")]
    versions = [int(e["object"].metadata.resource_version) for e in events]
    assert versions == sorted(versions)
    assert versions[0] > int(listed.metadata.resource_version)
    api.delete("v1", "Pod", "default", "elsewhere")


def test_a_watch_from_no_version_starts_with_the_current_objects(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    listed = {"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(pod("b", ns))]}
    api.apply(pod("a", ns) + "---\n" + json.dumps(listed))
    events = stream(client.CoreV1Api(kube).list_namespaced_pod, ns, count=2)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]


def test_a_watch_sees_live_changes_made_while_it_is_open(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(kube)
    version = core.list_namespaced_pod(ns).metadata.resource_version
    events: list[Any] = []
    watcher = threading.Thread(
        target=lambda: events.extend(
            stream(core.list_namespaced_pod, ns, count=1, resource_version=version)
        )
    )
    watcher.start()
    api.apply(pod("late", ns))
    watcher.join(timeout=5)
    assert [(e["type"], e["object"].metadata.name) for e in events] == [("ADDED", "late")]


def test_a_compacted_version_is_410_gone(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    custom = client.CustomObjectsApi(kube)
    version = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["metadata"][
        "resourceVersion"
    ]
    api.apply(widget("w", ns))
    api.compact()

    # The client retries a 410 once from the same version, then raises it.
    with pytest.raises(ApiException) as gone:
        for _ in watch.Watch().stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            ns,
            PLURAL,
            resource_version=version,
        ):
            pass
    assert gone.value.status == 410
    assert f"Expired: too old resource version: {version} (" in gone.value.reason

    # On the wire: a 200 watch whose one event is the Status kube-apiserver sends.
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}?watch=1&resourceVersion={version}"
    code, body = raw(api, "GET", path)
    assert code == 200
    assert [json.loads(line) for line in body.splitlines()] == [
        {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {version} ({api.resource_version})",
                "reason": "Expired",
                "code": 410,
            },
        }
    ]
    # A version from after the compaction watches fine.
    events = stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        ns,
        PLURAL,
        count=1,
        resource_version="0",
    )
    assert [e["type"] for e in events] == ["ADDED"]


def test_bookmarks_carry_the_latest_version(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(kube)
    version = core.list_namespaced_pod(ns).metadata.resource_version
    api.apply(pod("other", "default"))  # a change in another namespace moves the version on
    events = stream(
        core.list_namespaced_pod, ns, count=1, resource_version=version, allow_watch_bookmarks=True
    )
    assert [e["type"] for e in events] == ["BOOKMARK"]
    assert events[0]["raw_object"] == {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": api.resource_version},
    }
    api.delete("v1", "Pod", "default", "other")


def test_the_status_subresource_keeps_status_and_spec_apart(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    custom = client.CustomObjectsApi(kube)
    args = (GROUP, VERSION, ns, PLURAL)
    created = custom.create_namespaced_custom_object(
        *args,
        {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": 1},
            "status": {"ready": True},
        },
    )
    assert "status" not in created  # a new object's status is the controller's to write
    assert created["metadata"]["generation"] == 1

    status = custom.patch_namespaced_custom_object_status(*args, "w", {"status": {"ready": True}})
    assert status["status"] == {"ready": True}
    assert status["metadata"]["generation"] == 1

    status["spec"]["size"] = 2
    status["status"]["ready"] = False
    updated = custom.replace_namespaced_custom_object(*args, "w", status)
    assert updated["spec"]["size"] == 2
    assert updated["status"] == {"ready": True}  # a main write cannot change the status
    assert updated["metadata"]["generation"] == 2

    relabelled = custom.patch_namespaced_custom_object(
        *args, "w", {"metadata": {"labels": {"team": "a"}}}
    )
    assert relabelled["metadata"]["generation"] == 2  # metadata alone is no new generation


def test_a_stale_resource_version_is_409_conflict(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    custom = client.CustomObjectsApi(kube)
    stale = api.apply(widget("w", ns))[0]
    api.apply(widget("w", ns, "{size: 5}"))
    stale["spec"]["size"] = 7
    with pytest.raises(ApiException) as conflict:
        custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "w", stale)
    assert conflict.value.status == 409
    assert error_body(conflict.value)["reason"] == "Conflict"
    assert api.get("example.com/v1", "Widget", ns, "w")["spec"]["size"] == 5
    with pytest.raises(ApiException) as exists:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, stale)
    assert (exists.value.status, error_body(exists.value)["reason"]) == (409, "AlreadyExists")


def test_an_invalid_custom_object_is_422_with_the_field_paths(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    bad = "{size: 0, color: green, port: [1], rules: [{paths: [api]}]}"
    with pytest.raises(ApiError) as refused:
        api.apply(widget("w", ns, bad))
    assert refused.value.code == 422
    assert refused.value.fields == [
        "spec.color",
        "spec.port",
        "spec.rules[0].paths[0]",
        "spec.size",
    ]
    assert refused.value.message.startswith('Widget.example.com "w" is invalid: [spec.color: ')

    custom = client.CustomObjectsApi(kube)
    with pytest.raises(ApiException) as over_http:
        body = {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": "w"},
            "spec": {"size": "big"},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    status = error_body(over_http.value)
    assert (status["code"], status["reason"]) == (422, "Invalid")
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueTypeInvalid",
            "message": 'Invalid value: "big": spec.size in body must be of type integer: "big"',
            "field": "spec.size",
        }
    ]


def test_custom_objects_are_pruned_and_defaulted_as_their_schema_says(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    custom = client.CustomObjectsApi(kube)
    body = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"size": 1, "port": "http", "junk": 1, "extra": {"any": {"thing": 1}}},
    }
    stored = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)
    assert stored["spec"] == {
        "size": 1,
        "port": "http",
        "color": "red",
        "extra": {"any": {"thing": 1}},
    }
    with pytest.raises(ApiError) as strict:  # kubectl apply validates strictly
        api.apply(widget("w2", ns, "{size: 1, junk: 1}"))
    assert strict.value.code == 400
    assert 'strict decoding error: unknown field "spec.junk"' in strict.value.message


def test_an_invalid_built_in_object_is_refused_as_kube_apiserver_does(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    service = "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {}}}\nspec:\n  ports: [{}]\n"  # noqa: E501
    with pytest.raises(ApiError) as out_of_range:
        api.apply(service.format(ns, "{port: 70000, targetPort: 8080}"))
    assert (out_of_range.value.code, out_of_range.value.fields) == (422, ["spec.ports[0].port"])
    assert "Invalid value: 70000: must be between 1 and 65535, inclusive" in str(out_of_range.value)

    # A string where the API has an int fails in the server's decoder: 400, not 422.
    # (The client checks its models' types first, so this one goes on the wire by hand.)
    body = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"ports": [{"port": "80"}]},
    }
    code, answer = raw(api, "POST", f"/api/v1/namespaces/{ns}/services", body)
    status = json.loads(answer)
    assert (code, status["code"], status["reason"]) == (400, 400, "BadRequest")
    assert (
        "cannot unmarshal string into Go struct field ServicePort.spec.ports.port of type int32"
        in status["message"]
    )

    with pytest.raises(ApiError) as no_image:
        api.apply(pod("Bad_Name", ns).replace("image: nginx:1.27", "ports: [{containerPort: 0}]"))
    assert no_image.value.fields == [
        "metadata.name",
        "spec.containers[0].image",
        "spec.containers[0].ports[0].containerPort",
    ]


def test_built_in_objects_get_the_defaults_a_client_reads_back(api: FakeApiServer, ns: str) -> None:
    api.apply(f"""\
apiVersion: v1
kind: Service
metadata: {{name: backend, namespace: {ns}}}
spec:
  selector: {{app: backend}}
  ports: [{{name: http, port: 8080, appProtocol: http}}]
""")
    service = api.get("v1", "Service", ns, "backend")
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "appProtocol": "http", "protocol": "TCP", "targetPort": 8080}
    ]
    assert service["spec"]["clusterIP"].startswith("10.96.")
    stored = api.apply(pod("web", ns))[0]
    assert stored["spec"]["serviceAccountName"] == "default"
    assert stored["status"]["phase"] == "Pending"
    running = api.set_status("v1", "Pod", ns, "web", {"phase": "Running", "podIP": "10.0.0.7"})
    assert running["status"]["podIP"] == "10.0.0.7"
    with pytest.raises(ApiError) as missing:
        api.apply(pod("web", "no-such-namespace"))
    assert (missing.value.code, missing.value.message) == (
        404,
        'namespaces "no-such-namespace" not found',
    )


def test_kubectl_apply_removes_what_the_manifest_drops_and_keeps_the_status(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    first = api.apply(widget("w", ns, "{size: 1, port: 80}"))[0]
    client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, "w", {"status": {"ready": True}}
    )
    second = api.apply(widget("w", ns, "{size: 2}"))[0]
    assert second["spec"] == {"size": 2, "color": "red"}
    assert second["status"] == {"ready": True}
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    again = api.apply(widget("w", ns, "{size: 2}"))[0]
    assert again["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]


def test_label_and_field_selectors_filter_lists_and_watches(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(kube)
    api.apply(
        "---\n".join(
            [
                pod("a", ns, "{app: web, tier: front}"),
                pod("b", ns, "{app: web, tier: back}"),
                pod("c", ns, "{app: db}"),
                pod("d", ns),
            ]
        )
    )
    expectations = {
        "app=web": ["a", "b"],
        "app==web,tier!=front": ["b"],
        "app in (web, db)": ["a", "b", "c"],
        "app notin (web)": ["c", "d"],
        "tier": ["a", "b"],
        "!tier": ["c", "d"],
    }
    for selector, names in expectations.items():
        listed = core.list_namespaced_pod(ns, label_selector=selector).items
        assert [p.metadata.name for p in listed] == names, selector
    by_name = core.list_pod_for_all_namespaces(
        field_selector=f"metadata.name=c,metadata.namespace={ns}"
    )
    assert [p.metadata.name for p in by_name.items] == ["c"]
    with pytest.raises(ApiException) as unknown:
        core.list_namespaced_pod(ns, field_selector="spec.image=x")
    assert unknown.value.status == 400

    # A watch with a selector sees an object that stops matching as DELETED.
    version = core.list_namespaced_pod(ns).metadata.resource_version
    api.apply(pod("a", ns, "{app: web, tier: back}"))
    api.apply(pod("d", ns, "{tier: front}"))
    events = stream(
        core.list_namespaced_pod, ns, count=2, label_selector="tier=front", resource_version=version
    )
    assert [(e["type"], e["object"].metadata.name) for e in events] == [
        ("DELETED", "a"),
        ("ADDED", "d"),
    ]


def test_a_crd_serves_its_resource_and_a_bad_crd_is_refused(
    api: FakeApiServer, kube: client.ApiClient
) -> None:
    crd = (
        WIDGETS_CRD.replace("widgets", "gadgets")
        .replace("Widget", "Gadget")
        .replace("widget", "gadget")
        .replace("Namespaced", "Cluster")
    )
    stored = api.apply(crd)[0]
    assert {c["type"] for c in stored["status"]["conditions"]} == {"Established", "NamesAccepted"}
    custom = client.CustomObjectsApi(kube)
    body = {
        "apiVersion": "example.com/v1",
        "kind": "Gadget",
        "metadata": {"name": "g"},
        "spec": {"size": 1},
    }
    assert custom.create_cluster_custom_object(GROUP, VERSION, "gadgets", body)["spec"]["size"] == 1
    api.delete("apiextensions.k8s.io/v1", "CustomResourceDefinition", "", "gadgets.example.com")
    with pytest.raises(ApiException) as gone:
        custom.list_cluster_custom_object(GROUP, VERSION, "gadgets")
    assert gone.value.status == 404

    not_structural = crd.replace("size: {type: integer, minimum: 1}", "size: {minimum: 1}")
    with pytest.raises(ApiError) as refused:
        api.apply(not_structural)
    assert refused.value.fields == [
        "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[size].type"
    ]


def test_injected_faults_and_dropped_watches(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(kube)
    api.fail_next(1, 500)
    with pytest.raises(ApiException) as failed:
        core.list_namespaced_pod(ns)
    assert failed.value.status == 500
    assert core.list_namespaced_pod(ns).items == []
    assert api.requests[-1].verb == "list"
    assert api.requests[-1].path == f"/api/v1/namespaces/{ns}/pods"

    # Watches whose clients went away (earlier tests') are noticed and closed.
    deadline = time.monotonic() + 2
    while api.open_watches() and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert api.open_watches() == 0
    for abrupt, outcome in ((False, "ended"), (True, "ProtocolError")):
        ended: list[str] = []

        def hold_a_watch(ended: list[str] = ended) -> None:
            try:
                for _ in watch.Watch().stream(core.list_namespaced_pod, ns, timeout_seconds=30):
                    pass
                ended.append("ended")
            except Exception as error:  # the connection cut mid-stream
                ended.append(type(error).__name__)

        holder = threading.Thread(target=hold_a_watch, daemon=True)
        holder.start()
        while not api.open_watches():
            threading.Event().wait(0.01)
        assert api.drop_watches(abrupt=abrupt) == 1
        holder.join(5)
        assert ended == [outcome]


async def test_on_this_event_loop_apply_wakes_a_watch(tmp_path: Path, watchdog: None) -> None:
    crd = tmp_path / "widgets.yaml"
    crd.write_text(WIDGETS_CRD)
    async with fake_api_server(tmp_path / "server", crds=[crd]) as server:
        kube = config.new_client_from_config(str(server.kubeconfig(tmp_path / "kubeconfig")))
        custom = client.CustomObjectsApi(kube)
        args = (custom.list_namespaced_custom_object, GROUP, VERSION, "default", PLURAL)
        version = (await asyncio.to_thread(*args))["metadata"]["resourceVersion"]
        watching = asyncio.create_task(
            asyncio.to_thread(stream, *args, count=1, resource_version=version)
        )
        # The watch is opened by a thread of this process: nothing to await but its request.
        while not server.open_watches():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        server.apply(widget("w", "default"))  # from the server's own loop thread
        events = await watching
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "w")]


def test_patches_merge_as_the_server_merges_them(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    core = client.CoreV1Api(kube)
    api.apply(pod("web", ns))
    # The client sends a dict patch of a built-in kind as a strategic merge patch: lists
    # with a merge key (a pod's conditions, by type) merge item by item.
    for condition in ("PodScheduled", "Ready"):
        core.patch_namespaced_pod_status(
            "web", ns, {"status": {"conditions": [{"type": condition, "status": "True"}]}}
        )
    patched = core.patch_namespaced_pod_status(
        "web", ns, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    )
    assert [(c.type, c.status) for c in patched.status.conditions] == [
        ("PodScheduled", "True"),
        ("Ready", "False"),
    ]

    custom = client.CustomObjectsApi(kube)
    api.apply(widget("w", ns, "{size: 1}"))
    patch = [{"op": "replace", "path": "/spec/size", "value": 4}]
    patched_widget = custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "w", patch, _content_type="application/json-patch+json"
    )
    assert patched_widget["spec"]["size"] == 4
    # kube-apiserver has no strategic merge for custom objects.
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/w"
    data = json.dumps({"spec": {"size": 5}}).encode()
    headers = {
        "Authorization": f"Bearer {api.token}",
        "Content-Type": "application/strategic-merge-patch+json",
    }
    request = urllib.request.Request(api.url + path, data, headers, method="PATCH")
    with pytest.raises(urllib.error.HTTPError) as unsupported:
        urllib.request.urlopen(request, context=ssl.create_default_context(cafile=api.ca_file))
    assert unsupported.value.code == 415

    api.apply(widget("x", ns, "{size: 1}"))
    custom.delete_collection_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
    assert custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"] == []


def test_the_shipped_examples_apply_as_kubectl_would(tmp_path: Path) -> None:
    """deploy/examples, as users apply them, into a cluster with Outrider installed: every
    object is accepted as written, Outrider's CRDs and Gateway API's served."""
    examples = Path(__file__).parents[2] / "deploy" / "examples"
    with fake_api_server_thread(tmp_path) as api:
        api.apply(namespace("outrider-system"))
        kinds = [
            obj["kind"]
            # The namespace and its apps first, as the README's order has it.
            for name in sorted((p.name for p in examples.glob("*.yaml")), key="shop.yaml".__ne__)
            for obj in api.apply((examples / name).read_text())
        ]
    expected = {
        "Deployment",
        "Service",
        "AuthorizationPolicy",
        "PeerAuthentication",
        "HTTPRoute",
        "TrafficPolicy",
    }
    assert expected <= set(kinds)


def test_the_service_proxy_reaches_a_ready_endpoint_or_answers_503(
    api: FakeApiServer, kube: client.ApiClient, ns: str
) -> None:
    """As `kubectl get --raw /api/v1/namespaces/NS/services/NAME:PORT/proxy/PATH`."""

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = f"you asked for {self.path}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    core = client.CoreV1Api(kube)

    def get(target: str, path: str) -> tuple[int, str]:
        try:
            answer = core.connect_get_namespaced_service_proxy_with_path(
                target, ns, path, _preload_content=False
            )
        except ApiException as error:
            return error.status, error_body(error)["message"]
        return answer.status, answer.data.decode()

    try:
        api.apply(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: {ns}}}\n"
            "spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n"
        )
        assert get("web:http", "healthz") == (503, 'no endpoints available for service "web"')
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-1",
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": upstream.server_address[1]}],
            "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": True}}],
        }
        api.apply(yaml.safe_dump(slice_))
        assert get("web:http", "healthz") == (200, "you asked for /healthz\n")
        assert get("http:web:80", "a/b") == (200, "you asked for /a/b\n")
        slice_["endpoints"][0]["conditions"]["ready"] = False
        api.apply(yaml.safe_dump(slice_))
        assert get("web:http", "healthz")[0] == 503
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_mutating_webhook_configurations_are_stored_cluster_wide(
    api: FakeApiServer, kube: client.ApiClient
) -> None:
    webhook = (Path(__file__).parents[2] / "deploy" / "base" / "webhook.yaml").read_text()
    api.apply(webhook)
    admission = client.AdmissionregistrationV1Api(kube)
    stored = admission.read_mutating_webhook_configuration("outrider-injector")
    assert [hook.name for hook in stored.webhooks] == [
        "inject.outrider.io",
        "inject-without-capture.outrider.io",
    ]
    api.delete(
        "admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration", "", "outrider-injector"
    )
