"""The path-trick table: request targets that try to reach a path the policy
denies, and the decision each must get on every port that parses requests.

One table for HTTP/1.1 (tests/integration/test_agent_http.py, both an h1 and an
h2 client on an `http` port) and h2 (tests/integration/test_agent_h2_inbound.py),
so a trick decided one way on one protocol is decided the same way on the others.
It assumes a policy that ALLOWs `/api/*` to the caller and DENYs `/api/admin*`.
"""

#: raw target -> (status, what the app receives). The app gets the very path the policy saw.
PATHS = [
    ("/api/items", 200, "/api/items"),
    ("/api//items", 200, "/api/items"),
    ("/api/./items", 200, "/api/items"),
    ("/api/%69tems", 200, "/api/items"),  # an encoded unreserved letter
    ("/api/items?next=../../admin", 200, "/api/items?next=../../admin"),
    ("/api/%252e%252e/admin", 200, "/api/%252e%252e/admin"),  # decoded once, by nobody else
    ("/api/../admin", 403, None),
    ("/api/%2e%2e/admin", 403, None),
    ("/api/%2E%2e/%2e%2E/admin", 403, None),
    ("/api\\..\\admin", 403, None),
    ("/api/admin", 403, None),
    ("/api/./admin", 403, None),
    ("//api/admin/../admin", 403, None),
    ("/API/items", 403, None),  # paths are case-sensitive
    ("/api/%2fadmin", 400, None),  # an encoded / could become a separator in the app
    ("/api/%5cadmin", 400, None),
    ("/api/items%00.json", 400, None),
    ("/api/%zz", 400, None),
    ("/api/%4", 400, None),
]
