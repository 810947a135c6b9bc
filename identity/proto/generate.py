"""Generate the protocol code from ca.proto, control.proto and health.proto (`make proto`).

`generate(out_dir)` writes NAME_pb2.py, NAME_pb2.pyi and NAME_grpc.py for each;
the drift test runs it into a temporary directory and compares with what is
committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTOS = ("ca", "control", "health")
OUTPUTS = tuple(
    f"{name}{suffix}" for name in PROTOS for suffix in ("_pb2.py", "_pb2.pyi", "_grpc.py")
)


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc  # dev dependency, imported only here

    plugin_dir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--proto_path={PROTO_DIR}",
        f"--plugin=protoc-gen-grpclib_python={plugin_dir / 'protoc-gen-grpclib_python'}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpclib_python_out={out_dir}",
        *(f"{name}.proto" for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    # protoc emits top-level imports; the package lives in identity.proto.
    for name in PROTOS:
        grpc_module = out_dir / f"{name}_grpc.py"
        text = grpc_module.read_text()
        grpc_module.write_text(
            text.replace(f"import {name}_pb2\n", f"from identity.proto import {name}_pb2\n")
        )


if __name__ == "__main__":
    generate(PROTO_DIR)
    print("generated", ", ".join(OUTPUTS), "in", PROTO_DIR.relative_to(Path.cwd()))
