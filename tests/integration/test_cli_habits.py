"""What a user expects of any CLI: --version, -o json|yaml, shell completion, a way to
validate a config without running it, and a lint that knows what the agent refuses."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from identity.build import VERSION
from tests.interop import ensure_command
from tests.support import run_outrider as outrider

FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
#: An agent with a TCP inbound port (the default protocol) and an HTTP one.
AGENT = {
    "identity": {"spiffe_id": "spiffe://example.org/ns/shop/sa/db", "token_file": "token"},
    "ca": {"address": "outrider-ca.outrider-system.svc:8443", "bundle_file": "bundle.pem"},
    "inbound": [
        {"listen": "0.0.0.0:15432", "app": "127.0.0.1:5432"},
        {"listen": "0.0.0.0:15443", "app": "127.0.0.1:8080", "protocol": "http"},
    ],
}
#: Lints clean on its own; the agent above refuses it (paths on its TCP port 5432).
HTTP_ON_TCP = """\
policies:
  - name: reads-only
    action: ALLOW
    rules:
      - name: get
        to: {ports: [5432], methods: [GET]}
"""


def test_version_prints_the_build_version() -> None:
    ran = outrider("--version")
    assert ran.returncode == 0
    assert ran.stdout == f"outrider {VERSION}\n"


def _complete(script: Path, line: str) -> list[str]:
    """What bash offers for TAB at the end of `line`, with the script loaded."""
    words = line.split(" ")
    program = f"""
source {script}
COMP_WORDS=({" ".join(repr(w) for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE={line!r}
COMP_POINT=${{#COMP_LINE}}
_shtab_outrider
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    ran = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == ""
    return sorted(set(ran.stdout.split()))


@pytest.fixture(scope="module")
def bash_completion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ran = outrider("completion", "bash")
    assert ran.returncode == 0, ran.stderr
    script = tmp_path_factory.mktemp("completion") / "outrider.bash"
    script.write_text(ran.stdout)
    return script


def test_bash_completion_loads_and_completes_subcommands(bash_completion: Path) -> None:
    assert "proxy-status" in _complete(bash_completion, "outrider pro")
    ca_commands = ["dev-token", "init", "mint", "serve", "validate"]
    assert _complete(bash_completion, "outrider ca ") == ca_commands
    assert _complete(bash_completion, "outrider check -o ") == ["json", "text", "yaml"]
    assert "--agent-config" in _complete(bash_completion, "outrider policy lint --a")


def test_zsh_completion_is_a_zsh_script_defining_the_completer(tmp_path: Path) -> None:
    zsh = ensure_command("zsh", "zsh")
    ran = outrider("completion", "zsh")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("#compdef outrider")
    script = tmp_path / "_outrider"
    script.write_text(ran.stdout)
    checked = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert "proxy-status" in ran.stdout and "validate" in ran.stdout


def _ca_init(directory: Path) -> None:
    ran = outrider("ca", "init", "--trust-domain", "example.org", "--dir", directory)
    assert ran.returncode == 0, ran.stderr


def test_ca_mint_prints_json_and_yaml_with_the_same_facts(tmp_path: Path) -> None:
    _ca_init(tmp_path)
    minted = {}
    for fmt in ("json", "yaml"):
        mint = ("ca", "mint", "--dir", tmp_path, "--spiffe-id", FRONTEND, "--ttl", "1h30m")
        ran = outrider(*mint, "--out", tmp_path / fmt, "-o", fmt)
        assert ran.returncode == 0, ran.stderr
        minted[fmt] = json.loads(ran.stdout) if fmt == "json" else yaml.safe_load(ran.stdout)
        assert Path(minted[fmt]["svid"]).exists() and Path(minted[fmt]["key"]).exists()
    assert minted["json"]["spiffe_id"] == minted["yaml"]["spiffe_id"] == FRONTEND
    assert set(minted["json"]) == {"spiffe_id", "not_after", "svid", "key", "bundle"}


def test_policy_check_prints_its_decision_as_json_and_keeps_its_exit_code(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(HTTP_ON_TCP.replace("5432", "8080"))
    base = ("policy", "check", "--policy", policy, "--port", "8080", "-o", "json")
    allowed = outrider(*base, "--source", FRONTEND, "--method", "GET", "--path", "/a/../b")
    assert allowed.returncode == 0, allowed.stderr
    shown = json.loads(allowed.stdout)
    assert shown["decision"] == "allow" and shown["policy"] == "reads-only"
    assert shown["path"] == "/b" and shown["normalized_from"] == "/a/../b"
    denied = outrider(*base, "--source", FRONTEND, "--method", "POST")
    assert denied.returncode == 1
    assert json.loads(denied.stdout)["decision"] == "deny"
    refused = outrider(*base, "--plaintext", "--method", "GET", "--header", "x_a=1")
    assert refused.returncode == 1
    assert json.loads(refused.stdout) == {
        "decision": "deny",
        "status": 400,
        "why": json.loads(refused.stdout)["why"],
    }


@pytest.fixture
def agent_config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(AGENT))
    return path


def test_policy_lint_with_the_agent_config_refuses_what_the_agent_would(
    tmp_path: Path, agent_config: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(HTTP_ON_TCP)
    assert outrider("policy", "lint", policy).returncode == 0  # alone, it cannot tell
    ran = outrider("policy", "lint", policy, "--agent-config", agent_config)
    assert ran.returncode == 2
    assert "policy 'reads-only' rule 'get' uses methods but applies to TCP port 5432" in ran.stderr
    assert "set `protocol: http` on that inbound port" in ran.stderr
    policy.write_text(HTTP_ON_TCP.replace("5432", "8080"))
    ran = outrider("policy", "lint", policy, "--agent-config", agent_config)
    assert ran.returncode == 0, ran.stderr
    assert f"{agent_config}: the agent would load 1 policies OK" in ran.stdout


def test_policy_lint_tells_a_bad_agent_config_with_the_policies_errors(tmp_path: Path) -> None:
    # The agent config was read only when the policies had no error: a wrong path or key
    # in it went untold, and the next run failed on it.
    policy = tmp_path / "policy.yaml"
    policy.write_text("policies:\n- name: p\n")
    missing = tmp_path / "absent.yaml"
    ran = outrider("policy", "lint", policy, "--agent-config", missing)
    assert ran.returncode == 2
    assert "policies[0]: missing key 'action'" in ran.stderr
    assert f"{missing}: cannot read" in ran.stderr


def test_agent_validate_loads_the_config_and_its_policies_without_running(
    tmp_path: Path, agent_config: Path
) -> None:
    ran = outrider("agent", "validate", "--config", agent_config)
    assert ran.returncode == 0, ran.stderr
    assert "valid agent config (spiffe://example.org/ns/shop/sa/db, 2 inbound" in ran.stdout
    policy = tmp_path / "policy.yaml"
    policy.write_text(HTTP_ON_TCP)
    with_policy = {**AGENT, "policy": {"files": [str(policy)]}}
    agent_config.write_text(yaml.safe_dump(with_policy))
    ran = outrider("agent", "validate", "--config", agent_config)
    assert ran.returncode == 2
    assert "invalid policy:" in ran.stderr and "TCP port 5432" in ran.stderr


def test_agent_validate_reads_the_bundle_file_as_the_agent_would_at_start(
    tmp_path: Path, agent_config: Path
) -> None:
    """Not here (a ConfigMap mounted in the pod): said, and valid. Here: a trust bundle, or
    the error the agent would give before asking for its first SVID."""
    ran = outrider("agent", "validate", "--config", agent_config)
    assert ran.returncode == 0 and "bundle.pem is not here: read at start" in ran.stdout
    _ca_init(tmp_path / "ca")
    root = (tmp_path / "ca" / "bundle.pem").read_bytes()
    (tmp_path / "bundle.pem").write_bytes(root)
    ran = outrider("agent", "validate", "--config", agent_config)
    assert ran.returncode == 0 and "1 root(s) in" in ran.stdout, ran.stderr
    (tmp_path / "bundle.pem").write_bytes(
        root + (tmp_path / "ca" / "intermediate.key").read_bytes()
    )
    ran = outrider("agent", "validate", "--config", agent_config)
    assert ran.returncode == 2
    assert "ca.bundle_file:" in ran.stderr and "contains a private key" in ran.stderr


def test_validate_lists_every_error_of_each_components_config(tmp_path: Path) -> None:
    bad = {
        "agent": "identity: {spiffe_id: nope}\nca: {timeout: soon}\n",
        "ca": "trust_domain: Bad_Domain\nissuance: {max_ttl: soon}\n",
        "injector": "listen: nowhere\n",
        "control": "trust_domain: example.org\nlisten: nowhere\n",
    }
    for component, text in bad.items():
        config = tmp_path / f"{component}.yaml"
        config.write_text(text)
        ran = outrider(component, "validate", "--config", config)
        assert ran.returncode == 2, (component, ran.stdout, ran.stderr)
        assert ran.stderr.startswith(f"outrider: invalid config {config}:"), ran.stderr
        assert len(ran.stderr.splitlines()) >= 3, ran.stderr  # more than one error, each told


def test_ca_validate_says_a_jwks_file_that_is_not_there(tmp_path: Path) -> None:
    """Valid (a ConfigMap may be mounted only in the pod), but every token would be
    refused jwks_unavailable until it is there: a new user's CA said "valid" and then
    refused every agent."""
    _ca_init(tmp_path)
    config = tmp_path / "ca.yaml"
    config.write_text(
        f"trust_domain: example.org\nsigner: {{kind: local, dir: {tmp_path}}}\n"
        "authn: {kubernetes: {issuer: https://kubernetes.default.svc, jwks_file: jwks.json}}\n"
    )
    ran = outrider("ca", "validate", "--config", config)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == (
        f"{config}: valid CA config (trust domain example.org); {tmp_path / 'jwks.json'} is"
        " not here: read at every call; until it is, every token is refused jwks_unavailable\n"
    )


def test_ca_validate_accepts_a_config_ca_serve_would_start_with(tmp_path: Path) -> None:
    _ca_init(tmp_path)
    config = tmp_path / "ca.yaml"
    config.write_text(
        f"trust_domain: example.org\nsigner: {{kind: local, dir: {tmp_path}}}\n"
        "authn: {kubernetes: {issuer: https://kubernetes.default.svc, "
        "jwks_url: https://kubernetes.default.svc/openid/v1/jwks}}\n"
    )
    ran = outrider("ca", "validate", "--config", config)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == f"{config}: valid CA config (trust domain example.org)\n"


def test_policy_lint_of_a_file_the_agent_config_already_loads_reads_it_once(
    tmp_path: Path,
) -> None:
    """Linting the agent's own policy file with its config (the natural check before a
    reload) is not a duplicate-name error: the same file is loaded once, as the agent
    loads it, so a real refusal (HTTP fields on its TCP port) is what gets reported."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(HTTP_ON_TCP.replace("5432", "8080"))
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump({**AGENT, "policy": {"files": ["policy.yaml"]}}))
    ran = outrider("policy", "lint", policy, "--agent-config", config)
    assert ran.returncode == 0, ran.stderr
    assert f"{config}: the agent would load 1 policies OK" in ran.stdout
    policy.write_text(HTTP_ON_TCP)
    ran = outrider("policy", "lint", policy, "--agent-config", config)
    assert ran.returncode == 2
    assert "duplicate policy name" not in ran.stderr
    assert "rule 'get' uses methods but applies to TCP port 5432" in ran.stderr


def test_check_without_a_kubeconfig_names_where_it_looked_and_how_to_give_one(
    tmp_path: Path,
) -> None:
    """A laptop with no cluster configured: the error names the file it tried (the
    flag's, $KUBECONFIG's or ~/.kube/config) and says how to point it at one."""
    home = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"HOME": str(tmp_path)}
    ran = outrider("check", env=home)
    assert ran.returncode == 1
    assert f"{tmp_path}/.kube/config" in ran.stderr and "no such file" in ran.stderr
    assert "--kubeconfig FILE" in ran.stderr and "KUBECONFIG" in ran.stderr
    missing = tmp_path / "nowhere.yaml"
    ran = outrider("check", "--kubeconfig", missing)
    assert ran.returncode == 1
    assert f"cannot load the kubeconfig {missing}: no such file" in ran.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    ran = outrider("check", "--kubeconfig", empty, env=home | {"KUBECONFIG": str(missing)})
    assert f"cannot load the kubeconfig {empty}:" in ran.stderr  # the flag wins
    assert "file is empty" in ran.stderr  # the client's reason, kept
