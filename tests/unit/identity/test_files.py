"""write_set: a key, its certificate and the bundle put in service together, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from identity import files
from identity.files import DATA, PRIVATE, PUBLIC, write_set


def credentials(tag: str) -> dict[str, tuple[bytes, int]]:
    return {
        "svid.key": (f"key {tag}".encode(), PRIVATE),
        "svid.pem": (f"cert {tag}".encode(), PUBLIC),
        "bundle.pem": (f"bundle {tag}".encode(), PUBLIC),
    }


def read(directory: Path) -> dict[str, bytes]:
    return {
        name: (directory / name).read_bytes() for name in ("svid.key", "svid.pem", "bundle.pem")
    }


def sets(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("..2"))


def test_the_kubelet_layout_with_the_key_private(tmp_path: Path) -> None:
    write_set(tmp_path, credentials("1"))
    assert read(tmp_path) == {name: data for name, (data, _) in credentials("1").items()}
    [current] = sets(tmp_path)
    assert os.readlink(tmp_path / DATA) == current
    assert os.readlink(tmp_path / "svid.key") == f"{DATA}/svid.key"
    assert stat.S_IMODE((tmp_path / "svid.key").stat().st_mode) == PRIVATE
    assert stat.S_IMODE((tmp_path / "svid.pem").stat().st_mode) == PUBLIC


def test_a_new_set_replaces_the_old_one_whole(tmp_path: Path) -> None:
    write_set(tmp_path, credentials("1"))
    (tmp_path / "..2000_01_01_00_00_00.000000_crash").mkdir()  # left by a crash mid-write
    write_set(tmp_path, credentials("2"))
    assert read(tmp_path)["svid.key"] == b"key 2"
    assert len(sets(tmp_path)) == 1


def test_files_an_older_agent_wrote_become_links(tmp_path: Path) -> None:
    (tmp_path / "svid.key").write_bytes(b"old key")
    write_set(tmp_path, credentials("1"))
    assert (tmp_path / "svid.key").is_symlink()
    assert read(tmp_path)["svid.key"] == b"key 1"


def test_a_failed_write_leaves_the_previous_set_in_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_set(tmp_path, credentials("1"))
    before = sets(tmp_path)
    real = files._write_new

    def disk_full_on_the_certificate(path: Path, content: bytes, mode: int) -> None:
        if path.name == "svid.pem":
            raise OSError(28, "No space left on device")
        real(path, content, mode)

    monkeypatch.setattr(files, "_write_new", disk_full_on_the_certificate)
    with pytest.raises(OSError, match="No space"):
        write_set(tmp_path, credentials("2"))
    assert read(tmp_path)["svid.key"] == b"key 1"
    assert read(tmp_path)["svid.pem"] == b"cert 1"
    assert sets(tmp_path) == before
