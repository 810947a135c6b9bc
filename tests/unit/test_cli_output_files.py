"""A command told to write where it cannot (`inject -o DIR`, `ca mint --out FILE`, a
missing parent directory), or a flag read as it is elsewhere (`-o yaml`), says so and
exits 2, without a traceback or a stray file."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from outrider import cli

POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web"},
    "spec": {"containers": [{"name": "app", "image": "app:1"}]},
}


@pytest.mark.parametrize("where", ["a directory", "a missing directory"])
def test_inject_to_where_it_cannot_write_exits_2_and_names_it(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(POD))
    target = tmp_path / "out" if where == "a directory" else tmp_path / "absent" / "out.yaml"
    if where == "a directory":
        target.mkdir()
    assert cli.main(["inject", "-f", str(manifest), "-o", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {target}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["pod.yaml", *(["out"] if where == "a directory" else [])]
    )


@pytest.mark.parametrize("format_name", ["yaml", "json", "text"])
def test_inject_o_with_a_format_name_is_refused_not_written_to_a_file_of_that_name(
    tmp_path: Path,
    format_name: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every other command reads `-o yaml` as a format; inject's `-o` is its output file,
    and `-o yaml` quietly wrote a file named `yaml`."""
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(POD))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["inject", "-f", str(manifest), "-o", format_name]) == 2
    assert f"say -o ./{format_name}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["pod.yaml"]


@pytest.mark.parametrize(
    ("given", "seconds"), [("1s", 1.0), ("2m", 120.0), ("20", 20.0), ("0.5", 0.5), ("0", None)]
)
def test_demo_duration_takes_a_duration_as_every_flag_does(
    given: str, seconds: float | None
) -> None:
    if seconds is None:
        with pytest.raises(argparse.ArgumentTypeError, match="must run for some time"):
            cli._traffic_seconds(given)
    else:
        assert cli._traffic_seconds(given) == seconds


def test_ca_mint_into_a_file_exits_2_and_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca"
    assert cli.main(["ca", "init", "--trust-domain", "example.org", "--dir", str(ca)]) == 0
    occupied = tmp_path / "occupied"
    occupied.write_text("not a directory")
    spiffe_id = "spiffe://example.org/ns/shop/sa/web"
    argv = ["ca", "mint", "--dir", str(ca), "--spiffe-id", spiffe_id, "--out", str(occupied)]
    assert cli.main(argv) == 2
    assert f"cannot write {occupied}" in capsys.readouterr().err


def test_verbose_is_our_debug_not_every_librarys() -> None:
    """Under -v, hpack and h2 logged lines for every header and frame of every caller:
    thousands a second, taking the room a shared stdout had for the audit log."""
    script = (
        "import contextlib, io, logging; from outrider.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()): main(['-v', 'completion', 'bash'])\n"
        "print(logging.getLogger('outrider.ca').isEnabledFor(logging.DEBUG),"
        " logging.getLogger('hpack.hpack').isEnabledFor(logging.DEBUG),"
        " logging.getLogger('h2.connection').isEnabledFor(logging.DEBUG))"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert ran.stdout.split() == ["True", "False", "False"], ran.stdout + ran.stderr
