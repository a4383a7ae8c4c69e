"""Report files: where they may go (checked before any work), atomic writes, and reading them back.

JSON is written strict: NaN and ±inf, which Python's json module would write as bare words other
readers refuse, become null. An SQNR of +inf means "no error at all": a layer row says so in its
note, and the HTML shows a model SQNR of null beside a measured cosine as "exact".
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from polaris_opt.errors import BadInput

SUFFIXES = (".json", ".html")
BENCH_ROW_KEYS = (
    "model",
    "runtime",
    "batch",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "throughput",
    "peak_rss_mb",
    "file_bytes",
    "speedup",
    "size_ratio",
)


def check_report_paths(
    paths: Iterable[Path] | None, input_path: Path, output_path: Path, *, option: str = "--report"
) -> None:
    """Refuse, before any work is done, a report path that cannot or must not be written;
    `option` is how the command line named it, for the message."""
    models = {_resolved(input_path), _resolved(output_path)}
    for path in paths or ():
        path = Path(path)
        _check_writable(path, option)
        if _resolved(path) in models:
            raise BadInput(f"{option} {path}: is the input or the output model; give another file name")


def write_reports(report: dict[str, Any], paths: Iterable[Path] | None) -> None:
    """Write `report` to each path, as JSON or HTML by its suffix, each file whole or not at all."""
    from polaris_opt.report.html import render_html

    for path in paths or ():
        path = Path(path)
        _check_writable(path, "--report")
        text = to_json(report) if path.suffix.lower() == ".json" else render_html(report)
        write_atomically(path, text)


def _check_writable(path: Path, option: str) -> None:
    if path.suffix.lower() not in SUFFIXES:
        raise BadInput(f"{option} {path}: give a .html or .json file name")
    if not _folder(path).is_dir():
        raise BadInput(f"{option} {path}: folder {_folder(path)} does not exist")


def to_json(report: dict[str, Any]) -> str:
    """Strict JSON: non-finite floats as null, NumPy scalars and paths as plain values."""
    return json.dumps(strict(report), indent=2, allow_nan=False) + "\n"


def strict(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, NumPy values made plain, recursively."""
    if isinstance(value, dict):
        return {str(key): strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(item) for item in value]
    if hasattr(value, "tolist"):  # NumPy scalars and arrays
        return strict(value.tolist())
    if hasattr(value, "__fspath__"):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_atomically(path: Path, text: str) -> None:
    """A temporary file beside `path`, then a rename: a reader never sees half a report.

    The file is created with mode 0o666 less the umask, like any file a command writes
    (tempfile's files are private, 0o600, which would hide a report from a web server or CI).
    """
    staged = _folder(path) / f".{path.name}.{secrets.token_hex(8)}.tmp"
    descriptor = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def load_report(path: Path) -> dict[str, Any]:
    """A report document written by `write_reports`; anything else is a one-line BadInput."""
    from polaris_opt.report.document import FORMAT_VERSION

    data = _read_json(Path(path), "report")
    if not isinstance(data, dict) or "polaris_opt_report" not in data:
        raise BadInput(f"{path}: not a polaris-opt report (no 'polaris_opt_report' key)")
    version = data["polaris_opt_report"]
    if version != FORMAT_VERSION:
        raise BadInput(f"{path}: report format version {version!r}; this polaris-opt reads {FORMAT_VERSION}")
    for key in ("command", "input", "output", "layers"):
        if key not in data:
            raise BadInput(f"{path}: report has no '{key}'; damaged or written by another tool?")
    return data


def load_bench_rows(path: Path) -> list[dict[str, Any]]:
    """The result rows of a `polaris-opt bench --json` file, each with the report's bench keys."""
    data = _read_json(Path(path), "bench")
    if not isinstance(data, dict) or data.get("polaris_opt_bench") != 1:
        raise BadInput(f"--bench {path}: not a polaris-opt bench JSON (no 'polaris_opt_bench': 1)")
    rows = data.get("results")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise BadInput(f"--bench {path}: 'results' is not a list of rows")
    for index, row in enumerate(rows):
        missing = [key for key in BENCH_ROW_KEYS if key not in row]
        if missing:
            raise BadInput(f"--bench {path}: result row {index} lacks {', '.join(missing)}")
    return [{key: row[key] for key in BENCH_ROW_KEYS} for row in rows]


def load_sensitivity(path: Path) -> dict[str, float | None]:
    """Layer name -> model SQNR (dB) with only that layer quantized, from `polaris-opt analyze --json`."""
    data = _read_json(Path(path), "analyze")
    layers = data.get("layers") if isinstance(data, dict) else None
    if "full_model" not in (data if isinstance(data, dict) else {}) or not isinstance(layers, list):
        raise BadInput(
            f"--analyze {path}: not a `polaris-opt analyze --json` result (no 'full_model', 'layers')"
        )
    sensitivity = {}
    for index, row in enumerate(layers):
        if not isinstance(row, dict) or "name" not in row or "sqnr_db" not in row:
            raise BadInput(f"--analyze {path}: layer row {index} lacks 'name' or 'sqnr_db'")
        sensitivity[str(row["name"])] = row["sqnr_db"]
    return sensitivity


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path}: not a JSON {what} file ({exc})") from None


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _resolved(path: Path) -> Path:
    return Path(path).resolve()
