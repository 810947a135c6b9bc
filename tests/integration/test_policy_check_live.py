"""`outrider policy check --live`: the decision for a running pod, from the control plane's view.

The policies come from /debug/config of a real control plane reading a fake
API server, and are decided by the same engine as files are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.apiserver import FakeApiServer, fake_api_server
from tests.control_process import (
    ALLOW_FRONTEND,
    DEFAULT_DENY,
    NAMESPACES,
    PERMISSIVE,
    ControlProcess,
    Ran,
    eventually,
    outrider,
    pod,
)

FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
#: Port 8080 of the web pods speaks HTTP: the policies' methods and paths apply there.
WEB_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
"""


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    async with fake_api_server(tmp_path / "api") as server:
        server.apply(NAMESPACES)
        server.apply(pod("shop", "web", "web"))
        server.apply(WEB_SERVICE)
        server.apply(DEFAULT_DENY)
        yield server


async def check(*args: str) -> Ran:
    return await outrider("policy", "check", *args)


def live(control: ControlProcess, *args: str) -> tuple[str, ...]:
    return ("--live", "--control", control.debug_url, "--pod", "shop/web", *args)


async def test_a_live_pod_is_decided_by_the_policies_the_control_plane_gives_it(
    control: ControlProcess, api: FakeApiServer
) -> None:
    request = ("--source", FRONTEND, "--method", "GET", "--path", "/api/items")
    denied = await check(*live(control, *request))
    assert denied.returncode == 1, denied.stderr
    assert denied.stdout.splitlines()[0] == "deny"
    assert "shop/default-deny: has no rules, so it allows nothing" in denied.stdout

    api.apply(ALLOW_FRONTEND)

    async def allowed() -> bool:
        return (await check(*live(control, *request))).returncode == 0

    await eventually(allowed, timeout=10)
    answer = await check(*live(control, *request))
    assert answer.stdout.splitlines()[:2] == ["allow", "policy: shop/frontend-reads-api"]
    other = await check(*live(control, "--source", FRONTEND, "--method", "POST", "--path", "/"))
    assert other.returncode == 1


async def test_a_pod_the_control_plane_does_not_know_is_an_error_that_says_so(
    control: ControlProcess,
) -> None:
    answer = await check(
        "--live", "--control", control.debug_url, "--pod", "shop/nobody", "--source", FRONTEND
    )
    assert answer.returncode == 1
    assert "404 no pod shop/nobody in the mesh" in answer.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--source", FRONTEND), "give --policy FILE, or --live with --pod and --control"),
        (("--live", "--source", FRONTEND), "--live needs --pod NAMESPACE/NAME"),
        (
            ("--live", "--pod", "web", "--source", FRONTEND),
            "--live needs --pod NAMESPACE/NAME",
        ),
    ],
)
async def test_live_mode_says_what_it_needs(args: tuple[str, ...], message: str) -> None:
    answer = await check(*args)
    assert answer.returncode == 2
    assert message in answer.stderr


async def test_a_plaintext_caller_is_decided_by_the_pods_own_mtls_mode(
    control: ControlProcess, api: FakeApiServer
) -> None:
    api.delete("security.outrider.io/v1alpha1", "AuthorizationPolicy", "shop", "default-deny")
    api.apply(pod("shop", "legacy", "legacy", captured=True))
    asked = ("--live", "--control", control.debug_url, "--pod", "shop/legacy", "--plaintext")

    async def strict() -> bool:  # no ALLOW policy: the default action decides
        said = (await check(*asked, "--port", "9000")).stdout
        return "allow-authenticated denies unauthenticated traffic" in said

    await eventually(strict, timeout=10)
    api.apply(PERMISSIVE)

    async def permissive() -> bool:
        return (await check(*asked, "--port", "9000")).returncode == 0

    await eventually(permissive, timeout=10)
    passed = await check(*asked, "--port", "9000")
    assert passed.stdout.splitlines()[:3] == ["allow", "policy: default", "rule: permissive"]
