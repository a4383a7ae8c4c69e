"""The HTML report in a real browser: headless Chromium screenshots it, Pillow finds the bars drawn.

`make test` installs Debian's chromium where it can (root with apt-get); without a chromium binary
the screenshot tests skip and say so. The bars are found by colour: a "band" is a run of screen
rows each holding at least MIN_BAR_PIXELS pixels of a chart colour, so every drawn bar is one
band and a page without charts has none.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli_compile import MODELS

from polaris_opt.cli import main
from polaris_opt.report import load_report
from polaris_opt.report.html import LATENCY_COLOUR, PRECISION_COLOURS

ZOO_MODEL, ZOO_CALIB = MODELS / "resnet_s.onnx", MODELS / "resnet_s.calib.npz"
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary: `make test` installs Debian's chromium where apt-get can run as root",
)
WINDOW = (1200, 2400)
MIN_BAR_PIXELS = 20  # a bar row is at least this wide; text anti-aliasing never is, in one colour
TOLERANCE = 8  # per channel: solid fills render exactly, this only absorbs colour rounding


def screenshot(page: Path, tmp_path: Path) -> Image.Image:
    shot = tmp_path / f"{page.stem}.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ]
    done = subprocess.run(
        [CHROMIUM, *flags, page.resolve().as_uri()], capture_output=True, text=True, timeout=120
    )
    assert shot.exists(), f"chromium wrote no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}"
    return Image.open(shot).convert("RGB")


def bar_bands(image: Image.Image, colour: str) -> int:
    """How many separate runs of rows hold at least MIN_BAR_PIXELS pixels of `colour`."""
    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.int16)
    pixels = np.asarray(image, dtype=np.int16)
    matching = np.all(np.abs(pixels - target) <= TOLERANCE, axis=2)
    drawn = np.sum(matching, axis=1) >= MIN_BAR_PIXELS
    # A band starts where a drawn row follows an undrawn one (or the top of the page).
    return int(np.sum(drawn & ~np.concatenate([[False], drawn[:-1]])))


def charts_drawn(image: Image.Image, colour: str, bars: int) -> bool:
    """The check: at least `bars` bars of `colour` are on the screen."""
    return bar_bands(image, colour) >= bars


@pytest.fixture(scope="module")
def quantized_report(tmp_path_factory) -> Path:
    """resnet_s quantized to INT8 with --report: the HTML and the JSON beside it."""
    folder = tmp_path_factory.mktemp("browser")
    args = ["quantize", ZOO_MODEL, "--int8", "--calib", ZOO_CALIB, "-o", folder / "q.onnx", "--quiet"]
    assert main([str(a) for a in [*args, "--report", folder / "q.html", "--report", folder / "q.json"]]) == 0
    return folder / "q.html"


@needs_chromium
def test_every_layer_sqnr_bar_is_drawn(quantized_report, tmp_path):
    layers = load_report(quantized_report.with_suffix(".json"))["layers"]
    assert len(layers) > 20 and all(row["precision"] == "int8" for row in layers)
    image = screenshot(quantized_report, tmp_path)
    # One band per layer, plus the int8 bar of the parameters chart in the same colour.
    assert bar_bands(image, PRECISION_COLOURS["int8"]) == len(layers) + 1
    assert charts_drawn(image, PRECISION_COLOURS["int8"], len(layers))


@needs_chromium
def test_bench_latency_bars_are_drawn(quantized_report, tmp_path):
    bench, page = tmp_path / "bench.json", tmp_path / "with_bench.html"
    rows = [
        {
            "model": name,
            "runtime": "ort",
            "batch": 1,
            "p50_ms": p50,
            "p90_ms": p50 * 1.1,
            "p99_ms": p50 * 1.3,
            "throughput": 1000 / p50,
            "peak_rss_mb": 100.0,
            "file_bytes": 1000,
            "speedup": 2.0 / p50,
            "size_ratio": 1.0,
            "runs": 50,
            "spread": 1.1,
            "overhead_ms": 0.01,
        }
        for name, p50 in (("resnet_s.onnx", 2.0), ("q.onnx", 1.2))
    ]
    bench.write_text(json.dumps({"polaris_opt_bench": 1, "machine": {}, "settings": {}, "results": rows}))
    report = quantized_report.with_suffix(".json")
    assert main(["report", str(report), "-o", str(page), "--bench", str(bench), "--quiet"]) == 0
    assert bar_bands(screenshot(page, tmp_path), LATENCY_COLOUR) == len(rows)


@needs_chromium
def test_the_check_fails_on_a_page_without_charts(quantized_report, tmp_path):
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    assert not charts_drawn(screenshot(empty, tmp_path), PRECISION_COLOURS["int8"], 1)
    # The same report with its tables but no charts fails too.
    tables_only = tmp_path / "tables_only.html"
    page = quantized_report.read_text(encoding="utf-8")
    tables_only.write_text(re.sub(r"<svg.*?</svg>", "", page, flags=re.S), encoding="utf-8")
    assert not charts_drawn(screenshot(tables_only, tmp_path), PRECISION_COLOURS["int8"], 1)


class References(HTMLParser):
    """Every tag and every src/href value on a page."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [value or "" for name, value in attrs if name in ("src", "href", "xlink:href")]


def test_the_page_makes_no_network_reference(quantized_report):
    page = quantized_report.read_text(encoding="utf-8")
    found = References()
    found.feed(page)
    assert "svg" in found.tags and "table" in found.tags
    assert "script" not in found.tags and "link" not in found.tags
    assert not [link for link in found.links if re.match(r"\s*(https?:)?//", link, re.I)]
    assert "http://" not in page and "https://" not in page
    assert "@import" not in page and "url(" not in page
