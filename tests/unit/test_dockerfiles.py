"""Dockerfile.ca and Dockerfile.agent follow the image rules, and their build works.

No Docker engine runs here, so the rules are read from the files, and the
builder stage is replayed without Docker: the build context that
.dockerignore lets through, the sources the Dockerfile copies, and the
wheel it builds from them, which must run the `outrider` command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from identity.build import VERSION

ROOT = Path(__file__).resolve().parents[2]
IMAGES = {"Dockerfile.ca": 1338, "Dockerfile.agent": 1337}
#: The optional-dependency group (and lock file, requirements/GROUP.txt) each installs.
GROUPS = {"Dockerfile.ca": "all", "Dockerfile.agent": "agent"}
PACKAGES = ("identity", "ca", "agent", "injector", "control", "outrider")
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|make|build-essential|clang|[\w.+-]+-dev)\b")
PINNED = re.compile(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    found = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            found.append(Instruction(keyword.upper(), " ".join(args.split())))
    return found


def stages(path: Path) -> list[list[Instruction]]:
    """Instructions grouped by stage; each stage starts with its FROM."""
    grouped: list[list[Instruction]] = []
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            grouped.append([])
        if grouped:
            grouped[-1].append(instruction)
    return grouped


def global_args(path: Path) -> dict[str, str]:
    """The ARGs before the first FROM, with their defaults."""
    args = {}
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG" and "=" in instruction.args:
            name, _, value = instruction.args.partition("=")
            args[name] = value
    return args


def base_image(path: Path, from_args: str) -> str:
    """A FROM's image with the global ARGs before the first FROM substituted."""
    args = global_args(path)
    image = from_args.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)


dockerfiles = pytest.mark.parametrize("name", sorted(IMAGES))


@dockerfiles
def test_both_stages_start_from_one_base_pinned_by_tag_and_digest(name: str) -> None:
    path = ROOT / name
    froms = [stage[0].args for stage in stages(path)]
    assert len(froms) >= 2, "multi-stage: a builder and the final image"
    bases = {base_image(path, args) for args in froms}
    assert len(bases) == 1, bases
    assert PINNED.fullmatch(bases.pop())


@dockerfiles
def test_the_image_runs_as_its_fixed_non_root_uid(name: str) -> None:
    users = [i.args for i in stages(ROOT / name)[-1] if i.keyword == "USER"]
    assert users, "the final stage must set USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) == IMAGES[name] != 0
    assert gid == uid


def test_both_images_share_one_install_recipe_differing_in_the_group() -> None:
    """The builder stages are the same instructions; the group is a global ARG."""
    builders = {name: stages(ROOT / name)[0] for name in IMAGES}
    assert builders["Dockerfile.ca"] == builders["Dockerfile.agent"]
    for name, group in GROUPS.items():
        assert global_args(ROOT / name)["GROUP"] == group


def test_the_install_recipe_takes_the_locked_group_hashed_and_the_project_without_deps() -> None:
    runs = [i.args for i in stages(ROOT / "Dockerfile.agent")[0] if i.keyword == "RUN"]
    installs = [
        command.strip()
        for run in runs
        for command in run.split("&&")
        if " install " in command
        and "requirements/build.txt" not in command  # the backend's
        and "apt-get" not in command  # the C compiler, for the hot path (setup.py)
    ]
    assert len(installs) == 2, installs
    locked, project = installs
    assert "--require-hashes" in locked.split()
    assert "-r requirements/${GROUP}.txt" in locked
    assert "--no-deps" in project.split() and "/wheels/outrider-*.whl" in project
    # No pip in the image: the base image's pip installs into the venv from outside.
    assert any("python -m venv --without-pip /opt/outrider" in run for run in runs)
    for group in GROUPS.values():
        assert (ROOT / "requirements" / f"{group}.txt").is_file()


def test_make_installs_the_dev_lock() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt" in makefile
    assert "$(BIN)/pip install --quiet --no-deps --no-build-isolation -e ." in makefile
    stamp = next(line for line in makefile.splitlines() if line.startswith("$(STAMP):"))
    assert "requirements/dev.txt" in stamp.split()


OCI = ("title", "description", "source", "licenses", "version", "revision")


@dockerfiles
def test_the_image_carries_the_oci_labels(name: str) -> None:
    final = stages(ROOT / name)[-1]
    labels = dict(
        item.split("=", 1) for i in final if i.keyword == "LABEL" for item in shlex.split(i.args)
    )
    assert {f"org.opencontainers.image.{key}" for key in OCI} <= set(labels)
    args = dict(i.args.split("=", 1) for i in final if i.keyword == "ARG" and "=" in i.args)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert args["VERSION"] == VERSION  # identity/build.py, which pyproject.toml reads
    assert labels["org.opencontainers.image.licenses"] == project["license"]


def test_the_uids_are_the_ones_kubernetes_runs_them_as() -> None:
    deployment = next(
        doc
        for doc in yaml.safe_load_all((ROOT / "deploy" / "base" / "ca.yaml").read_text())
        if doc["kind"] == "Deployment"
    )
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["securityContext"]["runAsUser"] == IMAGES["Dockerfile.ca"]
    try:
        from injector.core.settings import AgentSettings
    except ImportError:
        pytest.skip("injector.core.settings is not there yet")
    assert AgentSettings().uid == IMAGES["Dockerfile.agent"]


@dockerfiles
def test_the_final_stage_has_no_build_tools_and_no_pip_cache(name: str) -> None:
    *builders, final = stages(ROOT / name)
    for instruction in final:
        if instruction.keyword == "RUN":
            assert not ("apt-get" in instruction.args and BUILD_TOOLS.search(instruction.args))
            assert "pip install" not in instruction.args or "--no-cache-dir" in instruction.args
    builder_names = {stage[0].args.split()[-1] for stage in builders}
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert copies == [f"--from={builder} /opt/outrider /opt/outrider" for builder in builder_names]
    for stage in builders:
        for instruction in stage:
            if "pip install" in instruction.args or "pip wheel" in instruction.args:
                assert "--no-cache-dir" in instruction.args


def test_the_agent_image_carries_nft_for_the_capture_init_container() -> None:
    """`outrider capture apply` runs nft; without it the capture init container fails."""
    for name in IMAGES:
        runs = [i.args for i in stages(ROOT / name)[-1] if i.keyword == "RUN"]
        installs = [r for r in runs if "apt-get install" in r and "nftables" in r.split()]
        assert bool(installs) == (name == "Dockerfile.agent"), name
        for run in installs:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run


@dockerfiles
def test_the_entrypoint_is_the_outrider_command_from_the_venv(name: str) -> None:
    final = stages(ROOT / name)[-1]
    (entrypoint,) = [i.args for i in final if i.keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["outrider"]
    (env,) = [i.args for i in final if i.keyword == "ENV"]
    assert "PATH=/opt/outrider/bin:$PATH" in shlex.split(env)


# --- the build context and the builder stage, without Docker ----------------------


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (exception?, regex) pairs, in order: the last match decides."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, glob_regex(line.lstrip("!").strip("/"))))
    return rules


def glob_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out)


def ignored(path: str) -> bool:
    """Docker's rule: a pattern that matches a path or one of its parents applies."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, regex in ignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negate
    return result


_NEVER_WALKED = {".git", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def build_context() -> list[str]:
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in _NEVER_WALKED]
        for file in names:
            relative = (Path(directory) / file).relative_to(ROOT).as_posix()
            if not ignored(relative):
                files.append(relative)
    return files


@pytest.mark.parametrize(
    ("path", "sent"),
    [
        ("pyproject.toml", True),
        ("requirements/agent.txt", True),
        ("README.md", True),
        ("ca/config.py", True),
        ("identity/proto/ca.proto", True),
        ("ca/root.key", False),  # `outrider ca init --dir ca` inside the checkout
        ("ca/intermediate.pem", False),
        ("outrider-ca/intermediate.key", False),
        ("webhook-certs/tls.key", False),
        ("ca/__pycache__/config.cpython-311.pyc", False),
        ("setup.py", True),
        ("agent/core/http1.cpython-311-x86_64-linux-gnu.so", False),  # `make`'s in-place build
        (".venv/bin/python", False),
        (".git/config", False),
        ("tests/support.py", False),
        ("deploy/overlays/local/bundle.pem", False),
    ],
)
def test_dockerignore_sends_the_sources_and_never_a_key(path: str, sent: bool) -> None:
    assert ignored(path) is not sent


def test_the_build_context_holds_every_package_and_nothing_else() -> None:
    context = build_context()
    tops = {path.split("/")[0] for path in context}
    assert tops <= {*PACKAGES, "pyproject.toml", "setup.py", "README.md", "requirements"}
    assert {f"requirements/{group}.txt" for group in GROUPS.values()} <= set(context)
    for package in PACKAGES:
        assert f"{package}/__init__.py" in context
    assert not [path for path in context if path.endswith((".key", ".pem", ".pyc", ".so"))]
    for directory in _NEVER_WALKED:
        assert ignored(f"{directory}/anything")


def copied_sources(name: str) -> list[str]:
    """What the builder stage COPYs from the context (not from other stages)."""
    sources = []
    for instruction in stages(ROOT / name)[0]:
        if instruction.keyword == "COPY" and not instruction.args.startswith("--from"):
            sources += [s.rstrip("/") for s in instruction.args.split()[:-1]]
    return sources


@dockerfiles
def test_the_builder_copies_every_package_and_only_what_the_context_has(name: str) -> None:
    sources = copied_sources(name)
    assert set(sources) == {*PACKAGES, "pyproject.toml", "setup.py", "README.md", "requirements"}
    for source in sources:
        assert not ignored(source), f"{name} copies {source}, which .dockerignore leaves out"


def test_the_wheel_built_from_the_copied_sources_runs_outrider(tmp_path: Path) -> None:
    """The builder stage's `pip wheel`, on exactly the files its COPYs would see."""
    src, wheels = tmp_path / "src", tmp_path / "wheels"
    sources = copied_sources("Dockerfile.ca")
    assert sources == copied_sources("Dockerfile.agent")
    for path in build_context():
        if path.split("/")[0] in sources:
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / path, src / path)
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    # Pure: the image's build compiles the hot path too, a minute of gcc this test leaves
    # to `make compiled` (the same setup.py), whose build the whole suite then runs on.
    built = subprocess.run(
        [*pip_wheel, "--no-cache-dir", "--quiet", "--wheel-dir", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OUTRIDER_PURE": "1"},
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("outrider-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "outrider = outrider.cli:main" in archive.read(entry_points).decode()
    assert {f"{package}/__init__.py" for package in PACKAGES} <= names
    assert "identity/proto/ca.proto" in names
    # The wheel's modules first on the path, run from a directory without the sources.
    env = {**os.environ, "PYTHONPATH": str(wheel)}
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, sys; sys.argv = ['outrider', '--help'];"
            " import outrider.cli, ca.app, agent.app; print(outrider.cli.__file__);"
            " runpy.run_module('outrider', run_name='__main__')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    first, *usage = run.stdout.splitlines()
    assert first.startswith(str(wheel))
    assert any("agent" in line and "ca" in line for line in usage)


def test_the_build_backend_is_locked_and_hashed_too() -> None:
    """`pip wheel .` with build isolation fetches `setuptools>=77` unpinned and unhashed at
    every build: two builds of one commit may build with different backends, and the one
    download the hashes do not cover is the one that runs code at build time."""
    runs = [i.args for i in stages(ROOT / "Dockerfile.agent")[0] if i.keyword == "RUN"]
    commands = [command.strip() for run in runs for command in run.split("&&")]
    (build,) = [c for c in commands if "requirements/build.txt" in c]
    (wheel,) = [c for c in commands if " wheel " in c]
    assert commands.index(build) < commands.index(wheel)
    assert "--require-hashes" in build.split() and "--only-binary" in build.split()
    assert "--no-build-isolation" in wheel.split()
    lock = (ROOT / "requirements" / "build.txt").read_text()
    backend = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in map(Requirement, backend):
        pinned = re.search(rf"^{re.escape(requirement.name)}==(\S+) \\$", lock, re.MULTILINE)
        assert pinned, f"build.txt lacks {requirement}: run make lock"
        assert requirement.specifier.contains(pinned[1])
    assert "--hash=sha256:" in lock
    assert "-o requirements/build.txt" in (ROOT / "Makefile").read_text()
