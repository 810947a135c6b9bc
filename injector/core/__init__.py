"""The injector's decisions as pure functions: a pod and the settings in, a JSON patch out.

`mutate` decides and builds the patch, `annotations` reads the pod's
annotations into typed options, `sidecar` builds the agent container, and
`review` wraps it all in AdmissionReview v1. No sockets, no files.
"""

from __future__ import annotations

from injector.core.mutate import INJECTED, SKIPS, Mutation, apply_patch, mutate
from injector.core.review import (
    MUTATE,
    MUTATE_WITHOUT_CAPTURE,
    Admission,
    BadRequest,
    admit,
    decode,
    settings_for,
)
from injector.core.settings import Settings

__all__ = [
    "INJECTED",
    "MUTATE",
    "MUTATE_WITHOUT_CAPTURE",
    "SKIPS",
    "Admission",
    "BadRequest",
    "Mutation",
    "Settings",
    "admit",
    "apply_patch",
    "decode",
    "mutate",
    "settings_for",
]
