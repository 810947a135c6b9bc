"""Generate the protocol code from identity/proto/*.proto (`make proto`).

Ours (ca, control, health), the SPIFFE Workload API's (workload) and the
subset of Envoy's the agent's SDS serves (envoy_*).

`generate(out_dir)` writes NAME_pb2.py, NAME_pb2.pyi and NAME_grpc.py for each;
the drift test runs it into a temporary directory and compares with what is
committed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = (
    "ca",
    "control",
    "health",
    "workload",
    "envoy_core",
    "envoy_discovery",
    "envoy_tls",
    "envoy_sds",
)
OUTPUTS = tuple(
    f"{name}{suffix}" for name in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_grpc.py")
)


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency, imported only here

    plugin_dir = Path(sys.executable).parent
    well_known = Path(protoc.__file__).parent / "_proto"  # google/protobuf/any.proto
    args = [
        "protoc",
        f"--proto_path={PROTO_DIR}",
        f"--proto_path={well_known}",
        f"--plugin=protoc-gen-grpclib_python={plugin_dir / 'protoc-gen-grpclib_python'}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpclib_python_out={out_dir}",
        *(f"{name}.proto" for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    # protoc emits top-level imports (`import envoy_core_pb2`); the package lives in
    # identity.proto.
    for output in OUTPUTS:
        module = out_dir / output
        text = module.read_text()
        for name in PROTOS:
            text = re.sub(
                rf"^import {name}_pb2\b", f"from identity.proto import {name}_pb2", text, flags=re.M
            )
        module.write_text(text)


if __name__ == "__main__":
    generate(PROTO_DIR)
    print("generated", ", ".join(OUTPUTS), "in", PROTO_DIR.relative_to(Path.cwd()))
