"""A caller's text made fit for a log line: what an agent or a pod's process sends."""

from __future__ import annotations


def printable(text: str, limit: int) -> str:
    """The caller's `text`, cut to `limit` characters, its lines joined with "; " and any
    other character that is not printable (terminal escapes) left out."""
    lines = (line.strip() for line in text[:limit].splitlines())
    return "; ".join(line for line in lines if line).translate(_UNPRINTABLE)


def quoted(text: str, limit: int = 64) -> str:
    """A caller's claim quoted for an error message: cut to `limit` characters, escaped by
    repr (a message that echoed it whole would be as long as the caller liked)."""
    return repr(text[:limit])


class _Unprintable(dict[int, None]):
    def __missing__(self, code: int) -> None:
        if chr(code).isprintable():
            raise LookupError(code)  # str.translate keeps the character


_UNPRINTABLE = _Unprintable()
