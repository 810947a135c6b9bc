"""Generate the CA protocol code from ca.proto (`make proto`).

`generate(out_dir)` writes ca_pb2.py, ca_pb2.pyi and ca_grpc.py; the drift
test runs it into a temporary directory and compares with what is committed.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
OUTPUTS = ("ca_pb2.py", "ca_pb2.pyi", "ca_grpc.py")


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
        "ca.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on ca.proto")
    # protoc emits a top-level import; the package lives in identity.proto.
    grpc_module = out_dir / "ca_grpc.py"
    text = grpc_module.read_text()
    grpc_module.write_text(text.replace("import ca_pb2\n", "from identity.proto import ca_pb2\n"))


if __name__ == "__main__":
    generate(PROTO_DIR)
    print("generated", ", ".join(OUTPUTS), "in", PROTO_DIR.relative_to(Path.cwd()))
