"""AdmissionReview v1 bytes in, AdmissionReview response out (k8s.io/api/admission/v1).

`decode` bounds what the JSON parser is asked to do: Python's json module
recurses once per nesting level, and each array or object costs memory, so
both are counted on the raw bytes first, outside strings, and a document
nested too deep or holding too many is refused before it is parsed. `admit`
never answers `allowed: false`: a pod that makes the mutation fail is let
through unchanged, with a warning, and counted as an error. Only a request
that is not an AdmissionReview at all gets an HTTP error, since it has no
uid to answer to.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from identity.jsonbounds import brackets, deeper_than, nesting_exceeds
from injector.core.mutate import INJECTED, Mutation, mutate
from injector.core.settings import Settings

__all__ = [
    "MUTATE",
    "MUTATE_WITHOUT_CAPTURE",
    "Admission",
    "BadRequest",
    "admit",
    "decode",
    "nesting_exceeds",
    "settings_for",
]

API_VERSION = "admission.k8s.io/v1"
_POD = {"group": "", "version": "v1", "kind": "Pod"}
_FAILED = "outrider: not injected: internal error in the injector"
#: Arrays and objects per review. A recorded pod, managedFields included, has
#: about a hundred; a 3 MB body of `[],[],...` has a million and parses to ~70 MB.
MAX_CONTAINERS = 100_000


class BadRequest(Exception):
    """Not an AdmissionReview we can answer: an HTTP 4xx with a bounded `reason`."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class Admission:
    """The AdmissionReview to send back, and how to count and log it."""

    review: dict[str, Any]
    result: str  # injected, skipped or error
    reason: str  # INJECTED, a key of mutate.SKIPS, not_a_pod or error
    pod: str  # namespace/name (or generateName), printable, for logs
    error: Exception | None = None  # what made the mutation fail, for the log


#: The webhook's paths: /mutate, and the same mutation without capture for the namespaces
#: labelled outrider.io/capture=disabled (deploy/base/webhook.yaml's second webhook). A
#: path, not a query: the API server refuses a webhook whose service path holds anything
#: but DNS-1123 segments, `?` and `=` included, and with it the whole configuration.
MUTATE = "/mutate"
MUTATE_WITHOUT_CAPTURE = "/mutate/capture-disabled"


def settings_for(settings: Settings, path: str, query: Sequence[tuple[str, str]]) -> Settings:
    """The settings a webhook path asks for: MUTATE_WITHOUT_CAPTURE is the webhook for
    the namespaces labelled outrider.io/capture=disabled.

    A query is refused: the API server never sends one (a webhook's path cannot hold
    it), and a caller that guesses `?capture=disabled` must be told, loudly, rather
    than have a namespace quietly captured (or not) against the label's word.
    """
    if query:
        raise BadRequest(
            "bad_query",
            f"{MUTATE} takes no query: a namespace labelled outrider.io/capture=disabled "
            f"is sent to {MUTATE_WITHOUT_CAPTURE}",
        )
    return settings.without_capture() if path == MUTATE_WITHOUT_CAPTURE else settings


def decode(body: bytes, max_depth: int) -> dict[str, Any]:
    found = brackets(body)
    if len(found) > 2 * MAX_CONTAINERS:  # parsed, each costs ~100 bytes of memory
        raise BadRequest("too_large", f"more than {MAX_CONTAINERS} arrays and objects", 413)
    if deeper_than(found, max_depth):
        raise BadRequest("too_deep", f"JSON nested more than {max_depth} levels deep")
    try:
        review = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("malformed", "the body is not JSON") from None
    if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
        raise BadRequest("malformed", "the body is not an AdmissionReview")
    if review.get("apiVersion") != API_VERSION:
        raise BadRequest("malformed", f"only {API_VERSION} AdmissionReviews are served")
    request = review.get("request")
    if not isinstance(request, dict) or not isinstance(request.get("uid"), str):
        raise BadRequest("malformed", "the AdmissionReview has no request.uid")
    return review


def admit(review: Mapping[str, Any], settings: Settings) -> Admission:
    """The response to a decoded AdmissionReview; never `allowed: false`."""
    request = review["request"]
    response: dict[str, Any] = {"uid": request["uid"], "allowed": True}
    answer = {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
    pod = request.get("object")
    if (
        request.get("kind") != _POD
        or request.get("subResource")
        or request.get("operation") != "CREATE"
    ):
        return Admission(answer, "skipped", "not_a_pod", "-")
    namespace = request.get("namespace") or _get(pod, "metadata", "namespace") or ""
    where = _pod_name(namespace, pod)
    error = None
    try:
        mutation = mutate(pod, str(namespace), settings)
    except Exception as exc:  # the injector's failure must not block the pod
        error = exc
        mutation = Mutation("error", (), (_FAILED,))
    if mutation.patch:
        patch = json.dumps(mutation.patch, separators=(",", ":")).encode()
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(patch).decode()
    if mutation.warnings:
        response["warnings"] = list(mutation.warnings)
    response["auditAnnotations"] = {"injection": mutation.reason}
    result = mutation.reason if mutation.reason in (INJECTED, "error") else "skipped"
    return Admission(answer, result, mutation.reason, where, error)


def _get(value: Any, *keys: str) -> Any:
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _pod_name(namespace: object, pod: Mapping[str, Any]) -> str:
    """`namespace/name`, or `namespace/generateName*` before the API server names the pod."""
    name = _get(pod, "metadata", "name")
    shown = f"{name}" if name else f"{_get(pod, 'metadata', 'generateName') or ''}*"
    text = f"{namespace}/{shown}"[:120]
    return "".join(c if c.isprintable() and c.isascii() else "?" for c in text)
