"""The Workload API in injected pods: the socket's volume, where the app finds it, who asks.

A pod that asks (outrider.io/workload-api: "enabled", or injector.yaml
`workload_api: {enabled: true}` for every pod) gets a per-pod emptyDir the
agent serves its socket in, mounted read-only in each app container with
SPIFFE_ENDPOINT_SOCKET pointing at it; the agent's bootstrap names the socket.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import WorkloadApiConfig, parse_text
from identity.injected import (
    SPIFFE_ENDPOINT_SOCKET,
    WORKLOAD_API_ANNOTATION,
    WORKLOAD_API_DIR,
    WORKLOAD_API_SOCKET,
    WORKLOAD_API_VOLUME,
)
from injector.core import Settings, apply_patch, mutate
from injector.core.settings import WorkloadApiSettings
from injector.core.sidecar import CONFIG_ENV, MAX_ENV_BYTES
from tests.k8s import to_model
from tests.unit.test_injector_core import agent_of, annotated, injected, pod

SETTINGS = Settings()
ON_BY_DEFAULT = replace(SETTINGS, workload_api=WorkloadApiSettings(enabled=True))
NOT_NATIVE = replace(SETTINGS, native_sidecar=False)
ASKS = {WORKLOAD_API_ANNOTATION: "enabled"}
APP_MOUNT = {"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR, "readOnly": True}
APP_ENV = {"name": "SPIFFE_ENDPOINT_SOCKET", "value": SPIFFE_ENDPOINT_SOCKET}


def config_of(patched: dict[str, Any]) -> dict[str, Any]:
    """The agent's config as JSON, after checking the agent itself reads the socket there."""
    raw = next(e["value"] for e in agent_of(patched)["env"] if e["name"] == CONFIG_ENV)
    read = parse_text(raw, source=CONFIG_ENV).workload_api
    config: dict[str, Any] = json.loads(raw)
    assert read == (
        WorkloadApiConfig(Path(WORKLOAD_API_SOCKET)) if "workload_api" in config else None
    )
    return config


def served(patched: dict[str, Any]) -> bool:
    """The pod has the socket's volume, the agent serves it, and every app container finds it."""
    volumes = [v for v in patched["spec"].get("volumes", []) if v["name"] == WORKLOAD_API_VOLUME]
    agent = agent_of(patched)
    mounts = [m for m in agent["volumeMounts"] if m["name"] == WORKLOAD_API_VOLUME]
    config = config_of(patched).get("workload_api")
    apps = [c for c in patched["spec"]["containers"] if c is not agent]
    found = [APP_MOUNT in c.get("volumeMounts", []) and APP_ENV in c.get("env", []) for c in apps]
    assert len({bool(volumes), bool(mounts), bool(config), *found}) == 1, "served in part"
    return bool(volumes)


def test_a_pod_that_asks_gets_the_socket_in_the_agent_and_every_app_container() -> None:
    source = annotated(
        ASKS,
        initContainers=[{"name": "setup", "image": "setup:1"}],
        containers=[
            {"name": "app", "image": "app:1"},
            {"name": "helper", "image": "helper:1", "env": [{"name": "A", "value": "1"}]},
        ],
    )
    patched = injected(source)
    assert served(patched)
    [volume] = [v for v in patched["spec"]["volumes"] if v["name"] == WORKLOAD_API_VOLUME]
    # One per pod, gone with it, in memory: the socket reaches this pod's containers only.
    assert volume == {
        "name": WORKLOAD_API_VOLUME,
        "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"},
    }
    # The agent makes the socket; the apps may connect to it but not put another in its place.
    assert {"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR} in agent_of(patched)[
        "volumeMounts"
    ]
    assert config_of(patched)["workload_api"] == {"socket": WORKLOAD_API_SOCKET}
    assert WORKLOAD_API_SOCKET == WORKLOAD_API_DIR + "/socket"
    assert SPIFFE_ENDPOINT_SOCKET == "unix://" + WORKLOAD_API_SOCKET
    app, helper = patched["spec"]["containers"]
    assert app["volumeMounts"] == [APP_MOUNT] and app["env"] == [APP_ENV]
    assert helper["env"] == [{"name": "A", "value": "1"}, APP_ENV]  # theirs kept, ours after
    setup = next(c for c in patched["spec"]["initContainers"] if c["name"] == "setup")
    assert setup == {"name": "setup", "image": "setup:1"}  # init containers: not theirs


def test_a_pod_that_does_not_ask_gets_nothing_of_it() -> None:
    patched = injected(pod())
    assert not served(patched)
    assert "workload_api" not in config_of(patched)
    assert patched["spec"]["containers"] == [{"name": "app", "image": "app:1"}]


@pytest.mark.parametrize(
    ("settings", "value", "wanted"),
    [
        (SETTINGS, "enabled", True),
        (SETTINGS, "disabled", False),
        (SETTINGS, None, False),
        (ON_BY_DEFAULT, None, True),
        (ON_BY_DEFAULT, "disabled", False),  # a pod opts out of the operator's default
        (ON_BY_DEFAULT, "enabled", True),
    ],
)
def test_the_annotation_decides_and_the_setting_is_the_default(
    settings: Settings, value: str | None, wanted: bool
) -> None:
    source = annotated({} if value is None else {WORKLOAD_API_ANNOTATION: value})
    mutation = mutate(source, "shop", settings)
    assert mutation.warnings == ()
    assert served(jsonpatch.apply_patch(source, list(mutation.patch))) is wanted


@pytest.mark.parametrize("value", ["true", "yes", "Enabled", "enabled\n", "", 1, True])
@pytest.mark.parametrize("settings", [SETTINGS, ON_BY_DEFAULT], ids=["off", "on"])
def test_any_other_value_keeps_the_default_and_warns(value: object, settings: Settings) -> None:
    source = annotated({WORKLOAD_API_ANNOTATION: value})
    mutation = mutate(source, "shop", settings)
    assert served(jsonpatch.apply_patch(source, list(mutation.patch))) is (
        settings.workload_api.enabled
    )
    default = "enabled" if settings.workload_api.enabled else "disabled"
    [warning] = mutation.warnings
    assert warning.startswith(f"outrider: {WORKLOAD_API_ANNOTATION}: ")
    expected = 'must be "enabled" or "disabled"' if isinstance(value, str) else "must be a string"
    assert f"{expected}; using the default ({default})" in warning


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=100))
def test_no_annotation_text_does_more_than_switch_it(value: str) -> None:
    source = annotated({WORKLOAD_API_ANNOTATION: value})
    mutation = mutate(source, "shop", SETTINGS)
    patched = jsonpatch.apply_patch(source, list(mutation.patch))
    to_model(patched)
    assert served(patched) is (value == "enabled")
    if value not in ("enabled", "disabled"):  # never echoed: the same words for any value
        assert (
            mutation.warnings
            == mutate(annotated({WORKLOAD_API_ANNOTATION: "?"}), "shop", SETTINGS).warnings
        )


def test_an_spiffe_endpoint_socket_of_the_apps_own_is_kept_with_a_warning() -> None:
    own = {"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///run/spire/agent.sock"}
    source = annotated(
        ASKS,
        containers=[
            {"name": "app", "image": "app:1", "env": [own]},
            {"name": "same", "image": "app:1", "env": [APP_ENV]},  # ours already: quietly
        ],
    )
    mutation = mutate(source, "shop", SETTINGS)
    patched = jsonpatch.apply_patch(source, list(mutation.patch))
    app, same = patched["spec"]["containers"]
    assert app["env"] == [own] and same["env"] == [APP_ENV]
    assert APP_MOUNT in app["volumeMounts"]  # the socket is there if it wants it
    assert mutation.warnings == (
        "outrider: container app sets SPIFFE_ENDPOINT_SOCKET itself: kept; the agent's "
        f"Workload API is {SPIFFE_ENDPOINT_SOCKET}",
    )


@pytest.mark.parametrize(
    "path",
    [
        WORKLOAD_API_DIR,
        WORKLOAD_API_DIR + "/",
        WORKLOAD_API_SOCKET,
        "/var/run/outrider/workload/../workload",
    ],
)
def test_a_volume_of_the_apps_own_where_the_socket_goes_is_kept_with_a_warning(
    path: str,
) -> None:
    # The kubelet refuses two mounts at one path, and one beneath would hide the socket.
    theirs = {"name": "spire", "mountPath": path}
    source = annotated(
        ASKS,
        containers=[{"name": "app", "image": "app:1", "volumeMounts": [theirs]}],
        volumes=[{"name": "spire", "emptyDir": {}}],
    )
    mutation = mutate(source, "shop", SETTINGS)
    [app] = jsonpatch.apply_patch(source, list(mutation.patch))["spec"]["containers"]
    assert app == {"name": "app", "image": "app:1", "volumeMounts": [theirs]}
    assert mutation.warnings == (
        f"outrider: container app has a volume of its own at {WORKLOAD_API_DIR}: "
        "it gets no Workload API socket",
    )


def test_a_volume_above_the_sockets_directory_is_no_conflict() -> None:
    theirs = {"name": "run", "mountPath": "/var/run"}
    source = annotated(
        ASKS,
        containers=[{"name": "app", "image": "app:1", "volumeMounts": [theirs]}],
        volumes=[{"name": "run", "emptyDir": {}}],
    )
    mutation = mutate(source, "shop", SETTINGS)
    [app] = jsonpatch.apply_patch(source, list(mutation.patch))["spec"]["containers"]
    assert app["volumeMounts"] == [theirs, APP_MOUNT] and mutation.warnings == ()


def test_a_pod_with_a_volume_of_that_name_is_not_injected() -> None:
    for asked in ({}, ASKS):
        source = annotated(asked, volumes=[{"name": WORKLOAD_API_VOLUME, "emptyDir": {}}])
        mutation = mutate(source, "shop", SETTINGS)
        assert (mutation.reason, mutation.patch) == ("name_conflict", ())
        assert "outrider-workload-api" in mutation.warnings[0]


def test_without_native_sidecars_the_agent_container_serves_and_the_apps_connect() -> None:
    source = annotated(ASKS, containers=[{"name": "app", "image": "app:1"}, {"name": "b"}])
    patched = injected(source, NOT_NATIVE)
    agent, app, b = patched["spec"]["containers"]
    assert served(patched)
    assert APP_MOUNT not in agent["volumeMounts"]  # the agent's own is writable
    assert (app["volumeMounts"], b["volumeMounts"]) == ([APP_MOUNT], [APP_MOUNT])


@pytest.mark.parametrize("settings", [SETTINGS, NOT_NATIVE, SETTINGS.without_capture()])
def test_injecting_the_result_again_changes_nothing(settings: Settings) -> None:
    once = injected(annotated(ASKS), settings)
    again = mutate(once, "shop", settings)
    assert (again.reason, again.patch, again.warnings) == ("already_injected", (), ())
    # And when the operator's default changed since, the pod stays as it was made.
    flipped = replace(settings, workload_api=WorkloadApiSettings(enabled=True))
    assert mutate(injected(pod(), settings), "shop", flipped).patch == ()


@pytest.mark.parametrize("settings", [SETTINGS, NOT_NATIVE, SETTINGS.without_capture()])
def test_a_container_added_after_injection_gets_the_socket_on_reinvocation(
    settings: Settings,
) -> None:
    once = injected(annotated(ASKS), settings)
    # Another webhook adds a container; the API server calls us again (IfNeeded).
    once["spec"]["containers"].append({"name": "late", "image": "late:1", "env": []})
    again = mutate(once, "shop", settings)
    assert (again.reason, again.warnings) == ("already_injected", ())
    patched = jsonpatch.apply_patch(once, list(again.patch))
    to_model(patched)
    assert served(patched)
    late = patched["spec"]["containers"][-1]
    assert (late["volumeMounts"], late["env"]) == ([APP_MOUNT], [APP_ENV])
    assert mutate(patched, "shop", settings).patch == ()
    # A pod injected without it gets none on reinvocation.
    plain = injected(pod(), settings)
    plain["spec"]["containers"].append({"name": "late", "image": "late:1"})
    assert mutate(plain, "shop", settings).patch == ()


@pytest.mark.parametrize("settings", [SETTINGS, NOT_NATIVE])
def test_our_patch_applier_agrees_with_jsonpatch(settings: Settings) -> None:
    source = annotated(
        ASKS,
        containers=[
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1", "volumeMounts": [{"name": "v", "mountPath": "/v"}]},
        ],
        volumes=[{"name": "v", "emptyDir": {}}],
    )
    patch = mutate(source, "shop", settings).patch
    ours = copy.deepcopy(source)
    apply_patch(ours, patch)
    assert ours == jsonpatch.apply_patch(source, list(patch))
    assert served(ours)


def test_the_agents_config_fits_one_environment_variable_with_the_socket_too() -> None:
    """The socket's key takes room in the agent's config variable (at most 128 KiB, or
    the agent never starts): probes that would push it past are left as they are."""
    limit = MAX_ENV_BYTES - len(CONFIG_ENV + "=\0")
    fitted = set()
    for size in range(1400, 1600):  # around the budget's last byte, one by one
        full = [{"name": f"X{i}", "value": "v" * 4000} for i in range(32)]  # 4 KiB at most
        headers = [*full, {"name": "Y", "value": "v" * size}]
        probe = {"httpGet": {"path": "/", "port": 8080, "httpHeaders": headers}}
        source = annotated(ASKS, containers=[{"name": "app", "readinessProbe": probe}])
        patched = jsonpatch.apply_patch(source, list(mutate(source, "shop", SETTINGS).patch))
        raw = next(e["value"] for e in agent_of(patched)["env"] if e["name"] == CONFIG_ENV)
        assert len(raw) <= limit
        assert served(patched)
        fitted.add(patched["spec"]["containers"][0]["readinessProbe"] != probe)
    assert fitted == {True, False}  # the range held the edge
