"""The `demo.Greeter` gRPC service (tests/fixtures/grpc/demo.proto), for the gRPC acceptance
test (tests/e2e/test_grpc.py) and the gRPC bench (bench/grpc_calls.py).

Its Python code is generated at test time with grpcio-tools into a directory of the caller's
(`generate`), so nothing generated is committed and nothing can drift from the .proto.

A backend is a real grpcio server in a process of its own, so a test can kill it as a node
kills a pod (SIGKILL: its connections reset, nothing said):

    python -m tests.grpcdemo CODE_DIR NAME PORT

serves on 127.0.0.1:PORT and answers each call with its NAME in the reply.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

PROTO = Path(__file__).resolve().parent / "fixtures" / "grpc" / "demo.proto"
SERVICE = "demo.Greeter"
#: The methods' :path, as a policy names them.
SAY_HELLO, ADMIN, CHAT = (f"/{SERVICE}/{m}" for m in ("SayHello", "Admin", "Chat"))
_SERVING = re.compile(r"greeter (\S+) serving on 127\.0\.0\.1:(\d+)")


def generate(directory: Path) -> tuple[ModuleType, ModuleType]:
    """demo_pb2 and demo_pb2_grpc, generated into `directory` (once) and imported from it."""
    from grpc_tools import protoc

    if not (directory / "demo_pb2_grpc.py").exists():
        directory.mkdir(parents=True, exist_ok=True)
        arguments = ["protoc", f"-I{PROTO.parent}", f"--python_out={directory}"]
        arguments += [f"--grpc_python_out={directory}", str(PROTO)]
        if protoc.main(arguments) != 0:
            raise RuntimeError(f"grpc_tools.protoc failed on {PROTO}")
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return importlib.import_module("demo_pb2"), importlib.import_module("demo_pb2_grpc")


def server(code: Path, name: str, port: int, workers: int = 16) -> grpc.Server:
    """A started grpcio server of demo.Greeter on 127.0.0.1:`port`, answering as `name`."""
    pb2, pb2_grpc = generate(code)

    class Greeter(pb2_grpc.GreeterServicer):  # type: ignore[misc]  # generated: Any
        def SayHello(self, request: Any, context: grpc.ServicerContext) -> Any:
            return pb2.HelloReply(message=f"hello, {request.name}", backend=name)

        def Admin(self, request: Any, context: grpc.ServicerContext) -> Any:
            return pb2.HelloReply(message="admin done", backend=name)

        def Chat(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in requests:
                yield pb2.HelloReply(message=f"hello, {request.name}", backend=name)

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    pb2_grpc.add_GreeterServicer_to_server(Greeter(), grpc_server)
    if grpc_server.add_insecure_port(f"127.0.0.1:{port}") != port:
        raise RuntimeError(f"greeter {name}: cannot listen on 127.0.0.1:{port}")
    grpc_server.start()
    return grpc_server


@dataclass
class Backend:
    """A greeter backend process: `kill()` it as a node would, `start()` it again."""

    code: Path
    name: str
    port: int
    process: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        from tests.support import wait_for_line

        command = [sys.executable, "-m", "tests.grpcdemo", str(self.code), self.name]
        self.process = subprocess.Popen(
            [*command, str(self.port)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=Path(__file__).resolve().parent.parent,
        )
        wait_for_line(self.process, _SERVING, self.log, timeout, f"greeter {self.name}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@contextmanager
def backends(code: Path, names: list[str], ports: list[int]) -> Iterator[list[Backend]]:
    """Greeter backend processes, started side by side; killed when the block exits."""
    started = [Backend(code, name, port) for name, port in zip(names, ports, strict=True)]
    try:
        with futures.ThreadPoolExecutor(len(started)) as pool:
            list(pool.map(Backend.start, started))
        yield started
    finally:
        for backend in started:
            backend.kill()


def main() -> None:
    code, name, port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    grpc_server = server(code, name, port)
    print(f"greeter {name} serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: grpc_server.stop(0))
    grpc_server.wait_for_termination()


if __name__ == "__main__":
    main()
