"""Each image installs its optional-dependency group from a lock file, and the agent's
group is what the agent imports.

The lock files (requirements/*.txt, `make lock`) are read, never resolved here: every
requirement pinned and hashed, the groups' pins one version each, and every
requirement pyproject.toml names for a group satisfied by that group's lock. The
agent runs, with every one of its modules imported, where the packages it leaves
out (the Kubernetes client above all: 126 MB of the old 231 MB virtualenv) cannot
be imported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
GROUPS = PYPROJECT["optional-dependencies"]
#: Lock file -> the extra it is compiled from.
LOCKS = {"agent": "agent", "all": "all", "dev": "dev"}
#: What an injected agent must never carry: no API access, no web framework, no Vault.
NOT_IN_THE_AGENT = ("kubernetes", "hvac", "aiohttp", "ruamel.yaml")
#: In the agent image for the OTLP/HTTP span exporter only (the OTLP messages), so never
#: imported until tracing is configured: the agent starts without them.
ONLY_FOR_TRACING = ("opentelemetry",)
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def pins(lock: str) -> dict[str, str]:
    """name -> version of a lock file, checking that each pin carries its hashes."""
    text = (ROOT / "requirements" / f"{lock}.txt").read_text()
    found: dict[str, str] = {}
    for entry in re.split(r"\n(?=\S)", text):
        if not entry.strip() or entry.startswith("#"):
            continue
        match = _PIN.match(entry)
        assert match, f"{lock}.txt: not a pinned requirement: {entry.splitlines()[0]}"
        assert "--hash=sha256:" in entry, f"{lock}.txt: {match[1]} has no hash"
        found[canonicalize_name(match[1])] = match[2]
    return found


def group(name: str) -> list[Requirement]:
    """The group's requirements, its references to other groups (outrider[...]) expanded."""
    expanded: list[Requirement] = []
    for text in GROUPS[name]:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == "outrider":
            for extra in requirement.extras:
                expanded += group(extra)
        else:
            expanded.append(requirement)
    return expanded


def test_the_groups_are_the_components_and_dev_pulls_all() -> None:
    assert {"agent", "ca", "control", "injector", "all", "dev"} <= set(GROUPS)
    assert GROUPS["all"] == ["outrider[agent,ca,control,injector]"]
    assert "outrider[all]" in GROUPS["dev"]


def test_a_package_named_by_several_groups_has_one_specifier() -> None:
    seen: dict[str, str] = {}
    for name in ("agent", "ca", "control", "injector"):
        for requirement in group(name):
            key = canonicalize_name(requirement.name)
            text = str(requirement.specifier) + str(requirement.marker or "")
            assert seen.setdefault(key, text) == text, f"{key}: {seen[key]} and {text}"


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_each_lock_satisfies_its_group_and_the_core(lock: str) -> None:
    pinned = pins(lock)
    wanted = [Requirement(text) for text in PYPROJECT["dependencies"]] + group(LOCKS[lock])
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{lock}.txt lacks {requirement}: run make lock"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"{lock}.txt pins {name}=={pinned[name]}, outside {requirement}: run make lock"
        )


def test_the_image_locks_agree_with_the_dev_lock() -> None:
    """What the tests ran with is what the images carry: one version of each package."""
    dev = pins("dev")
    for lock in ("agent", "all"):
        for name, version in pins(lock).items():
            assert dev.get(name) == version, (
                f"{lock}.txt {name}=={version}, dev.txt {dev.get(name)}"
            )
    assert set(pins("agent")) <= set(pins("all")) <= set(dev)


def test_the_agent_lock_has_no_kubernetes_client() -> None:
    pinned = pins("agent")
    for name in NOT_IN_THE_AGENT:
        assert canonicalize_name(name) not in pinned
    assert {"grpclib", "httptools", "cryptography", "uvloop"} <= set(pinned)


_BLOCK = """
import importlib, importlib.abc, pkgutil, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the agent image)")
        return None

sys.meta_path.insert(0, Absent())
import agent
for module in pkgutil.walk_packages(agent.__path__, "agent."):
    importlib.import_module(module.name)
sys.argv = ["outrider", *sys.argv[1:]]
from outrider.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _outrider_without_the_agents_missing_packages(
    argv: list[str],
) -> subprocess.CompletedProcess[str]:
    """`outrider ARGV` where the packages the agent image leaves out cannot be imported."""
    blocked = {name.split(".")[0] for name in (*NOT_IN_THE_AGENT, *ONLY_FOR_TRACING)}
    return subprocess.run(
        [sys.executable, "-c", _BLOCK.format(blocked=sorted(blocked)), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize(
    "argv", [["agent", "run", "--help"], ["capture", "apply", "--help"], ["--help"]]
)
def test_the_agent_runs_without_the_packages_its_image_leaves_out(argv: list[str]) -> None:
    done = _outrider_without_the_agents_missing_packages(argv)
    assert done.returncode == 0, done.stderr
    assert "usage: outrider" in done.stdout


def test_a_command_whose_group_is_not_installed_names_the_group() -> None:
    """`outrider ca serve` in the agent image: which extra to install, not a traceback."""
    done = _outrider_without_the_agents_missing_packages(["ca", "serve", "--config", "absent.yaml"])
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "outrider ca: the " in done.stderr
    assert "lacks the ca dependency group (pip install 'outrider[ca]')" in done.stderr
