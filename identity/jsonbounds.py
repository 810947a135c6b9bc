"""How much work a JSON document asks of the parser, counted on its bytes before parsing.

Python's json module recurses once per nesting level and each array or object
costs memory, so a body from outside (an AdmissionReview, a control-plane
snapshot) is measured first, outside strings, and one nested too deep or
holding too many containers is refused before `json.loads` sees it.
"""

from __future__ import annotations

import re

__all__ = ["brackets", "containers", "deeper_than", "nesting_exceeds"]

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_OPEN = frozenset(b"[{")


def brackets(body: bytes) -> bytes:
    """The document's brackets, in order: strings cut out first, then everything else.

    Malformed JSON may be miscounted, but only in ways the parser then refuses
    on its own.
    """
    return _STRING.sub(b"", body).translate(None, _NOT_BRACKET)


def containers(body: bytes) -> int:
    """How many arrays and objects the document holds, as its parser would make them."""
    return len(brackets(body)) // 2


def deeper_than(found: bytes, limit: int) -> bool:
    """Whether the brackets `found` nest more than `limit` deep."""
    depth = 0
    for byte in found:
        if byte in _OPEN:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def nesting_exceeds(body: bytes, limit: int) -> bool:
    """Whether JSON `body` nests arrays and objects more than `limit` deep."""
    return deeper_than(brackets(body), limit)
