"""Headless Chromium for the HTML report tests: screenshots, layout boxes, network log, PNG pixels.

The PNG decoder is the standard library's zlib plus numpy (no Pillow): Chromium writes 8-bit
RGB(A), non-interlaced PNGs whose rows use all five filter types; None/Sub/Up rows are undone
with numpy, Average/Paeth rows (sequential by nature) in plain Python.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import numpy as np

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(*args: str, size: tuple[int, int] = (1280, 2400), timeout: float = 60) -> str:
    """Chromium with a fresh profile; returns stdout (for --dump-dom)."""
    binary = chromium()
    assert binary is not None
    with tempfile.TemporaryDirectory(prefix="pd-chromium-") as profile:
        result = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def screenshot(html: Path, png: Path, size: tuple[int, int], net_log: Path | None = None) -> None:
    extra = [f"--log-net-log={net_log}", "--net-log-capture-mode=Everything"] if net_log else []
    run_chromium(*extra, f"--screenshot={png}", html.as_uri(), size=size)
    assert png.is_file(), "chromium wrote no screenshot"


_BOX_SCRIPT = """<script>
const boxes = {};
for (const el of document.querySelectorAll("svg.chart, section")) {
  const r = el.getBoundingClientRect();
  boxes[el.id] = [r.left + scrollX, r.top + scrollY, r.width, r.height];
}
document.body.setAttribute("data-boxes", JSON.stringify(boxes));
</script>"""


def layout_boxes(html: Path, size: tuple[int, int]) -> dict[str, list[float]]:
    """Page-coordinate boxes of every chart and section, measured by Chromium in a copy of the page
    with a measuring script added at the end (the report itself has no script and forbids them)."""
    text = html.read_text()
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", text)
    copy = html.with_name(html.stem + ".measure.html")
    copy.write_text(text.replace("</body>", _BOX_SCRIPT + "</body>"))
    dom = run_chromium("--dump-dom", copy.as_uri(), size=size)
    match = re.search(r'data-boxes="([^"]*)"', dom)
    assert match, "the measuring script did not run"
    return json.loads(match.group(1).replace("&quot;", '"'))


def page_fetches(net_log: Path) -> list[str]:
    """URLs the page asked the network stack for, from a --log-net-log file.

    Chromium's own background requests (component updates, network time, sign-in) carry the
    initiator "not an origin"; anything a file:// page loads carries its opaque origin "null".
    """
    log = json.loads(net_log.read_text(errors="replace"))
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = set()
    for event in log["events"]:
        params = event.get("params") or {}
        if event["type"] == start_job and "url" in params and params.get("initiator") != "not an origin":
            urls.add(str(params.get("url")))
    return sorted(urls)


def read_png(path: Path) -> np.ndarray:
    """Pixels of an 8-bit RGB or RGBA PNG as an (height, width, channels) uint8 array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    width = height = depth = kind = interlace = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        name, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if name == b"IHDR":
            width, height, depth, kind, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif name == b"IDAT":
            idat.append(body)
        pos += 12 + length
    assert depth == 8 and interlace == 0 and kind in (2, 6), (depth, interlace, kind)
    bpp = 3 if kind == 2 else 4
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(height, width * bpp + 1)
    out = np.zeros((height, width * bpp), dtype=np.uint8)
    previous = np.zeros(width * bpp, dtype=np.uint8)
    for y in range(height):
        kind_of_row, line = raw[y, 0], raw[y, 1:]
        if kind_of_row == 0:
            row = line
        elif kind_of_row == 1:
            row = (np.cumsum(line.reshape(width, bpp).astype(np.uint32), axis=0) & 255).astype(np.uint8).reshape(-1)
        elif kind_of_row == 2:
            row = line + previous  # uint8 wraps, as PNG wants
        else:
            row = np.array(_sequential(line.tolist(), previous.tolist(), bpp, int(kind_of_row)), dtype=np.uint8)
        out[y] = row
        previous = row
    return out.reshape(height, width, bpp)[:, :, :3]


def _sequential(line: list[int], previous: list[int], bpp: int, kind: int) -> list[int]:
    row = [0] * len(line)
    for i, value in enumerate(line):
        a = row[i - bpp] if i >= bpp else 0
        b = previous[i]
        if kind == 3:
            row[i] = (value + ((a + b) >> 1)) & 255
            continue
        c = previous[i - bpp] if i >= bpp else 0
        p = a + b - c
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
        row[i] = (value + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
    return row


def ink(region: np.ndarray) -> tuple[float, float]:
    """(share of non-white pixels, share of saturated coloured pixels) of an image region."""
    if region.size == 0:
        return 0.0, 0.0
    pixels = region.reshape(-1, 3).astype(np.int16)
    nonwhite = (pixels < 245).any(axis=1).mean()
    colourful = ((pixels.max(axis=1) - pixels.min(axis=1)) > 60).mean()
    return float(nonwhite), float(colourful)
