"""Where the audit's evidence comes from: a Prometheus server's HTTP API, or saved scrapes.

The thin I/O shell around build.py. From Prometheus, each metric is read as
raw samples (an instant query of `name{...}[RANGE]` at the range's end: every
stored sample, no resolution step to lose a restart between two points). A
saved `/metrics` scrape is one sample per series at the file's modification
time, its instance the file's name.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from outrider.audit.model import ALL_SERIES, CA_SERIES, Series, namespace_of

TIMEOUT = 30.0


class SourceError(Exception):
    """The evidence could not be read; the message says what to do."""


# One number per target instead of every sample: the earliest start of its process in the
# range is all the core needs (build._Counters), and every target in Prometheus has one.
PROCESS_START = "process_start_time_seconds"


def _selector(name: str, namespaces: Sequence[str]) -> str:
    if not namespaces or name in CA_SERIES or name == PROCESS_START:
        return name
    wanted = "|".join(_quote_regex(ns) for ns in namespaces)
    return f'{name}{{namespace=~"{wanted}"}}'


def _quote_regex(text: str) -> str:
    escaped = "".join("\\\\" + c if not (c.isalnum() or c in "-_") else c for c in text)
    return escaped.replace('"', '\\"')


def _get(base: str, path: str, params: dict[str, str]) -> Any:
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as answer:  # noqa: S310 - http(s)
            body = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        try:
            said = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            said = exc.reason
        raise SourceError(f"Prometheus at {base} answered {exc.code}: {said}") from None
    except ValueError:
        raise SourceError(
            f"{base} answered {path} with something other than the Prometheus API's JSON:"
            " is --prometheus the server's base URL (no path)?"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(
            f"cannot reach Prometheus at {base}: {reason} (is it running, and is --prometheus"
            " its base URL, e.g. http://prometheus.monitoring:9090? Or give saved scrapes"
            " with --metrics FILE...)"
        ) from None
    if not isinstance(body, dict) or body.get("status") != "success":
        raise SourceError(f"Prometheus at {base} answered without data: {str(body)[:200]}")
    return body["data"]


def from_prometheus(
    base: str, start: datetime, end: datetime, namespaces: Sequence[str]
) -> tuple[Series, ...]:
    """Every raw sample of the series the audit reads, in the range."""
    if not base.startswith(("http://", "https://")):
        raise SourceError(f"--prometheus {base!r} is not an http:// or https:// URL")
    seconds = max(math.ceil((end - start).total_seconds()), 1)
    found: list[Series] = []
    for name in ALL_SERIES:
        query = f"{_selector(name, namespaces)}[{seconds}s]"
        if name == PROCESS_START:
            query = f"min_over_time({query})"
        data = _get(base, "/api/v1/query", {"query": query, "time": f"{end.timestamp()}"})
        for item in data.get("result", []):
            labels = dict(item["metric"])
            labels.pop("__name__", None)
            points = item["values"] if "values" in item else [item["value"]]
            samples = tuple((float(t), float(v)) for t, v in points)
            found.append(Series(name, labels, samples))
    return tuple(found)


def from_scrapes(paths: Sequence[Path]) -> tuple[Series, ...]:
    """Series from saved /metrics texts: one instance per file, at its modification time."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = set(ALL_SERIES)
    found: list[Series] = []
    for path in paths:
        try:
            text = path.read_text("utf-8")
            when = path.stat().st_mtime
            families = list(text_string_to_metric_families(text))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise SourceError(f"cannot read the scrape {path}: {exc}") from None
        samples = [s for family in families for s in family.samples if s.name in wanted]
        agent = [s.labels["spiffe_id"] for s in samples if s.name == "outrider_agent_info"]
        own_id = agent[0] if agent else ""
        for sample in samples:
            labels = {"instance": str(path), "namespace": namespace_of(own_id), **sample.labels}
            found.append(Series(sample.name, labels, ((when, float(sample.value)),)))
    return tuple(found)


def read_ca_log(path: Path) -> tuple[str, ...]:
    try:
        return tuple(path.read_text("utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the CA audit log {path}: {exc}") from None
