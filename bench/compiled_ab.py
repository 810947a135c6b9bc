"""Which modules are worth compiling: builds of this checkout with a chosen module list,
and CPU per operation of two such builds compared in one run.

    python -m bench.compiled_ab build OUT_DIR SPEC        # one build, e.g. shipped,l4
    python -m bench.compiled_ab test SPEC [PYTEST_ARGS]   # tests/unit/agent against it
    python -m bench.compiled_ab check SPEC                # Python subclasses of its classes
    python -m bench.compiled_ab ab A_SPEC B_SPEC [--micro l7,l7log,l4,hs] [--pairs l4,l7,grpc]
                                [--rounds 5] [--seconds 3] [--work DIR]

SPEC is a comma-separated list of module groups (below) and .py paths; `pure` is none,
`shipped` pyproject.toml's `[tool.outrider] compiled` (what setup.py builds), `proposed`
what this round's measurements add to it (PROPOSED);
a path to a directory (with a `/`) is taken as a build already made.
`shipped` is the per-request HTTP modules (measured last round as `http`). Each
build is `git archive HEAD` of this checkout with SPEC's modules compiled by mypyc as one
group (as setup.py's `mypycify` does), kept in --work (default /tmp/outrider-compiled-ab)
under a name of its own and reused while HEAD's agent/, identity/, outrider/ and tests/
and the list are the same.

`ab` runs, in both builds, rounds after rounds in alternating order (whatever else the
machine runs falls on both alike), each in a fresh process with that build first on
PYTHONPATH:

- micro `l7`: bench.l7_micro, CPU per HTTP/1.1 request outbound and inbound;
  `l7log`: the same with the access log on (`--logged`); `l7policy`: inbound decided
  by the pair's 10-rule policy and counted as the listener does (`--policy`);
- micro `l4`: bench.l4_micro, CPU per connection accepted and counted;
- micro `hs`: bench.handshake_micro's loopback part, both sides' CPU per handshake
  through the agent's code (`agent`) and uvloop's TLS alone (`bare`), full and resumed;
- pairs `l4`, `l7`, `grpc`: bench.l7_pair_ab's real agent pairs (CPU per keep-alive
  request relayed at L4, per L7 request with the 10-rule policy, per gRPC call with
  50 streams on one connection), client and server agent.

Each micro prints its best of a few rounds; `ab` prints the median over `--rounds` of
those, per build, and B's change against A. Process time, not throughput: on a shared
2-CPU machine, CPU per operation is what noise moves least.

The groups beyond `shipped` hold each path's modules that mypyc compiles (beside each: what
keeps the others out, and what the group measured). Compiled code differs where a
module is used from Python: a class of a compiled module cannot be subclassed by Python
code (bench/l4_micro.py and handshake_micro.py no longer do; capture_listeners.py does,
so listeners.py compiled alone breaks capture mode), its instances take no attribute
it does not declare (tests/unit/agent/test_relay_early_bytes.py sets one on a Relay),
its dataclass defaults are not readable through the class (h2client.py read
H2Limits's so), and an argument of the wrong type is a TypeError (a test's stand-in
for an H2Server). bench/interp_share.py says how much of a real pair's CPU each
module's interpreter time is: the most that compiling it can save.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import os
import re
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

#: The L4 relay path: listeners accept and hand off, the relay copies, the runtime and
#: metrics count. capture_listeners.py does not compile: `InboundCaptureListener` has two
#: bases (mypyc supports one, plus traits). Measured: the relay's interpreter time is 1-2%
#: of an L4 agent's CPU (Side.data_received: 35 -> 10 ns a call compiled, two calls per
#: request); listeners' 2.6% of an L7 server agent's (the per-request authorize closure);
#: all four under 1% of a handshake's. Under the pairs' noise. That per-request
#: authorization now lives in agent/adapters/authorize.py, which compiles alone: against
#: the shipped list, l7policy's inbound -5.0% and -4.2% (11.9 -> 11.3 us a request, 7 and
#: 9 rounds), the l7 pair's server +6.1% and +1.3% with its client, which does not run it,
#: +5.6% and +4.0%: about 1% of a server agent's ~47 us, under the pair's noise.
L4_MODULES = (
    "agent/adapters/relay.py",
    "agent/adapters/listeners.py",
    "agent/adapters/runtime.py",
    "agent/adapters/metrics.py",
)
#: The h2/gRPC path. Left out: h2client.py (an async generator, `_iterate`; class
#: attributes read through the class, H2Limits.max_encoder_table; a local inferred None),
#: h2malformed.py (compiles, but `_begin_new_stream` sets `stream.__class__` to its own
#: H2Stream subclass, which a native class's layout refuses: TypeError on every stream).
#: Measured (grpc pair, against the shipped list): the group, or PROPOSED, cut a gRPC
#: call's CPU per agent by 0.3-12% over five A/B runs of 6-10 rounds, about 5-6% their
#: median; h2server, inbound_h2, outbound_h2 and grpc are nearly all of its interpreter
#: share (9-13% of an agent's CPU; the pure-Python h2/hpack/hyperframe are 55%).
H2_MODULES = (
    "agent/adapters/h2server.py",
    "agent/adapters/inbound_h2.py",
    "agent/adapters/inbound_h2h1.py",
    "agent/adapters/outbound_h2.py",
    "agent/adapters/h2gate.py",
    "agent/core/grpc.py",
    "agent/core/h2limits.py",
    "agent/core/headers.py",
)
#: The access log and trace context. Left out: agent/adapters/tracing.py (a class
#: defined inside a function, `_hashed_once`). Measured: no saving with the log on
#: (bench.l7_micro --logged: outbound +1%, inbound +26%, compiled against pure).
LOG_MODULES = ("agent/core/accesslog.py", "agent/core/tracecontext.py")
#: Around a handshake. Left out: tls.py (ResumingContext subclasses ssl.SSLContext:
#: mypyc fails with an internal error on its `__new__`), agent/core/resumption.py (a
#: frozen dataclass that is Generic: "attribute '__dict__' of 'type' objects is not
#: writable" at import). trust.py runs when bundles change, not per connection; the
#: agent's own Python is 2-4% of a loopback handshake's CPU, tls.py half of it.
HS_MODULES = ("agent/core/trust.py",)

#: What this round's measurements propose adding to the shipped list: the h2/gRPC path's
#: modules with an interpreter share of a gRPC call's CPU of 0.5% or more
#: (bench.interp_share), and inbound_h2h1.py, whose InboundH2ToHttp1 subclasses
#: inbound_h2's InboundH2 (a Python subclass of a compiled class cannot be made).
#: Checked since: pure and compiled agents answered 477 hostile h2/gRPC cases and 106
#: h2-to-HTTP/1.1 cases alike (timing aside), and the suite passes compiled; against
#: the shipped build, three A/B runs of 5-7 rounds gave -3.7/-4.8, 0.0/-1.3, -4.4/-2.5%
#: (client/server). Not shipped for 3%: a larger compile, and the gRPC gap to Envoy is
#: h2/hpack/hyperframe's (55% of an agent's CPU), not this.
PROPOSED = (
    "agent/adapters/h2server.py",
    "agent/adapters/inbound_h2.py",
    "agent/adapters/inbound_h2h1.py",
    "agent/adapters/outbound_h2.py",
    "agent/core/grpc.py",
)


def shipped() -> tuple[str, ...]:
    """pyproject.toml's `[tool.outrider] compiled`: what setup.py compiles."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        listed = tomllib.load(f).get("tool", {}).get("outrider", {}).get("compiled", [])
    return tuple(listed)


GROUPS: dict[str, tuple[str, ...]] = {
    "pure": (),
    "shipped": shipped(),
    "proposed": PROPOSED,
    "l4": L4_MODULES,
    "h2": H2_MODULES,
    "log": LOG_MODULES,
    "hs": HS_MODULES,
}

#: name -> the command's arguments after `python -m`.
MICRO: dict[str, list[str]] = {
    "l7": ["bench.l7_micro", "--requests", "5000", "--rounds", "3"],
    "l7log": ["bench.l7_micro", "--requests", "5000", "--rounds", "3", "--logged"],
    "l7policy": ["bench.l7_micro", "--requests", "5000", "--rounds", "3", "--policy"],
    "l4": ["bench.l4_micro", "--connections", "500", "--rounds", "3"],
    "hs": ["bench.handshake_micro", "--part", "loopback", "--handshakes", "150", "--rounds", "2"],
}
#: Runs `python -m MODULE ARGS` with the build's code and this checkout's bench/ (the same
#: bench in every build, whatever commit the build is of).
_RUN_HERE = f"""
import runpy, sys
import bench
bench.__path__.insert(0, {str(ROOT / "bench")!r})
module = sys.argv[1]
sys.argv[:] = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
_FIGURE = re.compile(r"^(?P<label>\S.*?)\s+(?P<value>\d+(?:\.\d+)?) us", re.M)


def modules(spec: str) -> tuple[str, ...]:
    """The .py paths `spec` names, each once, in order."""
    chosen: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part in GROUPS:
            chosen += GROUPS[part]
        elif part.endswith(".py") and (ROOT / part).is_file():
            chosen.append(part)
        else:
            raise SystemExit(f"{part!r}: neither a group ({', '.join(GROUPS)}) nor a .py file")
    return tuple(dict.fromkeys(chosen))


#: Where Python code that may subclass an agent class lives.
PACKAGES = ("agent", "identity", "outrider", "ca", "control", "injector", "bench", "tests")


def python_subclasses(compiled: tuple[str, ...], packages: Sequence[str] = PACKAGES) -> list[str]:
    """Classes in Python files (of `packages` of this checkout) that subclass a class of a
    module in `compiled`: mypyc refuses to make their instances ("interpreted classes
    cannot inherit from compiled"), so each is a break once the list ships."""
    dotted = {path.removesuffix(".py").replace("/", ".") for path in compiled}
    return [
        f"{where}:{line}: {name} subclasses {base}"
        for package in packages
        for where, line, name, base in _class_bases(package)
        if where not in compiled and base.rpartition(".")[0] in dotted
    ]


@functools.cache
def _class_bases(package: str) -> tuple[tuple[str, int, str, str], ...]:
    """(file, line, class, the dotted name of a base) for every class `package` defines
    (each base resolved through the file's imports)."""
    return tuple(_bases_in(sorted((ROOT / package).glob("**/*.py"))))


def _bases_in(files: list[Path]) -> list[tuple[str, int, str, str]]:
    found = []
    for file in files:
        where = str(file.relative_to(ROOT))
        try:
            tree = ast.parse(file.read_text(), where)
        except (SyntaxError, UnicodeDecodeError):
            continue
        names: dict[str, str] = {}  # a local name -> the dotted name it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    local = alias.asname or alias.name.split(".")[0]
                    names[local] = alias.name if alias.asname else local
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            for base in node.bases:
                while isinstance(base, ast.Subscript):  # Generic[...]
                    base = base.value
                head, _, rest = ast.unparse(base).partition(".")
                full = names.get(head, head) + (f".{rest}" if rest else "")
                found.append((where, node.lineno, node.name, full))
    return found


def _head() -> str:
    """What a build is of: HEAD's code and tests (a commit to bench/ alone rebuilds nothing;
    the builds' bench/ is only used for the micro benches)."""
    trees = [f"HEAD:{d}" for d in ("agent", "identity", "outrider", "tests")]
    run = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", *trees], capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


def build(out: Path, compiled: tuple[str, ...]) -> Path:
    """`out`: HEAD's tree with `compiled` compiled in place (reused if already so)."""
    stamp = f"{_head()}\n" + "\n".join(compiled) + "\n"
    if (out / ".compiled_ab").is_file() and (out / ".compiled_ab").read_text() == stamp:
        return out
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} holds something else: give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True, timeout=120
    )
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True, timeout=120)
    if compiled:
        started = time.monotonic()
        command = [PYTHON, "-c", "from mypyc.__main__ import main; main()", *compiled]
        env = {**os.environ, "PYTHONPATH": str(out)}
        run = subprocess.run(command, cwd=out, env=env, timeout=1800, capture_output=True)
        if run.returncode != 0:
            errors = [line for line in run.stdout.decode().splitlines() if ": error:" in line]
            raise SystemExit(f"mypyc failed in {out}:\n" + "\n".join(errors or ["(see stdout)"]))
        took = time.monotonic() - started
        print(f"{out.name}: {len(compiled)} modules compiled in {took:.0f} s", flush=True)
    (out / ".compiled_ab").write_text(stamp)
    return out


def built(work: Path, spec: str) -> Path:
    """The build of `spec` in `work` (made if missing); `spec` may name a build's directory."""
    if os.sep in spec and Path(spec).is_dir():
        return Path(spec).resolve()
    compiled = modules(spec)
    digest = hashlib.sha1("\n".join(compiled).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9]+", "-", spec)[:40].strip("-") or "pure"
    return build(work / f"{name}-{digest}", compiled)


def micro(tree: Path, name: str) -> dict[str, float]:
    """One run of micro bench `name` in `tree`: its figures (µs) by label."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    module, *args = MICRO[name]
    run = subprocess.run(
        [PYTHON, "-c", _RUN_HERE, module, *args], cwd=tree, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"{name} in {tree} exited {run.returncode}:\n{run.stderr[-3000:]}")
    found = _FIGURE.finditer(run.stdout)
    return {f"{name}: {' '.join(m['label'].split())}": float(m["value"]) for m in found}


def _row(label: str, a: list[float], b: list[float]) -> str:
    ma, mb = statistics.median(a), statistics.median(b)
    n = f"n={len(a)}" if len(a) == len(b) else f"n={len(a)}/{len(b)}"
    return f"{label:46} {ma:9.1f} {mb:9.1f} {100 * (mb - ma) / ma:+7.1f}%  ({n})"


def ab(a: Path, b: Path, micros: list[str], pairs: list[str], rounds: int, seconds: float) -> None:
    from bench import l7_pair_ab

    table: list[str] = []
    for name in micros:
        runs: dict[Path, list[dict[str, float]]] = {a: [], b: []}
        for number in range(rounds):
            for tree in (a, b) if number % 2 == 0 else (b, a):
                try:
                    runs[tree].append(micro(tree, name))
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    print(exc, flush=True)
            print(f"micro {name}: round {number + 1}/{rounds}", flush=True)
        if not (runs[a] and runs[b]):
            table.append(f"{'micro ' + name + ': failed (above)':46}")
            continue
        for label in runs[a][0]:
            table.append(_row(label, [r[label] for r in runs[a]], [r[label] for r in runs[b]]))
    for layer in pairs:
        print(f"pair {layer}: {a.name} vs {b.name}", flush=True)
        medians = l7_pair_ab.compare([a, b], rounds, seconds, layer)
        ma, mb = (medians[f"{i}:{tree.name}"] for i, tree in enumerate((a, b)))
        for key in ("client", "server", "per_s"):
            what = "ops/s" if key == "per_s" else f"{key} agent us/op"
            change = 100 * (mb[key] - ma[key]) / ma[key]
            table.append(
                f"{'pair ' + layer + ': ' + what:46} {ma[key]:9.1f} {mb[key]:9.1f} {change:+7.1f}%"
                f"  (n={rounds})"
            )
    print(f"\n{'median':46} {'A':>9} {'B':>9}  B vs A\n  A = {a}\n  B = {b}")
    print("\n".join(table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled_ab", description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("/tmp/outrider-compiled-ab"))
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("build", help="one build in OUT_DIR")
    one.add_argument("out", type=Path)
    one.add_argument("spec")
    check = commands.add_parser("check", help="Python classes that subclass a compiled one")
    check.add_argument("spec")
    test = commands.add_parser("test", help="tests/unit/agent (or PYTEST_ARGS) against a build")
    test.add_argument("spec")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    both = commands.add_parser("ab", help="CPU per operation, build A against build B")
    both.add_argument("a")
    both.add_argument("b")
    both.add_argument("--micro", default="l7,l7log,l4,hs")
    both.add_argument("--pairs", default="")
    both.add_argument("--rounds", type=int, default=5)
    both.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out.resolve(), modules(args.spec))
    elif args.command == "check":
        found = python_subclasses(modules(args.spec))
        print("\n".join(found) or "no Python class subclasses a compiled one")
        raise SystemExit(1 if found else 0)
    elif args.command == "test":
        tree = built(args.work, args.spec)
        command = [PYTHON, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider"]
        command += ["--tb=line", "-rf", *(args.pytest_args or ["tests/unit/agent"])]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        raise SystemExit(subprocess.run(command, cwd=tree, env=env, timeout=1800).returncode)
    else:
        split = [[n for n in text.split(",") if n] for text in (args.micro, args.pairs)]
        for name in split[0]:
            if name not in MICRO:
                parser.error(f"--micro {name}: one of {', '.join(MICRO)}")
        trees = built(args.work, args.a), built(args.work, args.b)
        ab(*trees, split[0], split[1], args.rounds, args.seconds)


if __name__ == "__main__":
    main()
