"""Kubernetes objects checked against the kubernetes client's models.

No API server runs here, so the client's generated models (one per API type,
from the OpenAPI spec) stand in for its schema: an object that deserializes
and serializes back with every key intact is one the API server would accept
field for field.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client

_API = client.ApiClient()


def model_name(obj: dict[str, Any]) -> str:
    """`V1Deployment` for {"apiVersion": "apps/v1", "kind": "Deployment"}."""
    version = obj["apiVersion"].rsplit("/", 1)[-1]  # models are named by version only
    return version.capitalize() + obj["kind"]


def to_model(obj: dict[str, Any], name: str | None = None) -> Any:
    """The client model for `obj`; raises ValueError naming each key the model lacks."""
    name = name or model_name(obj)
    model = _API._ApiClient__deserialize(obj, name)  # type: ignore[attr-defined]
    lost = unknown_fields(obj, _API.sanitize_for_serialization(model))
    if lost:
        raise ValueError(f"{name}: fields the API does not know: {', '.join(lost)}")
    return model


def unknown_fields(original: Any, round_trip: Any, path: str = "") -> list[str]:
    """Key paths present in `original` but dropped by the model round trip."""
    if isinstance(original, dict):
        if not isinstance(round_trip, dict):
            return [path or "."]
        lost = []
        for key, value in original.items():
            where = f"{path}.{key}" if path else key
            if key not in round_trip:
                if value not in (None, {}, []):
                    lost.append(where)
            else:
                lost.extend(unknown_fields(value, round_trip[key], where))
        return lost
    if isinstance(original, list) and isinstance(round_trip, list):
        return [
            lost
            for index, (a, b) in enumerate(zip(original, round_trip, strict=False))
            for lost in unknown_fields(a, b, f"{path}[{index}]")
        ]
    return []
