"""Policy YAML -> Policy values, and every mistake reported with FILE:LINE:COLUMN."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.policy import Condition, Pattern, Policy, Rule
from agent.core.policyfile import (
    PolicyError,
    load_policy_files,
    parse_policies,
    parse_policy_list,
)

DOCS = Path(__file__).parents[3] / "docs" / "policy.md"

EVERY_KEY = """\
policies:
  - name: frontend-api
    action: ALLOW
    mode: dry-run
    rules:
      - name: read
        from:
          principals: ["spiffe://example.org/ns/shop/sa/frontend", "spiffe://example.org/ns/ops/*"]
          not_principals: ["spiffe://example.org/ns/ops/sa/intern"]
          namespaces: [shop]
          not_namespaces: [lab]
          trust_domains: [example.org]
          not_trust_domains: [partner.net]
        to:
          ports: [8080, "8443"]
          not_ports: [9090]
          methods: [GET, HEAD]
          not_methods: [DELETE]
          paths: ["/api/*", "*.json", /health, "/.well-known/*", "/a/.*", "*/..x"]
          not_paths: ["/api/admin/*"]
          hosts: [API.Example.org., "*.example.org"]
          not_hosts: [admin.example.org]
        when:
          - header: X-Role
            values: [reader, "ops-*"]
            not_values: [banned]
      - {}
"""


def test_every_key_parses_to_its_condition() -> None:
    (policy,) = parse_policies(EVERY_KEY, "p.yaml")
    assert (policy.name, policy.action, policy.dry_run) == ("frontend-api", "ALLOW", True)
    assert policy.source == "p.yaml:2:11"
    read, anything = policy.rules
    assert anything == Rule("rules[1]", ())
    found = {c.key: tuple(p.text for p in c.patterns) for c in read.conditions}
    assert found == {
        "principals": ("spiffe://example.org/ns/shop/sa/frontend", "spiffe://example.org/ns/ops/*"),
        "not_principals": ("spiffe://example.org/ns/ops/sa/intern",),
        "namespaces": ("shop",),
        "not_namespaces": ("lab",),
        "trust_domains": ("example.org",),
        "not_trust_domains": ("partner.net",),
        "ports": ("8080", "8443"),
        "not_ports": ("9090",),
        "methods": ("GET", "HEAD"),
        "not_methods": ("DELETE",),
        "paths": ("/api/*", "*.json", "/health", "/.well-known/*", "/a/.*", "*/..x"),
        "not_paths": ("/api/admin/*",),
        "hosts": ("api.example.org", "*.example.org"),
        "not_hosts": ("admin.example.org",),
        "when[x-role].values": ("reader", "ops-*"),
        "when[x-role].not_values": ("banned",),
    }
    assert Condition("headers", (Pattern("banned"),), True, "x-role") in read.conditions


def test_documents_and_empty_lists() -> None:
    text = """\
policies:
  - {name: a, action: DENY, rules: [{to: {paths: [/admin]}}]}
---
policies: []
---
policies:
  - {name: b, action: AUDIT, rules: [{}]}
"""
    assert [p.name for p in parse_policies(text, "f")] == ["a", "b"]


def test_an_allow_may_have_no_rules_and_names_may_carry_a_namespace() -> None:
    text = "policies:\n  - {name: shop/default-deny, action: ALLOW, rules: []}\n"
    (policy,) = parse_policies(text, "f")
    assert (policy.name, policy.action, policy.rules) == ("shop/default-deny", "ALLOW", ())


def _errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as caught:
        parse_policies(textwrap.dedent(text), "f.yaml")
    return caught.value.errors


ERRORS = [
    ("", "f.yaml:1:1: (file): is empty; expected a mapping with a `policies:` list"),
    ("# only a comment\n", "f.yaml:1:1: (file): is empty"),
    ("- name: a\n", "f.yaml:1:1: (top): is not a mapping; expected keys among policies"),
    ("policy: []\n", "f.yaml:1:1: policy: unknown key (did you mean 'policies'?)"),
    ("policies: {}\n", "f.yaml:1:11: policies: is not a list"),
    (
        "policies:\n  - name: a\n    action: allow\n    rules: [{}]\n",
        "f.yaml:3:13: policies[0].action: 'allow' is not an action; expected ALLOW, DENY or AUDIT",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, mode: dryrun, rules: [{}]}\n",
        "f.yaml:2:36: policies[0].mode: 'dryrun' is not a mode; expected dry-run or enforce",
    ),
    (
        "policies:\n  - {name: a, action: AUDIT, mode: dry-run, rules: [{}]}\n",
        "f.yaml:2:5: policies[0]: an AUDIT policy never enforces, so it cannot be a dry run",
    ),
    (
        "policies:\n  - {name: default, action: ALLOW, rules: [{}]}\n",
        "policies[0]: 'default' is reserved",
    ),
    ("policies:\n  - {name: 'a b', action: ALLOW, rules: [{}]}\n", "policies[0].name: 'a b'"),
    ("policies:\n  - {name: a, action: ALLOW}\n", "f.yaml:2:5: policies[0]: missing key 'rules'"),
    (
        "policies:\n  - {name: a, action: DENY, rules: []}\n",
        "f.yaml:2:36: policies[0].rules: is empty; expected at least one rule ({} is a rule that"
        " matches every request; only an ALLOW policy may have none, and then it allows nothing)",
    ),
    (
        "policies:\n  - {name: a, action: AUDIT, rules: []}\n",
        "policies[0].rules: is empty; expected at least one rule",
    ),
    ("policies:\n  - {name: a/b/c, action: ALLOW, rules: []}\n", "(or NAMESPACE/NAME)"),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{from: {}}]}\n",
        "policies[0].rules[0].from: is empty; expected a field (or leave it out to match any",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{from: {namespace: [x]}}]}\n",
        "f.yaml:2:46: policies[0].rules[0].from.namespace: unknown key (did you mean"
        " 'namespaces'?)",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {ports: 8080}}]}\n",
        "policies[0].rules[0].to.ports: is not a list",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {ports: []}}]}\n",
        "policies[0].rules[0].to.ports: is empty; expected at least one value",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {ports: [0, x, yes]}}]}\n",
        "to.ports[0]: port 0 is out of range",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {methods: [get]}}]}\n",
        "to.methods[0]: 'get' is not an HTTP method; expected an upper-case method such as 'GET'",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: [/a/../b]}}]}\n",
        "f.yaml:2:52: policies[0].rules[0].to.paths[0]: '/a/../b' never matches, because"
        " requests are matched after normalization; expected the normalized form '/b'",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: ['/%61pi/*']}}]}\n",
        "expected the normalized form '/api/*'",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: ['*//x']}}]}\n",
        "expected the normalized form '*/x'",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: ['/a/../*']}}]}\n",
        "'/a/../*' never matches, because requests are matched after normalization;"
        " expected the normalized form '/*'",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: ['*/./x']}}]}\n",
        "expected the normalized form '*/x'",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: [/a*b]}}]}\n",
        "'/a*b' has a '*' inside; patterns are literal",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: ['/a?x']}}]}\n",
        "paths are matched without them",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: ['/a%2Fb']}}]}\n",
        "encoded '/'",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {hosts: ['a.org:80']}}]}\n",
        "'a.org:80' has a port",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {hosts: ['*example.org']}}]}\n",
        "expected a host name such as api.example.com, or *.example.com",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{from: {principals: ['spiffe://td*']}}]}\n",
        "'spiffe://td*' is not a SPIFFE ID pattern",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{from: {principals: ['td/ns/a']}}]}\n",
        "must start with 'spiffe://'; expected a SPIFFE ID",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{from: {trust_domains: [TD]}}]}\n",
        "trust domain 'TD' must be lowercase; expected a trust domain name",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{from: {namespaces: ['a*']}}]}\n",
        "'a*' is not a namespace",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{when: [{header: x, values: [on]}]}]}\n",
        "when[0].values[0]: True is not a non-empty string (quote it: YAML reads it as a boolean)",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{when: [{header: Host, values: [a]}]}]}\n",
        "when[0].header: header 'host' cannot be matched; expected to.hosts",
    ),
    (
        "policies:\n  - {name: a, action: DENY, rules: [{when: [{header: X_Role, values: [a]}]}]}"
        "\n",
        "when[0].header: header 'x_role' never reaches a rule (it has '_'); expected 'x-role'",
    ),
    (
        "policies:\n  - {name: a, action: DENY, rules: [{when: [{header: x.role, values: [a]}]}]}"
        "\n",
        "when[0].header: header 'x.role' never reaches a rule (it has '.'); expected 'x-role'",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {hosts: ['...']}}]}\n",
        "'...' is not a host name",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{when: [{header: x}]}]}\n",
        "when[0]: has no values or not_values",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{when: [{header: x, values: ['a,']}]}]}\n",
        "'a,' has a ','",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{name: r}, {name: r}]}\n",
        "rule names must be unique within policy 'a'",
    ),
    (
        "policies:\n  - {name: a, action: DENY, action: ALLOW, rules: [{}]}\n",
        "f.yaml:2:29: policies[0].action: duplicate key",
    ),
    (
        "policies:\n  - {name: a, action: ALLOW, rules: [{to: {paths: [*.php]}}]}\n",
        "f.yaml:2:53: (yaml): expected alphabetic or numeric character, but found '.';"
        " expected valid YAML (quote values that start with '*'",
    ),
    ("policies: [\n", "f.yaml:2:1: (yaml): "),
    (
        "policies:\n  - name: a\n    action: ALLOW\n    rules:\n      - to:\n          paths:\n"
        "            - *php\n",
        "f.yaml:7:15: (yaml): found undefined alias 'php'; expected valid YAML (quote values",
    ),
    (
        "policies:\n  - name: a\n    action: ALLOW\n    rules: [{}]\n"
        "  - {name: a, action: DENY, rules: [{}]}\n",
        "f.yaml:5:12: name: duplicate policy name 'a' (first at f.yaml:2:11)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS)
def test_a_mistake_is_reported_where_it_is(text: str, expected: str) -> None:
    errors = _errors(text)
    assert any(expected in error for error in errors), errors


def test_every_error_is_reported_at_once() -> None:
    text = """\
        policies:
          - name: a
            action: allow
            rules:
              - from: {principals: [nope]}
                to: {methods: [get], ports: [99999]}
          - name: b
            rules: [{}]
        """
    errors = _errors(text)
    assert [e.split(": ")[0] for e in errors] == [
        "f.yaml:3:13",
        "f.yaml:5:29",
        "f.yaml:6:24",
        "f.yaml:6:38",
        "f.yaml:7:5",
    ]


def test_files_load_in_order_and_names_are_unique_across_them(tmp_path: Path) -> None:
    one, two = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one.write_text("policies:\n  - {name: a, action: DENY, rules: [{}]}\n")
    two.write_text("policies:\n  - {name: b, action: ALLOW, rules: [{}]}\n")
    assert [p.name for p in load_policy_files([one, two])] == ["a", "b"]
    two.write_text("policies:\n  - {name: a, action: ALLOW, rules: [{}]}\n")
    with pytest.raises(PolicyError) as caught:
        load_policy_files([one, two])
    assert caught.value.errors == [
        f"{two}:2:12: name: duplicate policy name 'a' (first at {one}:2:12);"
        " expected names unique across all policy files"
    ]


def test_unreadable_files_are_errors_too(tmp_path: Path) -> None:
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError) as caught:
        load_policy_files([tmp_path / "missing.yaml", binary])
    missing, undecodable = caught.value.errors
    assert missing.startswith(f"{tmp_path / 'missing.yaml'}:1:1: cannot read the file:")
    assert undecodable.startswith(f"{binary}:1:1: cannot read the file:")


def test_every_policy_example_in_the_docs_parses() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    examples = [b for b in blocks if b.startswith("policies:") and "[...]" not in b]
    assert len(examples) >= 5
    for example in examples:
        assert parse_policies(example, str(DOCS))


# -- policies as data (agent.yaml's policy.policies, the control plane's snapshots) ---------


def test_a_list_of_mappings_parses_like_the_file_it_would_be() -> None:
    data = [
        {"name": "shop/default-deny", "action": "ALLOW", "rules": []},
        {
            "name": "shop/frontend-reads-api",
            "action": "ALLOW",
            "mode": "dry-run",
            "rules": [
                {
                    "from": {"principals": ["spiffe://example.org/ns/shop/sa/frontend"]},
                    "to": {"ports": [8080], "methods": ["GET"], "paths": ["/api/*"]},
                }
            ],
        },
    ]
    from_data = parse_policy_list(data, "snapshot")
    from_text = parse_policies(yaml.safe_dump({"policies": data}, sort_keys=False), "f.yaml")
    assert from_data == from_text  # `source` is not compared
    assert [p.source for p in from_data] == ["snapshot: policies[0]", "snapshot: policies[1]"]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"policies": []}, "snapshot: policies: is not a list"),
        ([3], "snapshot: policies[0]: is not a mapping"),
        ([{"name": "a", "action": "ALLOW"}], "snapshot: policies[0]: missing key 'rules'"),
        (
            [{"name": "a", "action": "DENY", "rules": []}],
            "snapshot: policies[0].rules: is empty; expected at least one rule",
        ),
        (
            [{"name": "a", "action": "ALLOW", "rules": [{"to": {"paths": ["/a/../b"]}}]}],
            "snapshot: policies[0].rules[0].to.paths[0]: '/a/../b' never matches",
        ),
        (
            [{"name": "a", "action": "ALLOW", "rules": [{"to": {"ports": [True]}}]}],
            "snapshot: policies[0].rules[0].to.ports[0]: True is not a port",
        ),
        (
            [{"name": "a", "action": "ALLOW", "rules": [{"from": {"namespace": ["x"]}}]}],
            "snapshot: policies[0].rules[0].from.namespace: unknown key (did you mean",
        ),
        (
            [{"name": "a", "action": "ALLOW", "rules": []}] * 2,
            "snapshot: policies[1]: name: duplicate policy name 'a' (first at snapshot:"
            " policies[0])",
        ),
        ([object()], "snapshot: policies[0]: is not a mapping"),
        (
            [{"name": "a", "action": "ALLOW", "rules": [{"to": {"methods": [object()]}}]}],
            "snapshot: policies[0].rules[0].to.methods[0]: <object object",
        ),
    ],
)
def test_data_errors_name_the_key_path(data: object, expected: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy_list(data, "snapshot")
    assert any(error.startswith(expected) for error in caught.value.errors), caught.value.errors


@settings(max_examples=300)
@given(st.data())
def test_a_damaged_file_gets_errors_with_locations_not_a_crash(data: st.DataObject) -> None:
    text = EVERY_KEY
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 4))
        insert = data.draw(st.sampled_from(["", "-", ":", " ", "\n", "*", "{", "'", "x", "  "]))
        text = text[:at] + insert + text[at + cut :]
    try:
        policies = parse_policies(text, "f.yaml")
    except PolicyError as exc:
        assert exc.errors
        assert all(re.match(r"f\.yaml:\d+:\d+: \S", error) for error in exc.errors), exc.errors
    else:
        assert all(isinstance(policy, Policy) for policy in policies)
