"""Running `nft`: applying a capture script, reading the table back.

The script itself comes from identity/capture.py; this shell only runs the
program and turns its failures into what the operator can do about them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from identity.capture import FAMILY, TABLE

NOT_INSTALLED = "`nft` is not installed: the agent image carries nft; install nftables"
#: What `capture apply` needs, and where it has it.
CAPABILITIES = (
    "it needs NET_ADMIN and NET_RAW: run it as the outrider-capture init container the"
    " injector adds"
)
NOT_PERMITTED = f"nft was not permitted: {CAPABILITIES}"


class NftError(Exception):
    """nft is missing, not permitted, or refused the script; the message says which.

    `not_permitted` holds what nft said when it lacked the capabilities, so that a
    command other than `apply` can say what to do instead."""

    def __init__(self, message: str, not_permitted: str | None = None) -> None:
        super().__init__(message)
        self.not_permitted = not_permitted


@dataclass(frozen=True)
class Nft:
    """The `nft` program; `command` may put a prefix before it (tests enter a pod)."""

    command: Sequence[str] = ("nft",)
    timeout: float = 10.0

    def apply(self, script: str) -> None:
        """Apply `script` in one transaction: all of it or, on any error, none."""
        self._run(["-f", "-"], script)

    def table(self) -> dict[str, Any] | None:
        """`nft -j list table` of the capture table, or None when there is none."""
        try:
            out = self._run(["-j", "list", "table", FAMILY, TABLE])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise
        listing: dict[str, Any] = json.loads(out)
        return listing

    def listing(self) -> str | None:
        """The capture table as nft prints it, or None when there is none."""
        try:
            return self._run(["list", "table", FAMILY, TABLE])
        except NftError as exc:
            if "No such file or directory" in str(exc):
                return None
            raise

    def _run(self, args: Sequence[str], script: str | None = None) -> str:
        argv = [*self.command, *args]
        try:
            done = subprocess.run(
                argv, input=script, capture_output=True, text=True, timeout=self.timeout
            )
        except FileNotFoundError:
            raise NftError(NOT_INSTALLED) from None
        except subprocess.TimeoutExpired:
            raise NftError(f"`{' '.join(argv)}` did not finish in {self.timeout:g}s") from None
        if done.returncode == 0:
            return done.stdout
        said = done.stderr.strip()
        if "Operation not permitted" in said:
            line = next(line for line in said.splitlines() if "Operation not permitted" in line)
            raise NftError(f"{NOT_PERMITTED} (nft said: {line.strip()})", line.strip())
        if done.returncode == 127:  # a prefix (nsenter, env) found no nft to run
            raise NftError(NOT_INSTALLED)
        raise NftError(f"`{' '.join(argv)}` failed: {said}")
