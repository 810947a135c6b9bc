"""The `outrider.io/upstreams` pod annotation: which Services a pod calls, in which order.

`outrider.io/upstreams: "backend:8080,payments.billing:http"` is a
comma-separated list of `service[.namespace]:port` (a Service port's number
or name; the namespace defaults to the pod's). The i-th entry is served on
the i-th outbound port, so fixing one entry never moves the others: a bad
entry is skipped in place and reported as a warning for the pod (a pod has
no status to write it to; the shell logs it and shows it in /debug).

The annotation says only where a pod's app connects; it grants nothing and
cannot touch policy.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["ANNOTATION", "Wanted", "parse_upstreams"]

ANNOTATION = "outrider.io/upstreams"
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?")


@dataclass(frozen=True)
class Wanted:
    """One entry of the annotation: the index picks the outbound port."""

    index: int
    service: str
    namespace: str
    port: str  # a number or a port name, as written


@functools.lru_cache(maxsize=4096)  # the pods of a Deployment share one annotation
def parse_upstreams(text: str, namespace: str) -> tuple[tuple[Wanted, ...], tuple[str, ...]]:
    """The entries, and a warning for each one skipped."""
    wanted: list[Wanted] = []
    warnings: list[str] = []
    if not text.strip():
        return (), ()
    for index, entry in enumerate(text.split(",")):
        entry = entry.strip()
        problem = _problem(entry)
        if problem:
            warnings.append(f"{ANNOTATION}[{index}] {entry!r}: {problem}; skipped")
            continue
        target, _, port = entry.rpartition(":")
        service, _, other = target.partition(".")
        wanted.append(Wanted(index, service, other or namespace, port))
    return tuple(wanted), tuple(warnings)


def _problem(entry: str) -> str | None:
    if not entry:
        return "empty entry; expected service[.namespace]:port"
    if "=" in entry or "@" in entry:
        return (
            "the old name=host:port@id form is gone; write service[.namespace]:port and the"
            " control plane finds the endpoints and their identities"
        )
    target, colon, port = entry.rpartition(":")
    if not colon or not target:
        return "no port; expected service[.namespace]:port"
    service, _, namespace = target.partition(".")
    if not _LABEL.fullmatch(service):
        return f"{service!r} is not a Service name"
    if namespace and not _LABEL.fullmatch(namespace):
        return f"{namespace!r} is not a namespace (service.namespace, no cluster domain)"
    if port.isdecimal():
        if not 0 < int(port) < 65536:
            return f"port {port} is out of range"
    elif not _PORT_NAME.fullmatch(port):
        return f"{port!r} is neither a port number nor a port name"
    return None
