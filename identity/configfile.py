"""What every Outrider config file shares: YAML in, every error at once, out.

Each component (ca.yaml, agent.yaml, ...) turns raw YAML into frozen
dataclasses in one function. `ConfigReader` collects the problems as it goes,
each with its key path (`upstreams[2].endpoints: ...`), so a user fixes the
whole file in one pass instead of one error per restart.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ConfigError", "ConfigReader", "Listen", "parse_duration", "parse_yaml", "read_yaml"]

#: Go's time.ParseDuration units (`µs` in either spelling), plus `d`, which configs
#: have always taken, in nanoseconds: integers, so `0.1s` is exact, as in Go.
_UNITS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 MICRO SIGN
    "μs": 1_000,  # U+03BC GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
    "d": 86_400_000_000_000,
}
#: Go's longest duration, int64 nanoseconds (2562047h47m16.854775807s): a longer one is
#: refused, as Go refuses it, rather than overflow timedelta or a datetime later on.
_LONGEST_NANOS = 2**63 - 1
_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h|d)")


class ConfigError(Exception):
    """One or more config errors, each `key.path: problem`."""

    def __init__(self, source: str, errors: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(errors))
        self.source = source
        self.errors = errors


@dataclass(frozen=True)
class Listen:
    """A host and port; port 0 asks the kernel for a free one."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def clashes(self, other: Listen) -> bool:
        """The kernel would refuse to bind both: one port (not 0) on one address, or under a
        wildcard that takes it too (0.0.0.0 every IPv4 address, a dual-stack :: every one)."""
        if self.port == 0 or self.port != other.port:
            return False
        hosts = {self.host, other.host}
        if len(hosts) == 1 or "::" in hosts:
            return True
        return "0.0.0.0" in hosts and not any(":" in host for host in hosts)  # noqa: S104

    @classmethod
    def parse(cls, value: object) -> Listen:
        host, _, port = str(value).rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{value!r} is not host:port")
        return cls(host.strip("[]"), int(port))


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host`: where a listener that takes plain text (an agent
    snapshot's outbound) or a `--dev` CA must be bound, and where decrypted traffic may go."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_duration(value: object) -> timedelta:
    """A Go duration (`time.ParseDuration`: `1h30m`, `1.5s`, `500ms`, `0`) or days (`2d`)
    -> timedelta. The one parser of durations: every config key, flag and route timeout
    reads through it. Never negative; exact to the microsecond (`1.5s` is not a float),
    and a value that is not zero but shorter than a microsecond is refused, not rounded
    to nothing."""
    text = value.strip() if isinstance(value, str) else str(value) if _is_int(value) else None
    if text == "0":
        return timedelta(0)
    parts = _PART.findall(text) if text else []
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"{value!r} is not a duration like 90s, 1h30m, 1.5s, 500ms or 2d")
    too_long = ValueError(f"{value!r} is longer than 2562047h (about 292 years)")
    if any(len(number.partition(".")[0]) > len(str(_LONGEST_NANOS)) for number, _ in parts):
        raise too_long  # before int() reads thousands of digits
    nanos = sum(_nanoseconds(number, _UNITS[unit]) for number, unit in parts)
    if nanos > _LONGEST_NANOS:
        raise too_long
    if nanos < 1000 and any(digit in "123456789" for number, _ in parts for digit in number):
        raise ValueError(f"{value!r} is shorter than a microsecond")
    return timedelta(microseconds=(nanos + 500) // 1000)


def _nanoseconds(number: str, unit: int) -> int:
    """`1.5` of `unit` nanoseconds, in whole nanoseconds (a finer fraction dropped, as Go)."""
    whole, _, fraction = number.partition(".")
    fraction = fraction[:20]  # finer than a nanosecond of a day: dropped, as Go drops it
    scale: int = 10 ** len(fraction)
    return int(whole or 0) * unit + int(fraction or 0) * unit // scale


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_yaml(path: Path) -> object:
    """The parsed document (an empty file is an empty mapping); ConfigError if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read: {exc}"]) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> object:
    """The parsed document (empty text is an empty mapping); ConfigError if malformed."""
    try:
        raw = yaml.safe_load(text)
    except yaml.composer.ComposerError as exc:
        if exc.problem and "but found another document" in exc.problem:
            raise ConfigError(source, [f"cannot read: {SEVERAL_DOCUMENTS}"]) from None
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"cannot read: {exc}"]) from None
    return raw if raw is not None else {}


#: A Kubernetes manifest given as a config (deploy/base/injector.yaml is the first a user
#: finds): what is wrong and how to take the config out of it.
SEVERAL_DOCUMENTS = (
    "several YAML documents (---), a config is one: in a Kubernetes manifest the config"
    " is the text under a ConfigMap's data (from a cluster: kubectl get configmap NAME"
    " -o jsonpath='{.data.KEY}' > FILE, with KEY's dots escaped as \\.)"
)


class ConfigReader:
    """Reads typed values out of raw mappings, collecting errors instead of stopping.

    `base` is the directory relative file paths are resolved against (the
    config file's own directory).
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.errors: list[str] = []

    def fail(self, key: str, problem: str) -> None:
        self.errors.append(f"{key}: {problem}")

    def check(self, source: str) -> None:
        if self.errors:
            raise ConfigError(source, self.errors)

    def section(self, raw: Mapping[str, Any], key: str, known: set[str]) -> dict[str, Any]:
        """The mapping under the last part of `key` (empty if absent); unknown keys are errors."""
        value = raw.get(key.rsplit(".", 1)[-1], {})
        return self.mapping(value, key, known)

    def mapping(self, value: object, key: str, known: set[str]) -> dict[str, Any]:
        """`value` as a dict; `key` is its path, "" for the whole document."""
        if not isinstance(value, Mapping):
            self.fail(key or "(top)", "must be a mapping")
            return {}
        for unknown in sorted(set(value) - known):
            self.fail(f"{key}.{unknown}" if key else str(unknown), "unknown key")
        return dict(value)

    def duration(
        self,
        raw: Mapping[str, Any],
        key: str,
        path: str,
        default: timedelta,
        *,
        zero_ok: bool = False,
    ) -> timedelta:
        if key not in raw:
            return default
        try:
            value = parse_duration(raw[key])
        except ValueError as exc:
            self.fail(path, str(exc))
            return default
        if value == timedelta(0) and not zero_ok:
            self.fail(path, "must be positive")
            return default  # 0 would fail the settings' own checks before the errors are told
        return value

    def string(
        self, raw: Mapping[str, Any], key: str, path: str, default: str | None
    ) -> str | None:
        value = raw.get(key, default)
        if value is not None and (not isinstance(value, str) or not value):
            self.fail(path, "must be a non-empty string")
            return default
        return value

    def integer(
        self, raw: Mapping[str, Any], key: str, path: str, default: int, *, minimum: int = 1
    ) -> int:
        value = raw.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.fail(path, f"must be an integer >= {minimum}")
            return default
        return value

    def flag(self, raw: Mapping[str, Any], key: str, path: str, default: bool = False) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(path, "must be true or false")
            return default
        return value

    def file(self, raw: Mapping[str, Any], key: str, path: str) -> Path | None:
        value = self.string(raw, key, path, None)
        return None if value is None else self.base / value

    def listen(self, raw: Mapping[str, Any], key: str, path: str, default: Listen) -> Listen:
        if raw.get(key) is None:
            return default
        try:
            return Listen.parse(raw[key])
        except ValueError as exc:
            self.fail(path, str(exc))
            return default

    def items(self, raw: Mapping[str, Any], key: str, path: str) -> list[Any]:
        value = raw.get(key, [])
        if not isinstance(value, list):
            self.fail(path, "must be a list")
            return []
        return value
