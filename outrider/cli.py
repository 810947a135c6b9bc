"""The `outrider` command. It wires the packages together; nothing imports it.

Each command imports its own package when it runs: an agent process must not
carry the CA's Kubernetes, Vault and HTTP clients in its memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from identity import InvalidSpiffeId, SpiffeId, TrustDomain
from identity.configfile import ConfigError, parse_duration
from identity.files import PRIVATE, write_atomic
from identity.injected import AGENT_UID, INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT, STATUS_PORT
from outrider import debugapi, validate
from outrider.debugapi import DEBUG_URL
from outrider.output import FORMATS, add_output_flag, emit

if TYPE_CHECKING:
    from agent.core.policyfile import PolicyError

EXIT_FAILURE, EXIT_USAGE = 1, 2

log = logging.getLogger("outrider")


class CommandError(Exception):
    """A failure the user can fix; printed without a traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the limit now in force.

    1024, a common soft default, is what a thousand idle connections take.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. macOS's unlimited hard limit
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    log.info("open-file limit: %d", soft)
    return soft


def _until_signalled(serve: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
    """Run `serve(stop)` on uvloop; SIGTERM or SIGINT sets `stop`, so it ends cleanly.

    Every server the command runs comes here, so here each gets the hard limit on
    open files: with a soft 1024, a thousand idle callers would take them all. And
    its log lines go out from a thread (identity/logs.py): a collector that stops
    reading stderr would otherwise stop its event loop at the next line.
    SIGHUP never takes its default action (exit): a config reloader or a closing
    terminal must not stop a CA or an injector, which read their config at start
    and say so, nor an agent before its own reload handler is in place.
    """
    import uvloop

    from identity import logs

    raise_fd_limit()
    logs.off_the_loop()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, _no_reload)  # the agent's serve() reloads
        await serve(stop)

    uvloop.run(main())


def _no_reload() -> None:
    log.warning("SIGHUP: nothing is reloaded; restart this server to apply a changed config")


@contextlib.contextmanager
def _writing(path: str | Path) -> Iterator[None]:
    """An output path the command cannot write (a directory, a missing parent, no
    permission): exit 2 naming it, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}", EXIT_USAGE) from None


def _invalid(exc: ConfigError) -> CommandError:
    lines = "\n".join(f"  {error}" for error in exc.errors)
    return CommandError(f"invalid config {exc.source}:\n{lines}", EXIT_USAGE)


def _invalid_policy(exc: PolicyError) -> CommandError:
    lines = "\n".join(f"  {error}" for error in exc.errors)
    return CommandError(f"invalid policy:\n{lines}", EXIT_USAGE)


def _ca_init(args: argparse.Namespace) -> None:
    from ca.signers.local import CaDirectoryError, init_ca

    try:
        trust_domain = TrustDomain.parse(args.trust_domain)
        init_ca(
            Path(args.dir),
            trust_domain,
            datetime.now(UTC),
            force=args.force,
            name_constraint=args.name_constraints,
        )
    except (InvalidSpiffeId, CaDirectoryError) as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    print(f"created CA for trust domain {trust_domain} in {args.dir}")
    print(f"  bundle:       {Path(args.dir) / 'bundle.pem'}  (give this to every workload)")
    print(
        f"  root key:     {Path(args.dir) / 'root.key'}  (not needed by `ca serve`: keep offline)"
    )


def _ca_mint(args: argparse.Namespace) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from ca.core.issuance import IssuancePolicy
    from ca.issuer import Issuer
    from ca.signers.local import CaDirectoryError, LocalSigner

    try:
        spiffe_id = SpiffeId.parse(args.spiffe_id)
        ttl = parse_duration(args.ttl)
        signer = LocalSigner.load(Path(args.dir))
    except (InvalidSpiffeId, ValueError, CaDirectoryError) as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    if not spiffe_id.member_of(signer.trust_domain):
        raise CommandError(f"{spiffe_id} is not in trust domain {signer.trust_domain}", EXIT_USAGE)
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = Issuer(signer, IssuancePolicy(default_ttl=ttl, max_ttl=ttl), lambda: datetime.now(UTC))
    issued = asyncio.run(issuer.issue(spiffe_id, key.public_key()))
    out = Path(args.out)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with _writing(out):
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "svid.key", key_pem, PRIVATE)
        write_atomic(out / "svid.pem", b"".join(c.public_bytes(pem) for c in issued.chain))
        write_atomic(out / "bundle.pem", issued.bundle.to_pem())
    minted = {
        "spiffe_id": str(spiffe_id),
        "not_after": issued.leaf.not_valid_after_utc.isoformat(),
        "svid": str(out / "svid.pem"),
        "key": str(out / "svid.key"),
        "bundle": str(out / "bundle.pem"),
    }
    emit(
        minted,
        args.output,
        lambda m: (
            f"minted {m['spiffe_id']}, valid until {m['not_after']}\n"
            f"  {m['svid']}, {m['key']}, {m['bundle']}\n"
            "  an agent starts from it with identity.svid_file and identity.key_file"
        ),
    )


def _ca_dev_token(args: argparse.Namespace) -> None:
    from ca.authn.dev import DevModeError, mint_token

    try:
        spiffe_id = SpiffeId.parse(args.spiffe_id)
        token, not_after = mint_token(Path(args.dir), spiffe_id, parse_duration(args.ttl))
    except (ValueError, DevModeError) as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    with _writing(args.out):  # named as given
        write_atomic(Path(args.out), token.encode() + b"\n", PRIVATE)
    made = {
        "spiffe_id": str(spiffe_id),
        "token_file": args.out,
        "not_after": not_after.isoformat(timespec="seconds"),
    }
    emit(
        made,
        args.output,
        lambda m: (
            f"dev token for {m['spiffe_id']} in {m['token_file']}, valid until {m['not_after']}\n"
            "  only `outrider ca serve --dev` with this CA directory accepts it"
        ),
    )


def _ca_serve(args: argparse.Namespace) -> None:
    from ca import app as ca_app
    from ca import config as ca_config

    try:
        config = ca_config.load(Path(args.config), dev=args.dev)
    except ConfigError as exc:
        raise _invalid(exc) from None
    try:
        _until_signalled(lambda stop: ca_app.serve(config, stop))
    except ca_app.StartupError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def _agent_run(args: argparse.Namespace) -> None:
    from agent import app as agent_app
    from agent import config as agent_config
    from agent.core.policyfile import PolicyError

    path = Path(args.config) if args.config else None
    try:
        if path is not None:
            document = agent_config.read(path)
        else:
            document = agent_config.read_text(_environ(args.config_env), source=args.config_env)
        config = document.parse()
        pod = agent_app.pod_name(config, os.environ, document.source)  # with control:
        agent_app.check_tracing(config, os.environ, document.source)
    except ConfigError as exc:
        raise _invalid(exc) from None
    try:
        agent_app.load_policies(config)
    except PolicyError as exc:
        raise _invalid_policy(exc) from None
    try:
        _until_signalled(
            lambda stop: agent_app.serve(path, config, stop, document=document, pod=pod)
        )
    except OSError as exc:  # a listen address in use or not local
        raise CommandError(exc.strerror or str(exc)) from None


def _environ(name: str) -> str:
    try:
        return os.environ[name]
    except KeyError:
        raise CommandError(f"environment variable {name} is not set", EXIT_USAGE) from None


def _inject(args: argparse.Namespace) -> None:
    from injector import config as injector_config
    from injector.manifests import INVALID, ManifestError, inject_sources

    if args.output in FORMATS:  # elsewhere `-o yaml` is a format: never a file here
        raise CommandError(
            f"-o names the file inject writes, not a format (it writes the manifests as it"
            f" read them, YAML or JSON); for a file"
            f" named {args.output}, say -o ./{args.output}",
            EXIT_USAGE,
        )

    try:
        config = (
            injector_config.load(Path(args.config))
            if args.config
            else injector_config.InjectorConfig()
        )
    except ConfigError as exc:
        raise _invalid(exc) from None
    settings = config.settings.without_capture() if args.no_capture else config.settings
    try:
        output, results = inject_sources(args.file, sys.stdin, settings, args.namespace)
    except ManifestError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    for file, result in results:
        where = f"{file}: " if file else ""
        print(f"{where}{result.workload}: {result.mutation.reason}", file=sys.stderr)
        for warning in result.mutation.warnings:
            print(f"  {warning}", file=sys.stderr)
    if args.output:
        with _writing(Path(args.output)):
            write_atomic(Path(args.output), output.encode())
    else:
        sys.stdout.write(output)
    invalid = [result for _, result in results if result.mutation.reason == INVALID]
    if invalid:
        raise CommandError(f"{len(invalid)} workload(s) left as written: see above")


def _injector_serve(args: argparse.Namespace) -> None:
    from injector import app as injector_app
    from injector import config as injector_config

    try:
        config = injector_config.load(Path(args.config), require_tls=True)
    except ConfigError as exc:
        raise _invalid(exc) from None
    try:
        _until_signalled(lambda stop: injector_app.serve(config, stop))
    except injector_app.StartupError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


def _control_serve(args: argparse.Namespace) -> None:
    from control import app as control_app
    from control import config as control_config

    kubeconfig = Path(args.kubeconfig) if args.kubeconfig else None
    try:
        config = control_config.load(Path(args.config), kubeconfig=kubeconfig)
    except ConfigError as exc:
        raise _invalid(exc) from None
    try:
        _until_signalled(lambda stop: control_app.serve(config, stop))
    except control_app.StartupError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None


@contextlib.contextmanager
def _asking_control() -> Iterator[None]:
    """The control plane's debug API did not answer as one: exit 1 with what to do."""
    try:
        yield
    except debugapi.Unreachable as exc:
        raise CommandError(str(exc)) from None


def _control_urls(args: argparse.Namespace) -> list[str]:
    """The --control URLs given (repeatable where every replica is asked), checked."""
    given = args.control
    urls: list[str] = [given] if isinstance(given, str) else given or [DEBUG_URL]
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise CommandError(f"--control {url!r} is not an http:// URL", EXIT_USAGE)
    return urls


def _proxy_status(args: argparse.Namespace) -> None:
    heard = debugapi.agents_of(_control_urls(args))
    if not heard.answered:
        raise CommandError("; ".join(heard.unreachable))
    rows = debugapi.agent_rows(heard.agents)
    emit(rows, args.output, debugapi.status_table)
    lagging = sum(1 for row in rows if row["state"] != "SYNCED")
    replicas = f" (of {heard.answered} control-plane replicas)" if heard.answered > 1 else ""
    print(f"{len(rows)} agents{replicas}, {lagging} not in sync", file=sys.stderr)
    if heard.unreachable:  # their agents are not listed: say so, and fail
        raise CommandError(
            "; ".join(heard.unreachable) + "; the agents of those replicas are not listed"
        )


def _check(args: argparse.Namespace) -> None:
    from outrider import check

    controls = _control_urls(args)
    kubeconfig = Path(args.kubeconfig) if args.kubeconfig else None
    try:
        cluster = check.Cluster(kubeconfig, args.context)
        seen = check.observe(cluster, controls, pre=args.pre)
    except check.ApiUnreachable as exc:
        raise CommandError(str(exc)) from None
    shown = check.result(check.evaluate(seen, pre=args.pre))
    emit(shown, args.output, check.text)
    if not shown["ok"]:
        raise CommandError("a check failed: see its fix above", EXIT_FAILURE)


def _completion(args: argparse.Namespace) -> None:
    import shtab

    sys.stdout.write(shtab.complete(parser(), shell=args.shell))


def _validate(
    read: Callable[[argparse.Namespace], str],
) -> Callable[[argparse.Namespace], None]:
    """`outrider COMPONENT validate --config FILE`: read it as the server would, run nothing."""

    def handler(args: argparse.Namespace) -> None:
        from agent.core.policyfile import PolicyError

        try:
            print(read(args))
        except ConfigError as exc:
            raise _invalid(exc) from None
        except PolicyError as exc:
            raise _invalid_policy(exc) from None

    return handler


def _policy_lint(args: argparse.Namespace) -> None:
    from agent.core.policyfile import PolicyError, load_policy_files

    paths = [Path(name) for name in args.files]
    errors: list[str] = []
    for path in paths:
        try:
            print(f"{path}: {len(load_policy_files([path]))} policies OK")
        except PolicyError as exc:
            errors.extend(exc.errors)
    if not errors:
        try:
            load_policy_files(paths)  # names must also be unique across the files
        except PolicyError as exc:
            errors.extend(exc.errors)
    if args.agent_config and errors:  # still read, so that a bad one is told now too
        errors.extend(validate.agent_config_errors(Path(args.agent_config)))
    elif args.agent_config:
        errors.extend(_lint_for_agent(paths, Path(args.agent_config)))
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        plural = "s" if len(errors) > 1 else ""
        raise CommandError(f"{len(errors)} error{plural} in policy files", EXIT_USAGE)


def _lint_for_agent(paths: list[Path], agent_config: Path) -> list[str]:
    """What this agent would refuse the files with, beside its own config's policies."""
    from agent.core.policyfile import PolicyError

    try:
        count = validate.policies_for_agent(paths, agent_config)
    except ConfigError as exc:
        raise _invalid(exc) from None
    except PolicyError as exc:
        return list(exc.errors)
    print(f"{agent_config}: the agent would load {count} policies OK")
    return []


def _policy_check(args: argparse.Namespace) -> None:
    from agent.core.captured import admit_plaintext
    from agent.core.httppath import BadPath, normalize_host, normalize_target
    from agent.core.policy import PolicySet, Request
    from agent.core.policyfile import PolicyError, load_policy_files
    from outrider import policycheck

    if bool(args.policy) == bool(args.live):
        raise CommandError("give --policy FILE, or --live with --pod and --control", EXIT_USAGE)
    if args.permissive and not args.plaintext:
        raise CommandError("--permissive is about a --plaintext caller", EXIT_USAGE)
    permissive = args.permissive
    try:
        source = None if args.plaintext else SpiffeId.parse(args.source)
        trust_domains = frozenset(TrustDomain.parse(name) for name in args.trust_domain)
        if args.live:
            found, default_action, mode = _live_policies(args)
            permissive = permissive or mode == "permissive"
        else:
            found = load_policy_files([Path(p) for p in args.policy])
            default_action = args.default_action or "allow-authenticated"
        policies = PolicySet(found, default_action)
    except InvalidSpiffeId as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    except PolicyError as exc:
        raise _invalid_policy(exc) from None
    if args.method is None and (args.path or args.host or args.header):
        raise CommandError(
            "--path, --host and --header describe an HTTP request: add --method", EXIT_USAGE
        )
    try:
        headers, refusal = policycheck.request_headers(args.header)
    except ValueError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from None
    if refusal is not None:
        _verdict(args, refusal)
    path = None
    if args.method is not None:
        try:
            path, _ = normalize_target(args.path or "/")
        except BadPath as exc:
            _verdict(args, policycheck.refused(str(exc)))
    request = Request(
        source=source,
        port=args.port,
        method=args.method,
        path=path,
        host=None if args.host is None else normalize_host(args.host),
        headers=headers,
    )
    if not trust_domains and source is not None:
        trust_domains = frozenset({source.trust_domain})
    decision = policies.decide(request, trust_domains)
    if permissive:  # as the agent decides a permissive port's plaintext caller
        decision = admit_plaintext(decision)
    _verdict(args, policycheck.decided(decision, path, args.path))


def _verdict(args: argparse.Namespace, verdict: dict[str, Any]) -> None:
    """Print a `policy check` verdict; a deny exits 1."""
    from outrider import policycheck

    emit(verdict, args.output, policycheck.text)
    if verdict["decision"] != "allow":
        raise CommandError("denied", EXIT_FAILURE)


def _live_policies(
    args: argparse.Namespace,
) -> tuple[Any, Literal["allow-authenticated", "deny"], str]:
    """The policies and default action the control plane gives the pod now, and the mTLS
    mode of --port there (a captured pod's; any other's is strict)."""
    import urllib.parse

    from agent.core.captured import Captured, PortOverride
    from agent.core.policyfile import parse_policy_list

    namespace, slash, name = (args.pod or "").partition("/")
    if not slash or not namespace or not name:
        raise CommandError("--live needs --pod NAMESPACE/NAME", EXIT_USAGE)
    query = urllib.parse.urlencode({"pod": args.pod})
    with _asking_control():
        answer = debugapi.get(args.control, f"/debug/config?{query}")
    policy = answer.get("config", {}).get("policy") or {}
    source = f"{args.control} pod {args.pod} version {answer.get('version')}"
    policies = parse_policy_list(policy.get("policies") or [], source)  # as the agent reads them
    action = args.default_action or policy.get("default_action", "allow-authenticated")
    if action not in ("allow-authenticated", "deny"):
        raise CommandError(f"{source}: default_action {action!r} is not one this command knows")
    inbound = (answer.get("config", {}).get("captured") or {}).get("inbound") or {}
    overrides = tuple(
        (int(port), PortOverride(item.get("mtls")))
        for port, item in (inbound.get("ports") or {}).items()
        if str(port).isdecimal() and isinstance(item, dict)
    )
    captured = Captured(inbound.get("mtls", "strict"), overrides)
    return policies, action, captured.inbound(args.port).mtls


def _capture_apply(args: argparse.Namespace) -> None:
    from agent.adapters.netlink import NetlinkError, add_to_loopback
    from agent.adapters.nft import CAPABILITIES, Nft, NftError
    from identity.capture import (
        HANDOFF_SOURCE,
        CaptureRulesError,
        flag,
        rules_from_flags,
        ruleset,
        summary,
    )

    try:
        rules = rules_from_flags(
            inbound_port=args.inbound_port,
            outbound_port=args.outbound_port,
            agent_uid=args.agent_uid,
            exclude_inbound_ports=args.exclude_inbound_ports,
            exclude_outbound_ports=args.exclude_outbound_ports,
            exclude_outbound_cidrs=args.exclude_outbound_cidrs,
        )
    except CaptureRulesError as exc:
        lines = "\n".join(f"  {flag(name)}: {why}" for name, why in exc.problems)
        raise CommandError(f"invalid capture settings:\n{lines}") from None
    script = ruleset(rules)
    if args.dry_run:
        sys.stdout.write(script)
        return
    try:  # first: the rules are not applied if the agent could not hand IPv6 over
        add_to_loopback(HANDOFF_SOURCE[6])  # False: no IPv6 in the pod, none to hand off
    except NetlinkError as exc:
        said = f"could not add {HANDOFF_SOURCE[6]} to lo (the agent hands IPv6 to the app from it)"
        if exc.errno == errno.EPERM:
            raise CommandError(f"{said}: Operation not permitted: {CAPABILITIES}") from None
        raise CommandError(f"{said}: {exc.strerror}") from None
    nft = Nft()
    try:
        nft.apply(script)
        print(summary(rules, nft.table() or {}))  # what the kernel holds now, checked
    except (NftError, CaptureRulesError) as exc:
        raise CommandError(str(exc)) from None


def _not_permitted_to(doing: str, exc: Exception) -> CommandError:
    """`show` and `remove` without NET_ADMIN: not the init container's advice, but how an
    operator gets there (or reads what the init container did)."""
    said = getattr(exc, "not_permitted", None)
    if said is None:
        return CommandError(str(exc))
    return CommandError(
        f"nft was not permitted: {doing} the rules needs NET_ADMIN, as root, in the pod's"
        " network namespace; in a cluster, `kubectl logs POD -c outrider-capture` shows"
        f" what the init container applied (nft said: {said})"
    )


def _capture_show(args: argparse.Namespace) -> None:
    from agent.adapters.nft import Nft, NftError

    try:
        listing = Nft().listing()
    except NftError as exc:
        raise _not_permitted_to("reading", exc) from None
    sys.stdout.write(listing if listing is not None else "capture off: no table inet outrider\n")


def _capture_remove(args: argparse.Namespace) -> None:
    from agent.adapters.nft import Nft, NftError
    from identity.capture import remove_script

    nft = Nft()
    try:
        present = nft.listing() is not None
        nft.apply(remove_script())  # removes it even if it appeared since
    except NftError as exc:
        raise _not_permitted_to("removing", exc) from None
    done = "table inet outrider removed" if present else "no table inet outrider to remove"
    print(f"capture off: {done}")


def _traffic_seconds(text: str) -> float:
    """`demo --duration`: a duration as everywhere else (90s, 2m), or plain seconds."""
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else None
        if seconds is None:
            seconds = parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: traffic must run for some time")
    return seconds


def _demo(args: argparse.Namespace) -> None:
    from outrider import demo

    demo.run(duration=args.duration, keep=Path(args.keep) if args.keep else None)


def _audit(args: argparse.Namespace) -> None:
    from outrider.audit.command import AuditError, run, summary

    try:
        written = run(
            now=datetime.now(UTC),
            out=Path(args.out),
            prometheus=args.prometheus,
            metrics=[Path(name) for name in args.metrics or ()],
            ca_audit_log=Path(args.ca_audit_log) if args.ca_audit_log else None,
            since=args.since,
            until=args.until,
            namespaces=args.namespace,
        )
    except AuditError as exc:
        raise CommandError(str(exc), exc.code) from None
    print(summary(written))
    if written.audit.exit_code:
        raise CommandError("a strict port accepted plaintext (audit.html, section a)")


class _Version(argparse.Action):
    """`--version`: identity.build is read only when asked."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from identity.build import VERSION

        sys.stdout.write(f"outrider {VERSION}\n")  # stdout, as argparse's own version action
        parser.exit()


def _app_port(text: str) -> int:
    """argparse type for a port the agent could serve: a policy names ports 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def _add_control_flag(
    command: argparse.ArgumentParser, what: str, after: str = "", *, each_replica: bool = False
) -> None:
    """`--control URL`: every command that reads the control plane's debug API; with
    `each_replica`, repeatable (each replica lists only the agents connected to it)."""
    if each_replica:
        command.add_argument(
            "--control",
            action="append",
            metavar="URL",
            help=f"{what}, once per control-plane replica (default {DEBUG_URL}{after})",
        )
        command.set_defaults(control=None)
        return
    command.add_argument(
        "--control", default=DEBUG_URL, metavar="URL", help=f"{what} (default {DEBUG_URL}{after})"
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="outrider", description="SPIFFE mTLS for Kubernetes")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    commands = top.add_subparsers(dest="command", required=True)

    ca = commands.add_parser("ca", help="the certificate authority").add_subparsers(
        dest="ca_command", required=True
    )
    init = ca.add_parser("init", help="create a root and intermediate CA")
    init.add_argument("--trust-domain", required=True, help="e.g. example.org")
    init.add_argument("--dir", required=True, help="directory for keys and certificates")
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    init.add_argument(
        "--name-constraints",
        action="store_true",
        help="limit the intermediate's URIs to the trust domain with a critical name "
        "constraint (rustls and Python cryptography then refuse every SVID chain)",
    )
    init.set_defaults(func=_ca_init)

    mint = ca.add_parser("mint", help="issue an SVID offline from the local CA key")
    mint.add_argument("--dir", required=True, help="the directory made by `ca init`")
    mint.add_argument("--spiffe-id", required=True, help="spiffe://<td>/ns/<ns>/sa/<sa>")
    mint.add_argument("--ttl", default="1h", help="lifetime, e.g. 1h (default), 30m, 1h30m, 2d")
    mint.add_argument("--out", required=True, help="writes svid.pem, svid.key, bundle.pem")
    add_output_flag(mint)
    mint.set_defaults(func=_ca_mint)

    serve = ca.add_parser("serve", help="serve the Sign RPC, the bundle and metrics")
    serve.add_argument("--config", required=True, help="ca.yaml")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="UNSAFE, a laptop only: issue to holders of `ca dev-token` tokens, without "
        "Kubernetes; loopback only, refused in a pod (docs/operations.md#dev-mode)",
    )
    serve.set_defaults(func=_ca_serve)
    ca_validate = ca.add_parser("validate", help="read ca.yaml as `ca serve` would; run nothing")
    ca_validate.add_argument("--config", required=True, help="ca.yaml")
    ca_validate.add_argument("--dev", action="store_true", help="as `ca serve --dev` reads it")
    ca_validate.set_defaults(func=_validate(lambda a: validate.ca(Path(a.config), dev=a.dev)))

    dev_token = ca.add_parser(
        "dev-token", help="a token `ca serve --dev` accepts as a workload (no cluster needed)"
    )
    dev_token.add_argument("--dir", required=True, help="the directory made by `ca init`")
    dev_token.add_argument("--spiffe-id", required=True, help="spiffe://<td>/ns/<ns>/sa/<sa>")
    dev_token.add_argument("--ttl", default="7d", help="lifetime, e.g. 7d (default), 12h")
    dev_token.add_argument("--out", required=True, help="the token file (mode 0600)")
    add_output_flag(dev_token)
    dev_token.set_defaults(func=_ca_dev_token)

    agent = commands.add_parser("agent", help="the sidecar").add_subparsers(
        dest="agent_command", required=True
    )
    agent_run = agent.add_parser("run", help="get an SVID, serve mTLS, keep it fresh")
    source = agent_run.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="agent.yaml, reloaded when it changes")
    source.add_argument(
        "--config-env", metavar="VAR", help="read the YAML from this environment variable"
    )
    agent_run.set_defaults(func=_agent_run)
    agent_validate = agent.add_parser(
        "validate", help="read agent.yaml and its policies as `agent run` would; run nothing"
    )
    agent_validate.add_argument("--config", required=True, help="agent.yaml")
    agent_validate.set_defaults(func=_validate(lambda a: validate.agent(Path(a.config))))

    inject = commands.add_parser("inject", help="add the agent to the pods of manifest files")
    inject.add_argument(
        "-f",
        "--file",
        required=True,
        action="append",
        help="a manifest file (multi-document YAML, a kind: List, JSON), a directory (its "
        ".yaml, .yml and .json files, recursively), or - for stdin; repeatable",
    )
    inject.add_argument("-o", "--output", help="write here instead of stdout")
    inject.add_argument("--config", help="injector.yaml (default: the built-in defaults)")
    inject.add_argument(
        "--namespace", default="default", help="for documents without metadata.namespace"
    )
    inject.add_argument(
        "--no-capture",
        action="store_true",
        help="no outrider-capture init container and no probe rewriting, as the webhook does "
        "for a namespace labelled outrider.io/capture=disabled",
    )
    inject.set_defaults(func=_inject)

    injector = commands.add_parser("injector", help="the admission webhook").add_subparsers(
        dest="injector_command", required=True
    )
    injector_serve = injector.add_parser("serve", help="serve /mutate over HTTPS")
    injector_serve.add_argument("--config", required=True, help="injector.yaml")
    injector_serve.set_defaults(func=_injector_serve)
    injector_validate = injector.add_parser(
        "validate", help="read injector.yaml as `injector serve` would; run nothing"
    )
    injector_validate.add_argument("--config", required=True, help="injector.yaml")
    injector_validate.set_defaults(func=_validate(lambda a: validate.injector(Path(a.config))))

    policy = commands.add_parser("policy", help="check authorization policy files").add_subparsers(
        dest="policy_command", required=True
    )
    lint = policy.add_parser(
        "lint", help="validate policy files", description="exit 0 if valid, 2 with every error"
    )
    lint.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")
    lint.add_argument(
        "--agent-config",
        metavar="FILE",
        help="also check them as this agent would load them: its ports' protocols"
        " (no HTTP field on a TCP port) and its own policies' names",
    )
    lint.set_defaults(func=_policy_lint)

    check = policy.add_parser(
        "check",
        help="decide one request offline and say why",
        description="prints allow or deny, the deciding policy and rule, and why;"
        " exit 0 for allow, 1 for deny, 2 for bad input",
    )
    check.add_argument("--policy", action="append", metavar="FILE", help="repeatable")
    check.add_argument(
        "--live",
        action="store_true",
        help="decide with the policies the control plane gives --pod now, not files",
    )
    check.add_argument("--pod", metavar="NS/NAME", help="with --live: the workload asked about")
    _add_control_flag(check, "with --live: the control plane's debug address")
    who = check.add_mutually_exclusive_group(required=True)
    who.add_argument("--source", metavar="SPIFFE_ID", help="the authenticated caller")
    who.add_argument("--plaintext", action="store_true", help="an unauthenticated caller")
    check.add_argument(
        "--permissive",
        action="store_true",
        help="with --plaintext: --port is permissive (with --live, the pod's own mode is used)",
    )
    check.add_argument(
        "--port", type=_app_port, default=8080, help="the app port, 1-65535 (default 8080)"
    )
    check.add_argument("--method", help="an HTTP request; without it, an L4 (TCP) connection")
    check.add_argument("--path", help="the raw request-target, normalized as the agent does")
    check.add_argument("--host", help="the Host header")
    check.add_argument(
        "--header", action="append", default=[], metavar="NAME=VALUE", help="repeatable"
    )
    check.add_argument(
        "--default-action",
        choices=["allow-authenticated", "deny"],
        help="default allow-authenticated; with --live, the pod's own",
    )
    check.add_argument(
        "--trust-domain",
        action="append",
        default=[],
        help="allowed by allow-authenticated; repeatable (default: the source's)",
    )
    add_output_flag(check)
    check.set_defaults(func=_policy_check)

    control = commands.add_parser("control", help="the control plane").add_subparsers(
        dest="control_command", required=True
    )
    control_serve = control.add_parser(
        "serve", help="watch the cluster and stream each agent its configuration"
    )
    control_serve.add_argument("--config", required=True, help="control.yaml")
    control_serve.add_argument(
        "--kubeconfig", help="reach the API server with this file (default: in-cluster)"
    )
    control_serve.set_defaults(func=_control_serve)
    control_validate = control.add_parser(
        "validate", help="read control.yaml as `control serve` would; run nothing"
    )
    control_validate.add_argument("--config", required=True, help="control.yaml")
    control_validate.add_argument("--kubeconfig", help="as for serve")
    control_validate.set_defaults(
        func=_validate(
            lambda a: validate.control(Path(a.config), Path(a.kubeconfig) if a.kubeconfig else None)
        )
    )

    status = commands.add_parser(
        "proxy-status",
        help="every connected agent, its config version and ACK state",
        description="SYNCED: runs the latest version; STALE: not acknowledged yet;"
        " NACK: refused what it was sent (and why). Exit 1 if the control plane is unreachable",
    )
    _add_control_flag(status, "its debug address", each_replica=True)
    add_output_flag(status)
    status.set_defaults(func=_proxy_status)

    cluster_check = commands.add_parser(
        "check",
        help="can the cluster run Outrider, and does the installed one work",
        description="one line per check: ✓ fine, ‼ worth a look, ✗ broken, each ‼ and ✗"
        " with what to do. Exit 0 when nothing is ✗, 1 when something is",
    )
    cluster_check.add_argument(
        "--pre", action="store_true", help="only what matters before installing"
    )
    cluster_check.add_argument(
        "--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config, as kubectl"
    )
    cluster_check.add_argument("--context", help="the kubeconfig context (default: current)")
    _add_control_flag(
        cluster_check,
        "the control plane's debug address, for the agents",
        f": {debugapi.PORT_FORWARD}",
        each_replica=True,
    )
    add_output_flag(cluster_check)
    cluster_check.set_defaults(func=_check)

    completion = commands.add_parser(
        "completion",
        help="print a shell completion script",
        description="bash: `source <(outrider completion bash)`, or save it in"
        " /etc/bash_completion.d/outrider. zsh: save it as _outrider in a directory of"
        " $fpath",
    )
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=_completion)

    capture = commands.add_parser(
        "capture", help="the pod's traffic capture rules (nftables)"
    ).add_subparsers(dest="capture_command", required=True)
    capture_apply = capture.add_parser(
        "apply",
        help="redirect the pod's TCP to the agent (the outrider-capture init container)",
        description="replaces table inet outrider in one transaction (applying twice is"
        " applying once), reads it back and prints a summary. Needs NET_ADMIN and NET_RAW."
        " Exit 1 on bad values, a missing nft, or no permission",
        # Flags only in full: the control plane reads the exclusions from the pod's args
        # as written (identity.capture.flag_text); an abbreviation it would not see.
        allow_abbrev=False,
    )
    capture_apply.add_argument(
        "--inbound-port",
        metavar="N",
        help=f"where inbound TCP goes (default {INBOUND_CAPTURE_PORT})",
    )
    capture_apply.add_argument(
        "--outbound-port",
        metavar="N",
        help=f"where the app's outbound TCP goes (default {OUTBOUND_CAPTURE_PORT})",
    )
    capture_apply.add_argument(
        "--agent-uid",
        metavar="N",
        help=f"whose connections are never captured (default {AGENT_UID})",
    )
    capture_apply.add_argument(
        "--exclude-inbound-ports",
        metavar="P,...",
        help=f"inbound ports left to the app (default {STATUS_PORT}, the status port)",
    )
    capture_apply.add_argument(
        "--exclude-outbound-ports", metavar="P,...", help="destination ports never captured"
    )
    capture_apply.add_argument(
        "--exclude-outbound-cidrs",
        metavar="C,...",
        help="destination networks never captured, IPv4 or IPv6",
    )
    capture_apply.add_argument(
        "--dry-run", action="store_true", help="print the nft script and change nothing"
    )
    capture_apply.set_defaults(func=_capture_apply)
    capture_show = capture.add_parser("show", help="print the capture table, if any")
    capture_show.set_defaults(func=_capture_show)
    capture_remove = capture.add_parser("remove", help="remove the capture table")
    capture_remove.set_defaults(func=_capture_remove)

    demo = commands.add_parser("demo", help="run the mesh on loopback and show what it does")
    demo.add_argument(
        "--duration",
        type=_traffic_seconds,
        default=20.0,
        help="how long traffic runs: a duration (90s, 2m) or seconds (default 20)",
    )
    demo.add_argument(
        "--keep",
        metavar="DIR",
        help="run in DIR (new or empty) and leave its configs, keys, tokens and a README.md"
        " with the commands that start the same mesh by hand",
    )
    demo.set_defaults(func=_demo)

    audit = commands.add_parser(
        "audit",
        help="an mTLS compliance report (HTML and JSON) from Prometheus or saved scrapes",
        description="answers: was plaintext accepted, the TLS mix, who talked to whom, each"
        " identity's certificates, every deny, the CA's issuances and refusals. Exit 0 clean,"
        " 1 when a strict port accepted plaintext, 2 when no report could be made",
    )
    evidence = audit.add_mutually_exclusive_group(required=True)
    evidence.add_argument("--prometheus", metavar="URL", help="e.g. http://prometheus:9090")
    evidence.add_argument(
        "--metrics", nargs="+", metavar="FILE", help="saved /metrics scrapes, one per process"
    )
    audit.add_argument("--ca-audit-log", metavar="FILE", help="the CA's audit log (JSON lines)")
    audit.add_argument("--since", help="24h (default with --prometheus) or RFC 3339")
    audit.add_argument("--until", help="a duration back from now or RFC 3339 (default: now)")
    audit.add_argument(
        "--namespace", action="append", default=[], metavar="NS", help="repeatable (default all)"
    )
    audit.add_argument("--out", required=True, metavar="DIR", help="writes audit.html, audit.json")
    audit.set_defaults(func=_audit)
    return top


def _standard_descriptors() -> None:
    """Descriptors 0, 1 and 2 the process was started without become /dev/null, as a
    daemon's do: else the first socket opened takes the number, and a line meant for
    stdout goes to a peer (and uvloop aborts when it closes it). sys.stdout stays None,
    which is how `audit_log: "-"` knows it has nowhere to go."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


#: Libraries that log at debug for every frame or header they handle: under `-v` a
#: caller's requests made thousands of their lines a second, which took the room a
#: stdout shared with the audit log had for issued certificates.
CHATTY_LIBRARIES = ("hpack", "h2", "grpclib", "asyncio", "aiohttp")


def main(argv: Sequence[str] | None = None) -> int:
    _standard_descriptors()
    args = parser().parse_args(argv)
    # The injector gives each agent OUTRIDER_LOG_LEVEL (debug, info, warning or error).
    named = os.environ.get("OUTRIDER_LOG_LEVEL", "").upper()
    level = logging.getLevelNamesMapping().get(named, logging.INFO)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for chatty in CHATTY_LIBRARIES:  # debug is ours: theirs is lines per frame
        logging.getLogger(chatty).setLevel(max(level, logging.INFO))
    try:
        args.func(args)
    except CommandError as exc:
        print(f"outrider: {exc}", file=sys.stderr)
        return exc.code
    except ModuleNotFoundError as exc:
        # An install without the command's dependency group (the agent image has only
        # what `agent` and `capture` need): which group, rather than a traceback.
        group = _GROUPS.get(args.command, "all")
        print(
            f"outrider {args.command}: the {exc.name} package is not installed: this install "
            f"lacks the {group} dependency group (pip install 'outrider[{group}]')",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0


#: The optional-dependency group (pyproject.toml) each command needs beyond the core.
_GROUPS = {"agent": "agent", "capture": "agent", "ca": "ca", "control": "control"}
_GROUPS |= {"injector": "injector", "inject": "injector", "demo": "all"}


if __name__ == "__main__":
    sys.exit(main())
