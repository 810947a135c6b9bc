"""`outrider policy lint` and `outrider policy check` as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"

POLICY = """\
policies:
  - name: frontend-reads-api
    action: ALLOW
    rules:
      - name: get-api
        from: {principals: ["spiffe://example.org/ns/shop/sa/frontend"]}
        to: {ports: [8080], methods: [GET], paths: ["/api/*"]}
  - name: no-admin
    action: DENY
    rules:
      - to: {ports: [8080], paths: ["/admin*"]}
---
policies:
  - name: watch-exports
    action: AUDIT
    rules:
      - to: {paths: ["/api/export/*"]}
  - name: trial
    action: DENY
    mode: dry-run
    rules:
      - name: no-post
        to: {methods: [POST]}
"""

BROKEN = """\
policies:
  - name: frontend-reads-api
    action: allow
    rules:
      - to:
          paths: [/api/../admin]
          ports: [http]
"""


def outrider(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "outrider", "policy", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def test_lint_accepts_a_valid_file(policy: Path) -> None:
    result = outrider("lint", policy)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"{policy}: 4 policies OK\n",
        "",
    )


def test_lint_prints_every_error_with_line_and_column(policy: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    result = outrider("lint", policy, broken)
    assert result.returncode == 2
    assert result.stdout == f"{policy}: 4 policies OK\n"
    assert result.stderr.splitlines() == [
        f"{broken}:3:13: policies[0].action: 'allow' is not an action;"
        " expected ALLOW, DENY or AUDIT (upper-case: ALLOW)",
        f"{broken}:6:19: policies[0].rules[0].to.paths[0]: '/api/../admin' never matches,"
        " because requests are matched after normalization; expected the normalized form"
        " '/admin'",
        f"{broken}:7:19: policies[0].rules[0].to.ports[0]: 'http' is not a port;"
        " expected an integer from 1 to 65535",
        "outrider: 3 errors in policy files",
    ]


def test_lint_refuses_a_policy_name_used_in_two_files(policy: Path, tmp_path: Path) -> None:
    again = tmp_path / "again.yaml"
    again.write_text("policies:\n  - {name: no-admin, action: DENY, rules: [{}]}\n")
    result = outrider("lint", policy, again)
    assert result.returncode == 2
    assert f"{again}:2:12: name: duplicate policy name 'no-admin' (first at {policy}:8:11)" in (
        result.stderr
    )


def test_check_explains_an_allow(policy: Path) -> None:
    result = outrider(
        "check", "--policy", policy, "--source", FRONTEND, "--method", "GET", "--path", "/api/x"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "allow",
        "policy: frontend-reads-api",
        "rule: get-api",
        "why: ALLOW policy 'frontend-reads-api' rule 'get-api' matched:"
        f" source '{FRONTEND}' matches principals [{FRONTEND}];"
        " port '8080' matches ports [8080]; method 'GET' matches methods [GET];"
        " path '/api/x' matches paths [/api/*]",
    ]


def test_check_decides_on_the_normalized_path_and_says_so(policy: Path) -> None:
    raw = "/api/%2E%2e//admin/users?next=/api#top"
    result = outrider(
        "check", "--policy", policy, "--source", FRONTEND, "--method", "GET", "--path", raw
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "deny",
        f"path: /admin/users (normalized from {raw})",
        "policy: no-admin",
        "rule: rules[0]",
        "why: DENY policy 'no-admin' rule 'rules[0]' matched:"
        " port '8080' matches ports [8080]; path '/admin/users' matches paths [/admin*]",
    ]


def test_check_prints_the_400_for_a_path_the_agent_refuses(policy: Path) -> None:
    result = outrider(
        "check", "--policy", policy, "--source", FRONTEND, "--method", "GET", "--path", "/a%00"
    )
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "deny",
        "status: 400 (refused before any policy)",
        "why: path has an encoded NUL (%00)",
    ]


def test_check_prints_the_400_for_a_header_name_with_an_underscore(policy: Path) -> None:
    result = outrider(
        "check",
        *("--policy", policy, "--source", FRONTEND, "--method", "GET"),
        *("--header", "X_Role=admin"),
    )
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[:2] == ["deny", "status: 400 (refused before any policy)"]
    assert lines[2].startswith("why: header name 'X_Role' has an underscore")


def test_check_shows_what_audit_and_dry_run_policies_recorded(policy: Path) -> None:
    result = outrider(
        "check",
        "--policy",
        policy,
        "--source",
        "spiffe://example.org/ns/lab/sa/tool",
        "--port",
        "9090",
        "--method",
        "POST",
        "--path",
        "/api/export/all",
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[1:] == [
        "policy: default",
        "rule: allow-authenticated",
        "why: no ALLOW policy applies to port 9090, so default_action allow-authenticated"
        " allows authenticated spiffe://example.org/ns/lab/sa/tool",
        "record: audit policy=watch-exports rule=rules[0]",
        "record: dry_run_deny policy=trial rule=no-post",
    ]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--plaintext"], "allow-authenticated denies unauthenticated traffic"),
        (["--source", FRONTEND, "--default-action", "deny"], "default_action deny denies"),
        (
            ["--source", "spiffe://partner.net/ns/a/sa/b", "--trust-domain", "example.org"],
            "its trust domain is not one of the allowed (example.org)",
        ),
    ],
)
def test_check_a_tcp_connection_under_the_default_action(
    policy: Path, args: list[str], why: str
) -> None:
    result = outrider("check", "--policy", policy, "--port", "5432", *args)
    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "deny"
    assert why in result.stdout


def test_check_a_plaintext_caller_on_a_permissive_port_as_the_agent_decides(
    policy: Path, tmp_path: Path
) -> None:
    result = outrider("check", "--policy", policy, "--plaintext", "--permissive", "--port", "5432")
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[:3] == ["allow", "policy: default", "rule: permissive"]
    deny = tmp_path / "deny-plaintext.yaml"
    deny.write_text(
        "policies:\n  - name: no-plaintext\n    action: DENY\n"
        '    rules: [{from: {not_principals: ["*"]}}]\n'
    )
    result = outrider("check", "--policy", deny, "--plaintext", "--permissive", "--port", "5432")
    assert result.returncode == 1
    assert result.stdout.splitlines()[:2] == ["deny", "policy: no-plaintext"]
    refused = outrider("check", "--policy", policy, "--source", FRONTEND, "--permissive")
    assert refused.returncode == 2
    assert "--permissive is about a --plaintext caller" in refused.stderr


def test_check_leaves_out_a_header_the_connection_header_names_as_the_agent_does(
    tmp_path: Path,
) -> None:
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        "policies:\n  - name: tenants\n    action: DENY\n"
        "    rules: [{when: [{header: x-tenant, not_values: [acme]}]}]\n"
    )
    asked = ["check", "--policy", tenants, "--source", FRONTEND, "--method", "GET", "--path", "/"]
    assert outrider(*asked, "--header", "x-tenant=acme").returncode == 0
    dropped = outrider(*asked, "--header", "x-tenant=acme", "--header", "Connection=X-Tenant")
    assert dropped.returncode == 1
    assert dropped.stdout.splitlines()[:2] == ["deny", "policy: tenants"]
    websockets = tmp_path / "websockets.yaml"
    websockets.write_text(
        "policies:\n  - name: no-websockets\n    action: DENY\n"
        "    rules: [{when: [{header: upgrade, values: [websocket]}]}]\n"
    )
    upgrade = ["--header", "Upgrade=websocket", "--header", "Connection=Upgrade"]
    asked[2] = websockets
    denied = outrider(*asked, *upgrade)  # relayed with its Upgrade, as the agent does
    assert denied.stdout.splitlines()[:2] == ["deny", "policy: no-websockets"]


def test_check_an_l4_connection_on_a_port_with_a_path_deny(policy: Path) -> None:
    # As HTTP/2 relayed at L4: its paths are unknown, so the path DENY holds.
    result = outrider("check", "--policy", policy, "--source", FRONTEND, "--port", "8080")
    assert result.returncode == 1
    assert result.stdout.splitlines()[:4] == [
        "deny",
        "policy: no-admin",
        "rule: rules[0]",
        "why: DENY policy 'no-admin' rule 'rules[0]' matched: port '8080' matches ports [8080];"
        " paths cannot be checked on an L4 connection, so a DENY rule assumes it matches",
    ]


def test_check_refuses_a_broken_policy_with_its_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BROKEN)
    result = outrider("check", "--policy", broken, "--source", FRONTEND)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"  {broken}:3:13: policies[0].action:" in result.stderr


def test_check_help_states_the_exit_codes() -> None:
    result = outrider("check", "--help")
    assert result.returncode == 0
    assert "exit 0 for allow, 1 for deny" in " ".join(result.stdout.split())


@pytest.mark.parametrize("port", ["0", "65536", "-1", "http"])
def test_check_refuses_a_port_no_policy_could_name(policy: Path, port: str) -> None:
    result = outrider("check", "--policy", policy, "--source", FRONTEND, "--port", port)
    assert result.returncode == 2
    assert "argument --port:" in result.stderr
    assert "is not a port number (1-65535)" in result.stderr
    assert result.stdout == ""
