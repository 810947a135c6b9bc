"""Writing credentials to disk so that a crash or a full disk loses nothing.

`write_atomic` writes one file: to a temporary file in the same directory,
flushed, and renamed over the target, so readers see the old file or the new
one, never half of either. Private keys are created 0600 from the first byte.

`write_set` writes files that must match each other (a key and its
certificate) as one unit, in the layout of the kubelet's AtomicWriter for
projected volumes:

    DIR/..2026_01_01_00_00_00.123456_abcd/{svid.key,svid.pem,bundle.pem}
    DIR/..data -> ..2026_01_01_00_00_00.123456_abcd
    DIR/svid.key -> ..data/svid.key   (and so on)

The new set goes into a new directory, fsynced, and one rename of the
`..data` symlink puts it in service: a reader that opens `DIR/svid.key` and
`DIR/svid.pem` gets both from the old set or both from the new one (unless a
swap falls between its two opens; resolving `..data` once avoids even that).
If anything fails before the rename (a full disk, a file-size limit), the new
directory is removed and the previous set stays in service, untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

PRIVATE = 0o600
PUBLIC = 0o644

#: The symlink naming the directory in service.
DATA = "..data"


def write_atomic(path: Path, data: bytes, mode: int = PUBLIC) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_set(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Put `files` (name -> (content, mode)) in service in `directory` at once; OSError if not."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y_%m_%d_%H_%M_%S.%f")
    fresh = Path(tempfile.mkdtemp(dir=directory, prefix=f"..{stamp}_"))
    try:
        fresh.chmod(0o755)
        for name, (content, mode) in files.items():
            _write_new(fresh / name, content, mode)
        _fsync(fresh)
        _swap(directory, fresh.name)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    for name in files:
        _link(directory / name, f"{DATA}/{name}")
    _fsync(directory)
    for old in directory.glob("..?*"):  # the previous set, and any a crash left behind
        if old.name not in {DATA, fresh.name} and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def _write_new(path: Path, content: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(content)
        out.flush()
        os.fsync(out.fileno())


def _swap(directory: Path, target: str) -> None:
    """Point `..data` at `target` with one rename: the old link or the new, never neither."""
    staging = directory / f"{DATA}_tmp"
    staging.unlink(missing_ok=True)
    os.symlink(target, staging)
    os.replace(staging, directory / DATA)


def _link(path: Path, target: str) -> None:
    """`path` -> `target`; a regular file there (an older agent's) is replaced in one rename."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    staging = path.with_name(f".{path.name}.link")
    staging.unlink(missing_ok=True)
    os.symlink(target, staging)
    os.replace(staging, path)


def _fsync(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
