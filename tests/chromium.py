"""Headless Chromium for tests: render a local page, read back its DOM and a screenshot.

Debian's `chromium` is installed through `tests.interop.ensure_command` when
missing. Each run gets a new empty profile and every flag that would make
Chromium reach the network (sync, component updates, QUIC, background
networking) turned off: a page that needs the network shows blank here.

`png_rows` decodes the screenshot with zlib alone (8-bit RGB or RGBA, the
PNG filters undone), so a test can ask whether a chart's colour was painted
without adding an imaging library.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path

from tests.interop import ensure_command

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _run(page: Path, extra: Sequence[str], timeout: float = 60.0) -> str:
    binary = ensure_command("chromium", "chromium")
    with tempfile.TemporaryDirectory(prefix="outrider-chromium-") as profile:
        done = subprocess.run(
            [binary, *FLAGS, f"--user-data-dir={profile}", *extra, page.resolve().as_uri()],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


def dump_dom(page: Path) -> str:
    """The DOM after Chromium loaded and laid out `page`, serialized."""
    return _run(page, ["--dump-dom"])


def screenshot(page: Path, png: Path, width: int = 1100, height: int = 2600) -> Path:
    _run(page, [f"--screenshot={png.resolve()}", f"--window-size={width},{height}"])
    if not png.exists():
        raise AssertionError(f"chromium wrote no screenshot at {png}")
    return png


def png_rows(png: bytes) -> tuple[int, int, int, list[bytes]]:
    """(width, height, channels, each row's pixels as bytes) of an 8-bit RGB or RGBA PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat = 8, b""
    width = height = channels = 0
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        body = png[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), f"PNG depth {depth} colour type {color}"
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytes(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(raw[start], raw[start + 1 : start + 1 + stride], previous, channels)
        rows.append(line)
        previous = line
    return width, height, channels, rows


def painted(png: bytes, *colors: tuple[int, int, int]) -> list[int]:
    """How many pixels of the screenshot have exactly each of these colours."""
    _, _, channels, rows = png_rows(png)
    counts = []
    for rgb in colors:
        wanted, count = bytes(rgb), 0
        for row in rows:
            at = row.find(wanted)
            while at >= 0:
                count += at % channels == 0
                at = row.find(wanted, at + 1)
        counts.append(count)
    return counts


def _add_bytes(a: bytes, b: bytes) -> bytes:
    """Bytewise (a + b) mod 256, all lanes at once in one big integer."""
    size = len(a)
    low, high = int.from_bytes(b"\x7f" * size), int.from_bytes(b"\x80" * size)
    x, y = int.from_bytes(a), int.from_bytes(b)
    return (((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(size)


def _unfilter(kind: int, data: bytes, above: bytes, bpp: int) -> bytes:
    if kind == 0:
        return data
    if kind == 2:  # Up: most rows of a screenshot, so done without a Python loop
        return _add_bytes(data, above)
    line = bytearray(data)
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = above[i]
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        else:  # 4, Paeth
            corner = above[i - bpp] if i >= bpp else 0
            estimate = left + up - corner
            pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - corner)
            best = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            line[i] = (line[i] + best) & 0xFF
    return bytes(line)
