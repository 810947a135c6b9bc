"""py-spiffe's X509Source on the agent's socket: `python spiffe_client.py SOCKET UPDATES TIMEOUT`.

A real SPIFFE client (the `spiffe` package, over grpcio), run as a process of its
own by tests/workload_api.py: its generated workload.proto and Outrider's declare
the same messages, which one protobuf descriptor pool cannot hold twice. Prints
one JSON line for the SVID it starts with and one for each update, on the one
connection it opened: {"serial", "spiffe_id", "verified", "at"} (`verified`: the
chain verifies against the bundle it was sent with; `at`: time.time()). Exits 0
after UPDATES updates, 1 on a timeout.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import UTC, datetime

from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import X509Source


def verified(source: X509Source) -> bool:
    svid = source.svid
    bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    if bundle is None:
        return False
    store = Store(list(bundle.x509_authorities))
    verifier = PolicyBuilder().store(store).time(datetime.now(UTC)).build_client_verifier()
    try:
        verifier.verify(svid.leaf, svid.cert_chain[1:])
    except Exception as exc:
        print(json.dumps({"error": repr(exc)}), file=sys.stderr, flush=True)
        return False
    return True


def report(source: X509Source) -> None:
    svid = source.svid
    line = {
        "serial": f"{svid.leaf.serial_number:x}",
        "spiffe_id": str(svid.spiffe_id),
        "verified": verified(source),
        "at": time.time(),
    }
    print(json.dumps(line), flush=True)


def main(socket_path: str, updates: int, timeout: float) -> int:
    done = threading.Semaphore(0)
    source = X509Source(socket_path=f"unix://{socket_path}", timeout_in_seconds=timeout)
    report(source)

    def updated() -> None:
        report(source)
        done.release()

    source.subscribe_for_updates(updated)
    try:
        for _ in range(updates):
            if not done.acquire(timeout=timeout):
                return 1
        return 0
    finally:
        source.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
