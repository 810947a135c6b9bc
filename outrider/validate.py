"""Configs and policies checked without running anything: `outrider agent|ca|control|
injector validate --config` and `policy lint --agent-config`.

Each reads its file with the same function its server starts with, so "valid" here
means the server would start with it (as far as the file can tell: a port in use or
an unreachable CA shows only at start). Errors come back as raised, every one with
its key path; the command prints them and exits 2.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.config import AgentConfig


def agent(path: Path) -> str:
    """agent.yaml as `agent run` reads it, its policy files and inline policies included
    (names unique, no HTTP field on a TCP port). ConfigError or PolicyError."""
    from agent import app as agent_app
    from agent import config as agent_config

    config = agent_config.read(path).parse()
    policies = agent_app.load_policies(config)
    return (
        f"{path}: valid agent config ({config.identity.spiffe_id}, {len(config.inbound)}"
        f" inbound, {len(config.outbound)} outbound, {len(policies.policies)} policies;"
        f" {_trust_bundle(path, config)})"
    )


def _trust_bundle(path: Path, config: AgentConfig) -> str:
    """The bundle file as the agent reads it before its first SVID, if it is here (it is
    often a ConfigMap mounted only in the pod); ConfigError if it is no trust bundle."""
    from identity import BundleError, TrustBundle
    from identity.configfile import ConfigError

    bundle_file = config.ca.bundle_file
    if not bundle_file.exists():
        return f"{bundle_file} is not here: read at start"
    try:
        bundle = TrustBundle.from_pem(
            config.identity.spiffe_id.trust_domain, bundle_file.read_bytes()
        )
    except (OSError, BundleError) as exc:
        why = f"ca.bundle_file: {bundle_file} is not a trust bundle ({exc})"
        raise ConfigError(str(path), [why]) from None
    return f"{len(bundle.roots)} root(s) in {bundle_file}"


def ca(path: Path, dev: bool = False) -> str:
    from ca import config as ca_config

    config = ca_config.load(path, dev=dev)  # `dev`: as `ca serve --dev` reads it
    domain = config.trust_domain or "from its CA directory"
    mode = " for --dev" if dev else ""
    jwks = config.kubernetes.jwks_file if config.kubernetes else None
    missing = f"; {jwks} is not here: {ca_config.JWKS_READ}" if jwks and not jwks.exists() else ""
    return f"{path}: valid CA config{mode} (trust domain {domain}){missing}"


def control(path: Path, kubeconfig: Path | None = None) -> str:
    from control import config as control_config

    config = control_config.load(path, kubeconfig=kubeconfig)
    return f"{path}: valid control plane config (trust domain {config.trust_domain})"


def injector(path: Path) -> str:
    from injector import config as injector_config

    injector_config.load(path, require_tls=True)  # as `injector serve` reads it
    return f"{path}: valid injector config"


def policies_for_agent(files: list[Path], agent_config: Path) -> int:
    """The policy files as this agent would load them beside its own policies: every
    PolicyError the agent would refuse them with (an HTTP field on one of its TCP ports,
    a name its config already uses). A file its config already names is the same file,
    loaded once: linting the agent's own policy file is not a clash with itself.
    Returns how many policies that makes."""
    from agent import app as agent_app
    from agent import config as agent_config_module

    config = agent_config_module.read(agent_config).parse()
    loaded = {path.resolve() for path in config.policy.files}
    added = tuple(path for path in files if path.resolve() not in loaded)
    given = replace(config, policy=replace(config.policy, files=(*config.policy.files, *added)))
    return len(agent_app.load_policies(given).policies)


def agent_config_errors(path: Path) -> list[str]:
    """What is wrong with agent.yaml itself (`FILE: key: problem`), for `policy lint` to
    tell beside its policies' errors when it cannot go on to load them together."""
    from agent import config as agent_config_module
    from identity.configfile import ConfigError

    try:
        agent_config_module.read(path).parse()
    except ConfigError as exc:
        return [f"{exc.source}: {error}" for error in exc.errors]
    return []
