"""Other TLS stacks' certificate verifiers, for chains Outrider makes.

Go's crypto/x509 (Debian `golang-go`) is installed when `go` is missing, as
bench/procs.py installs the bench's peers: a clean CI machine has no Go, and
a skipped interop test proves nothing. The verifier is built once per test
session; it uses only Go's standard library, so the build needs no network.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

#: verify(roots_pem, chain_pem, usage): Go's verdict on a chain (leaf first).
GoVerify = Callable[[Path, Path, str], subprocess.CompletedProcess[str]]

_GO_VERIFY = """\
// verify ROOTS.pem CHAIN.pem client|server: crypto/x509 Verify of the chain's leaf.
package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
)

func load(path string) []*x509.Certificate {
	data, err := os.ReadFile(path)
	if err != nil {
		fail(err)
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		if block, data = pem.Decode(data); block == nil {
			return certs
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			fail(err)
		}
		certs = append(certs, cert)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func main() {
	roots, intermediates := x509.NewCertPool(), x509.NewCertPool()
	for _, cert := range load(os.Args[1]) {
		roots.AddCert(cert)
	}
	chain := load(os.Args[2])
	for _, cert := range chain[1:] {
		intermediates.AddCert(cert)
	}
	usage := x509.ExtKeyUsageClientAuth
	if os.Args[3] == "server" {
		usage = x509.ExtKeyUsageServerAuth
	}
	options := x509.VerifyOptions{
		Roots: roots, Intermediates: intermediates, KeyUsages: []x509.ExtKeyUsage{usage},
	}
	if _, err := chain[0].Verify(options); err != nil {
		fail(err)
	}
	fmt.Println("ok")
}
"""


def ensure_command(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` (bounded) when it is missing."""
    found = shutil.which(command)
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"this test needs `{command}`: install the Debian package {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # One install at a time: parallel test processes (pytest-xdist workers) would otherwise
    # meet on apt's lock and fail; the second finds the command once the first is done.
    with open("/run/lock/outrider-tests-apt.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (found := shutil.which(command)) is not None:
            return found
        for step in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", package]):
            done = subprocess.run(step, capture_output=True, text=True, timeout=600, env=env)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(step)} failed:\n{done.stdout}{done.stderr}")
    found = shutil.which(command)
    if found is None:
        pytest.fail(f"{package} is installed but `{command}` is not on PATH")
    return found


@pytest.fixture(scope="session")
def go_verify(tmp_path_factory: pytest.TempPathFactory) -> GoVerify:
    go = ensure_command("go", "golang-go")
    directory = tmp_path_factory.mktemp("go-verify")
    (directory / "verify.go").write_text(_GO_VERIFY)
    binary = directory / "verify"
    env = {
        **os.environ,
        "GOFLAGS": "-mod=mod",
        "GOPROXY": "off",  # the standard library only: nothing to download
        "GOTOOLCHAIN": "local",
    }
    built = subprocess.run(
        [go, "build", "-o", str(binary), "verify.go"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert built.returncode == 0, built.stderr

    def verify(roots: Path, chain: Path, usage: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(binary), str(roots), str(chain), usage], capture_output=True, text=True
        )

    return verify
