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
        result = data.get("result") if isinstance(data, dict) else None
        if not isinstance(result, list):
            raise SourceError(f"Prometheus at {base} answered {query} without a result list")
        found.extend(_series(name, item, base) for item in result)
    return tuple(found)


#: Sample times an audit can place: the Unix epoch to the end of year 9999.
_LATEST = 253402300799.0


def _series(name: str, item: object, base: str) -> Series:
    """One element of the API's vector or matrix result. SourceError for anything else, so
    a hostile or broken server is a usage error (exit 2), never a verdict. Samples whose
    time or value is not a finite number in range are left out (a counter cannot be one)."""
    try:
        element = _typed(item, dict)
        metric = _typed(element["metric"], dict)
        labels = {k: _typed(v, str) for k, v in metric.items() if k != "__name__"}
        points = _typed(element["values"] if "values" in element else [element["value"]], list)
        samples = tuple(
            (float(t), float(v))
            for t, v in points
            if _finite(t, 0.0, _LATEST) and _finite(v, -math.inf, math.inf)
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SourceError(
            f"Prometheus at {base} answered {name} with a result that is not the API's"
            f" vector or matrix ({type(exc).__name__} {exc}): {str(item)[:200]}"
        ) from None
    return Series(name, labels, samples)


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"{str(value)[:40]!r} is not a {kind.__name__}")
    return value


def _finite(number: object, low: float, high: float) -> bool:
    """A JSON number or numeric string, finite and within [low, high]."""
    if isinstance(number, bool) or not isinstance(number, int | float | str):
        raise TypeError(f"{number!r} is not a number")
    value = float(number)  # ValueError for text that is not one
    return math.isfinite(value) and low <= value <= high


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
        agent = [s.labels.get("spiffe_id", "") for s in samples if s.name == "outrider_agent_info"]
        own_id = agent[0] if agent else ""
        for sample in samples:
            if not math.isfinite(sample.value):  # a counter or an info series cannot be one
                continue
            labels = {"instance": str(path), "namespace": namespace_of(own_id), **sample.labels}
            found.append(Series(sample.name, labels, ((when, float(sample.value)),)))
    return tuple(found)


def read_ca_log(path: Path) -> tuple[str, ...]:
    try:
        return tuple(path.read_text("utf-8").splitlines())
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read the CA audit log {path}: {exc}") from None
