"""AdmissionReview decoding and answering: bounded parsing, and never `allowed: false`."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from injector.core import BadRequest, Settings, admit, decode
from injector.core.review import MAX_CONTAINERS, nesting_exceeds

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "admission"
SETTINGS = Settings()


def recorded(name: str = "deployment_pod") -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n\u00e9', max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(json_values, st.integers(0, 12))
def test_nesting_is_counted_as_the_parser_would_see_it(value: Any, limit: int) -> None:
    # Strings full of brackets, quotes and backslashes must not count.
    body = json.dumps(value, ensure_ascii=False).encode()
    assert nesting_exceeds(body, limit) is (depth(value) > limit)


def test_a_deep_document_is_refused_before_parsing_and_fast() -> None:
    body = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    started = time.perf_counter()
    with pytest.raises(BadRequest) as refused:
        decode(body, 64)
    assert time.perf_counter() - started < 0.1
    assert (refused.value.reason, refused.value.status) == ("too_deep", 400)
    assert "64" in str(refused.value)


def test_an_unbalanced_deep_document_is_refused_too() -> None:
    with pytest.raises(BadRequest, match="nested"):
        decode(b"[" * 100_000, 64)


def test_a_document_of_too_many_arrays_is_refused_before_parsing_and_fast() -> None:
    body = b"[" + b"[]," * 1_000_000 + b"[]]"  # 3 MB that would parse to ~70 MB
    started = time.perf_counter()
    with pytest.raises(BadRequest) as refused:
        decode(body, 64)
    assert time.perf_counter() - started < 0.2
    assert (refused.value.reason, refused.value.status) == ("too_large", 413)
    assert str(refused.value) == f"more than {MAX_CONTAINERS} arrays and objects"


def test_arrays_and_objects_up_to_the_limit_are_parsed() -> None:
    inner = b",".join([b"{}"] * (MAX_CONTAINERS - 2))
    body = b'{"kind": "AdmissionReview", "x": [' + inner + b"]}"
    with pytest.raises(BadRequest) as refused:
        decode(body, 64)
    assert str(refused.value) == "only admission.k8s.io/v1 AdmissionReviews are served"


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'{"kind": "Pod"}',
        b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}}',
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}',
        b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": 1}}',
    ],
)
def test_what_is_not_an_admission_review_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest) as refused:
        decode(body, 64)
    assert (refused.value.reason, refused.value.status) == ("malformed", 400)


@pytest.mark.parametrize(
    "change",
    [
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
        {"subResource": "status"},
        {"operation": "UPDATE"},
    ],
)
def test_anything_but_a_pod_create_is_allowed_untouched(change: dict[str, Any]) -> None:
    review = recorded()
    review["request"].update(change)
    admission = admit(review, SETTINGS)
    assert admission.review["response"] == {"uid": review["request"]["uid"], "allowed": True}
    assert (admission.result, admission.reason) == ("skipped", "not_a_pod")


@pytest.mark.parametrize(
    "pod",
    [
        "a string",
        {"spec": {"containers": "app"}},
        {"metadata": {"annotations": "outrider.io/inject"}, "spec": {}},
        {"spec": {"containers": [], "volumes": ["data"]}},
    ],
)
def test_a_pod_that_makes_the_mutation_fail_is_allowed_unchanged(pod: Any) -> None:
    review = recorded()
    review["request"]["object"] = pod
    admission = admit(review, SETTINGS)
    response = admission.review["response"]
    assert response["allowed"] is True
    assert "patch" not in response
    assert response["warnings"] == ["outrider: not injected: internal error in the injector"]
    assert (admission.result, admission.reason) == ("error", "error")
    assert admission.error is not None


def test_a_namespace_that_cannot_be_in_a_spiffe_id_is_an_error_not_a_refusal() -> None:
    review = recorded()
    review["request"]["namespace"] = "a/b"
    del review["request"]["object"]["metadata"]["namespace"]
    admission = admit(review, SETTINGS)
    assert admission.review["response"]["allowed"] is True
    assert admission.reason == "error"


def test_the_patch_is_base64_json_patch() -> None:
    response = admit(recorded(), SETTINGS).review["response"]
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    assert {op["op"] for op in ops} == {"add"}


def test_the_pod_is_named_for_logs_printably() -> None:
    review = recorded()
    review["request"]["object"]["metadata"]["generateName"] = "web-\n\x1b[31mred-"
    assert admit(review, SETTINGS).pod == "shop/web-??[31mred-*"
    assert admit(recorded("init_containers"), SETTINGS).pod == "shop/orders"
